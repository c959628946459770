"""Prompt templates, kept as data: the one source of truth for training, evaluation and generation.

A training example is the text ``prompt + response_lead + response`` where ``prompt`` comes from
``format_prompt``. The prompt is what the model reads (its labels are masked); ``response_lead + response``
is what it learns to write, followed by EOS. Generation feeds exactly ``format_prompt(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt format.

    ``prompt`` has an ``{instruction}`` field; ``prompt_with_context`` has ``{instruction}`` and ``{context}``
    and is used only when the context is not blank. ``response_lead`` is text written before the response
    (part of the learned span): Mistral's format puts a space after ``[/INST]``, which sentencepiece then
    merges into the first response token exactly as Mistral's reference tokenizer does.
    """

    name: str
    description: str
    prompt: str
    prompt_with_context: str
    response_lead: str = ""


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            name="dolly",
            description="### Instruction / ### Context (only when there is one) / ### Response",
            prompt="### Instruction:\n{instruction}\n\n### Response:\n",
            prompt_with_context="### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n",
        ),
        PromptTemplate(
            name="alpaca",
            description="Stanford Alpaca: a one-line preamble, ### Instruction / ### Input / ### Response",
            prompt=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Response:\n"
            ),
            prompt_with_context=(
                "Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
            ),
        ),
        PromptTemplate(
            name="mistral",
            description="Mistral Instruct v0.1: [INST] instruction (blank line, context) [/INST] response",
            prompt="[INST] {instruction} [/INST]",
            prompt_with_context="[INST] {instruction}\n\n{context} [/INST]",
            response_lead=" ",
        ),
    )
}


def get_template(name: str) -> PromptTemplate:
    """The template called ``name``; ``UserError`` listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATES)}") from None


def format_prompt(template_name: str, instruction: str, context: str = "") -> str:
    """The prompt text for one instruction, up to where the response starts.

    ``context`` is included only when it is not blank (whitespace only counts as blank).
    """
    template = get_template(template_name)
    if context and context.strip():
        return template.prompt_with_context.format(instruction=instruction, context=context)
    return template.prompt.format(instruction=instruction)


def format_response(template_name: str, response: str) -> str:
    """The learned text for one response: the template's ``response_lead`` then ``response``."""
    return get_template(template_name).response_lead + response


def chat_turns(template_name: str, messages: Sequence[dict]) -> list[tuple[str, Optional[str]]]:
    """Split a conversation into ``(prompt_text, response_text)`` turns of the template.

    ``messages`` alternate ``{"role": "user", "content": ..., "context": optional}`` and
    ``{"role": "assistant", "content": ...}``, starting with a user message. The last turn's response is
    ``None`` when the conversation ends with a user message (the prompt for generation). Each turn is
    tokenized on its own and finished turns end with EOS (``prepare.encode_chat``), as in Mistral's
    reference multi-turn format ``<s>[INST] q1 [/INST] a1</s>[INST] q2 [/INST]``.
    """
    turns: list[tuple[str, Optional[str]]] = []
    expected = "user"
    for index, message in enumerate(messages):
        role = message.get("role")
        if role != expected:
            raise UserError(f"message {index}: expected role {expected!r}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise UserError(f"message {index}: 'content' must be a string")
        if role == "user":
            turns.append((format_prompt(template_name, content, message.get("context") or ""), None))
            expected = "assistant"
        else:
            turns[-1] = (turns[-1][0], format_response(template_name, content))
            expected = "user"
    if not turns:
        raise UserError("a conversation needs at least one user message")
    return turns
