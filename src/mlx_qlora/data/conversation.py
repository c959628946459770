"""Conversations -> token ids and labels: which tokens are learned, and truncation that keeps whole turns.

Which tokens are learned (``learn``)
------------------------------------
- ``"assistant"`` (default): every assistant turn, its text and what the template writes after it to end
  the turn (``<|im_end|>\\n`` for ChatML, ``</s>`` for Mistral); nothing else.
- ``"last"``: only the last assistant turn.
- ``"all"``: every token (BOS excepted: nothing predicts it).

With the model's own chat template (``"chat"``) the conversation is rendered **once** into text, tokenized
in one go (``Tokenizer.encode_spans``), and each assistant turn's learned characters are found by one of two
rules:

1. **Generation marks.** A template that wraps the assistant's output in ``{% generation %}`` ...
   ``{% endgeneration %}`` says itself what is learned: the characters rendered inside those blocks (as
   ``transformers``' ``apply_chat_template(..., return_assistant_tokens_mask=True)``).
2. **The prefix rule** (every other template). For the assistant message at position ``k``, let
   ``A = render(messages[:k], add_generation_prompt=True)`` and ``B = render(messages[:k + 1])``. The learned
   characters of turn ``k`` are ``B[len(A):]``. The rule needs ``B`` to start with ``A`` and the whole
   rendering to start with ``B``; a template for which that fails (one that rewrites earlier turns once
   later ones follow, say) is refused with ``UserError``, never guessed.

A token is learned when its characters overlap the learned characters (a token merged across a boundary
is learned). BOS, when the tokenizer has one, is added as an id in front; the template's ``bos_token``
renders as nothing.

With a named template (``dolly``, ``alpaca``, ``mistral``) a conversation of alternating user and assistant
messages is encoded turn by turn (``prepare.encode_chat``), and its learned runs are the assistant turns.

Truncation (``max_seq_len``)
----------------------------
A conversation longer than ``max_seq_len`` keeps its first messages (the system prompt with them) up to and
including the last assistant turn that still fits whole; later turns are dropped (``truncated_turns``).
When not even the first assistant turn fits, that turn is cut at ``max_seq_len`` without its end-of-turn,
but only if at least ``min_response_tokens`` of its tokens remain (``cut_turn``); otherwise the conversation
is dropped. Both are counted in ``meta.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError
from .chat_template import (
    CHAT_TEMPLATE_NAME,
    GENERATION_END,
    GENERATION_START,
    eos_text,
    has_generation_marks,
    render_chat,
    template_source,
)
from .constants import CROSS_ENTROPY_IGNORE_INDEX

LEARN_MODES = ("assistant", "last", "all")


@dataclass
class Rendered:
    """A conversation rendered by the chat template: its ``text`` and each assistant turn's learned
    character span ``(start, end)``, in order; ``rule`` is ``"generation"`` or ``"prefix"``."""

    text: str
    spans: list[tuple[int, int]]
    rule: str


def render(tokenizer, messages: Sequence[dict], tools=None, add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to ``messages`` (and ``tools``), as text."""
    return render_chat(template_source(tokenizer), messages, add_generation_prompt, eos_token=eos_text(tokenizer),
                       tools=tools)


def _spans_between_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without generation marks, and the non-empty character spans the marks enclosed."""
    out, spans, open_at = [], [], None
    length = 0
    for char in marked:
        if char == GENERATION_START:
            open_at = length
        elif char == GENERATION_END:
            if open_at is not None and length > open_at:
                spans.append((open_at, length))
            open_at = None
        else:
            out.append(char)
            length += 1
    return "".join(out), spans


def render_with_spans(tokenizer, messages: Sequence[dict], tools=None) -> Rendered:
    """The conversation's text and every assistant turn's learned characters (see the module docstring)."""
    source = template_source(tokenizer)
    eos = eos_text(tokenizer)
    text = render_chat(source, messages, eos_token=eos, tools=tools)
    if GENERATION_START in text or GENERATION_END in text:
        raise UserError("the conversation holds the private-use characters U+E000/U+E001, which mark learned text")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if has_generation_marks(source):
        plain, spans = _spans_between_marks(render_chat(source, messages, eos_token=eos, tools=tools,
                                                        mark_generation=True))
        if plain != text:
            raise UserError("chat template: its {% generation %} blocks change the rendered text")
        return Rendered(text, spans, "generation")
    spans = []
    for k in assistants:
        before = render_chat(source, messages[:k], add_generation_prompt=True, eos_token=eos, tools=tools)
        upto = render_chat(source, messages[: k + 1], eos_token=eos, tools=tools)
        if not upto.startswith(before) or not text.startswith(upto) or len(upto) == len(before):
            raise UserError(
                f"chat template: the learned span of message {k} cannot be found: the rendering up to it with the "
                "generation prompt is not a prefix of the rendering including it, or later turns change it "
                "(templates that mark {% generation %} blocks are supported; or choose a named template)")
        spans.append((len(before), len(upto)))
    return Rendered(text, spans, "prefix")


def _check_tool_calls(messages: Sequence[dict], text: str, spans: list[tuple[int, int]]) -> None:
    """Each tool call's function name must appear in its assistant turn's rendered text."""
    assistants = [m for m in messages if m["role"] == "assistant"]
    for number, (message, (start, end)) in enumerate(zip(assistants, spans)):
        for call in message.get("tool_calls") or ():
            name = call["function"]["name"]
            if name not in text[start:end]:
                index = [i for i, m in enumerate(messages) if m["role"] == "assistant"][number]
                raise UserError(f"message {index}: the chat template does not render its tool call {name!r} "
                                "(a template without tool-call support)")


def _chat_ids(tokenizer, messages: Sequence[dict], tools) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids (BOS first when the tokenizer has one) and each assistant turn's learned token range ``[a, b)``."""
    rendered = render_with_spans(tokenizer, messages, tools)
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    if len(rendered.spans) != n_assistant:
        raise UserError(f"chat template: {len(rendered.spans)} generation block(s) for {n_assistant} assistant "
                        "message(s)")
    _check_tool_calls(messages, rendered.text, rendered.spans)
    ids, starts, ends = tokenizer.encode_spans(rendered.text)
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ranges = []
    for s, e in rendered.spans:
        inside = [j for j, (a, b) in enumerate(zip(starts, ends)) if (a < e and b > s) or (a == b and s <= a < e)]
        if not inside:
            raise UserError("chat template: an assistant turn renders no text")
        ranges.append((len(head) + inside[0], len(head) + inside[-1] + 1))
    return head + ids, ranges


def _named_ids(tokenizer, template_name: str, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    from .prepare import encode_chat

    for index, message in enumerate(messages):
        if message["role"] not in ("user", "assistant") or message.get("tool_calls"):
            what = "tool calls" if message.get("tool_calls") else f"{message['role']!r} messages"
            raise UserError(f"message {index}: template {template_name!r} cannot render {what}; use --template chat "
                            "(the model's own chat template)")
    try:
        ids, labels = encode_chat(tokenizer, template_name, messages)
    except UserError as e:
        raise UserError(f"template {template_name!r}: {e}") from None
    ranges, start = [], None
    for j, label in enumerate(labels + [CROSS_ENTROPY_IGNORE_INDEX]):
        if label != CROSS_ENTROPY_IGNORE_INDEX and start is None:
            start = j
        elif label == CROSS_ENTROPY_IGNORE_INDEX and start is not None:
            ranges.append((start, j))
            start = None
    return ids, ranges


def conversation_ids(tokenizer, template_name: str, messages: Sequence[dict],
                     tools=None) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, ranges)``: the conversation's token ids and each assistant turn's learned ids ``ids[a:b]``."""
    if template_name == CHAT_TEMPLATE_NAME:
        return _chat_ids(tokenizer, messages, tools)
    if tools:
        raise UserError(f"template {template_name!r} cannot render tools; use --template chat")
    return _named_ids(tokenizer, template_name, messages)


def labels_for(ids: Sequence[int], ranges: Sequence[tuple[int, int]], learn: str, has_bos: bool) -> list[int]:
    """Labels of ``ids``: the ids inside the learned ranges of ``learn`` (``LEARN_MODES``), -100 elsewhere."""
    if learn not in LEARN_MODES:
        raise UserError(f"unknown learn mode {learn!r}; choose one of {', '.join(LEARN_MODES)}")
    labels = [CROSS_ENTROPY_IGNORE_INDEX] * len(ids)
    if learn == "all":
        start = 1 if has_bos else 0
        labels[start:] = ids[start:]
        return labels
    for a, b in (ranges[-1:] if learn == "last" else ranges):
        labels[a:b] = ids[a:b]
    return labels


@dataclass
class ConversationExample:
    """A tokenized conversation (the fields ``prepare.Example`` has, and what truncation did)."""

    input_ids: list[int]
    labels: list[int]
    truncated_turns: bool = False  # later turns were dropped to fit
    cut_turn: bool = False  # an assistant turn was cut at max_seq_len (no end-of-turn)
    truncated_context: bool = False
    truncated_response: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_conversation(tokenizer, template_name: str, messages: Sequence[dict], tools=None,
                        learn: str = "assistant", max_seq_len: Optional[int] = None,
                        min_response_tokens: int = 16) -> Optional[ConversationExample]:
    """One conversation as ids and labels, truncated to ``max_seq_len`` by the module's rules (None: dropped).

    ``messages`` are checked dicts (``formats.parse_conversation``). Raises ``UserError`` when the template
    cannot render the conversation or the learned spans cannot be found."""
    ids, ranges = conversation_ids(tokenizer, template_name, messages, tools)
    has_bos = tokenizer.bos_id is not None
    if max_seq_len is None or len(ids) <= max_seq_len:
        return ConversationExample(ids, labels_for(ids, ranges, learn, has_bos))
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # Keep messages up to the k-th assistant turn; try the longest that can fit first.
    for k in range(len(assistants) - 1, -1, -1):
        shorter = messages[: assistants[k] + 1]
        if ranges[k][1] > max_seq_len or len(shorter) == len(messages):
            continue
        short_ids, short_ranges = conversation_ids(tokenizer, template_name, shorter, tools)
        if len(short_ids) <= max_seq_len:
            return ConversationExample(short_ids, labels_for(short_ids, short_ranges, learn, has_bos),
                                       truncated_turns=True)
    first = messages[: assistants[0] + 1]
    first_ids, first_ranges = conversation_ids(tokenizer, template_name, first, tools)
    start = first_ranges[0][0]
    if max_seq_len - start < min_response_tokens:
        return None
    cut = first_ids[:max_seq_len]
    return ConversationExample(cut, labels_for(cut, [(start, max_seq_len)], learn, has_bos),
                               truncated_turns=len(first) < len(messages), cut_turn=True)


def generation_prompt_ids(tokenizer, messages: Sequence[dict], tools=None) -> list[int]:
    """Ids that ask for the next assistant turn: BOS (when the tokenizer has one) and the chat template's
    rendering of ``messages`` with the generation prompt, tokenized in one go."""
    ids, _, _ = tokenizer.encode_spans(render(tokenizer, messages, tools, add_generation_prompt=True))
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids
