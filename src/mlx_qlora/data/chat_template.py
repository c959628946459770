"""The model's own chat template: ``chat_template`` of its ``tokenizer_config.json``, rendered with jinja2.

``render_chat`` renders a conversation (with ``tools``; ``{% generation %}`` blocks optionally marked), the
way ``transformers``' ``apply_chat_template`` does; ``conversation.py`` builds training examples on it. The
rest of this module cuts a conversation of alternating user/assistant turns into prompt/response turns for
``prepare.encode_chat`` and instruction records:

Choose it with the template name ``"chat"`` (``prepare_data.py --template chat``); the named templates of
``templates.py`` are used otherwise. A conversation is cut into the same ``(prompt_text, response_text)``
turns as ``templates.chat_turns``, so labels, truncation and generation work as for any template:

- the prompt of the first turn is the rendering of the conversation up to the first user message with
  the generation prompt (``add_generation_prompt=True``): for SmolLM2, the default system message, the
  user turn and ``<|im_start|>assistant\\n``;
- the response is the assistant's text; it is followed by the EOS id, which is where the template ends
  an assistant turn (``<|im_end|>`` for ChatML, ``</s>`` for Mistral);
- a later turn's prompt is the text the template adds between the previous EOS and the next answer.

That cut exists only when every rendering of the conversation so far is a prefix of the next one and each
assistant message is rendered as its text followed by EOS; otherwise ``UserError`` says so. ``bos_token``
renders as an empty string: BOS is added as an id (``Tokenizer.bos_id``), never as text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence

from ..errors import UserError
from .templates import chat_turns, format_prompt, format_response, get_template

CHAT_TEMPLATE_NAME = "chat"


def _raise(message: str):
    raise UserError(f"chat template: {message}")


# Written around each {% generation %} block's output when its spans are asked for (render_chat's
# mark_generation); private-use characters, so no text of a conversation is mistaken for them.
GENERATION_START, GENERATION_END = "\ue000", "\ue001"


def _generation_extension():
    """The ``{% generation %}...{% endgeneration %}`` tag of Hugging Face chat templates: it renders its
    body, between the two marks above when the variable ``_mark_generation`` is true."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_wrap", [nodes.Name("_mark_generation", "load")])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _wrap(self, mark, caller):
            text = caller()
            return f"{GENERATION_START}{text}{GENERATION_END}" if mark else text

    return Generation


def has_generation_marks(source: str) -> bool:
    """Whether a chat template marks the assistant's text with ``{% generation %}`` blocks."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


@lru_cache(maxsize=8)
def _compile(source: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("the model's chat template needs jinja2: pip install jinja2") from None
    # The settings transformers' apply_chat_template uses, so a template renders the same text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    env.globals["strftime_now"] = _strftime_now
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template: not a valid jinja2 template ({e})") from None
    return template


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping (jinja2's own escapes <, > and &), unicode kept
    import json

    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(format)


def render_chat(source: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                eos_token: str = "", bos_token: str = "", tools: Optional[Sequence[dict]] = None,
                mark_generation: bool = False) -> str:
    """The text of ``messages`` (``[{"role": ..., "content": ...}, ...]``) through the jinja2 template ``source``.

    ``tools`` is given to the template as ``tools`` (None: undefined, as transformers does without tools).
    With ``mark_generation`` the output of every ``{% generation %}`` block is wrapped in
    ``GENERATION_START`` / ``GENERATION_END``."""
    import jinja2

    variables = dict(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                     eos_token=eos_token, bos_token=bos_token, _mark_generation=mark_generation)
    if tools is not None:
        variables["tools"] = [dict(t) for t in tools]
    try:
        return _compile(source).render(**variables)
    except jinja2.TemplateError as e:
        raise UserError(f"chat template: rendering failed ({e})") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # a template that cannot handle a message's fields (a tool call it does not expect, say)
        raise UserError(f"chat template: rendering failed ({type(e).__name__}: {e})") from None


def template_source(tokenizer) -> str:
    """The tokenizer's chat template (Jinja source); ``UserError`` when it has none."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise UserError(f"template 'chat': the tokenizer {tokenizer.path} has no chat template (no chat_template in "
                        "its tokenizer_config.json); choose a named template instead (dolly, alpaca, mistral)")
    return source


def eos_text(tokenizer) -> str:
    """The text of the tokenizer's EOS token ("" without one), as templates receive it."""
    return tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""


def _user_content(message: dict) -> str:
    context = message.get("context") or ""
    return f"{message['content']}\n\n{context}" if context.strip() else message["content"]


def template_turns(tokenizer, messages: Sequence[dict]) -> list[tuple[str, Optional[str]]]:
    """``(prompt_text, response_text)`` turns of a conversation under the tokenizer's chat template.

    ``messages`` alternate ``{"role": "user", "content": ..., "context": optional}`` and
    ``{"role": "assistant", "content": ...}``, starting with a user message; the last response is None
    when the conversation ends with a user message. See the module docstring for the cut.
    """
    source, eos = template_source(tokenizer), eos_text(tokenizer)
    chat_turns("dolly", messages)  # the same checks of roles and contents as for named templates
    plain = [{"role": m["role"], "content": _user_content(m) if m["role"] == "user" else m["content"]}
             for m in messages]
    turns: list[tuple[str, Optional[str]]] = []
    done = ""  # the rendered text already given to earlier turns (up to and including their EOS)
    for j in range(0, len(plain), 2):
        prompt = render_chat(source, plain[: j + 1], add_generation_prompt=True, eos_token=eos)
        if not prompt.startswith(done):
            raise UserError("chat template: rendering a longer conversation changes the text of earlier turns; "
                            "it cannot be cut into prompt/response turns (use a named template)")
        if j + 1 == len(plain):
            turns.append((prompt[len(done):], None))
            break
        answer = plain[j + 1]["content"]
        full = render_chat(source, plain[: j + 2], add_generation_prompt=False, eos_token=eos)
        if not full.startswith(prompt + answer):
            raise UserError("chat template: an assistant message is not rendered right after the generation "
                            "prompt; it cannot be cut into prompt/response turns (use a named template)")
        end = len(prompt) + len(answer)
        if eos and full.startswith(eos, end):
            end += len(eos)
        turns.append((prompt[len(done):], answer))
        done = full[:end]
    return turns


def check_template(tokenizer, template_name: str) -> None:
    """``UserError`` unless ``template_name`` is a named template, or ``"chat"`` and the tokenizer has one."""
    if template_name == CHAT_TEMPLATE_NAME:
        template_source(tokenizer)
    else:
        get_template(template_name)


def prompt_for(tokenizer, template_name: str, instruction: str, context: str = "") -> str:
    """``templates.format_prompt``, or the chat template's first-turn prompt for ``"chat"``."""
    if template_name != CHAT_TEMPLATE_NAME:
        return format_prompt(template_name, instruction, context)
    return template_turns(tokenizer, [{"role": "user", "content": instruction, "context": context}])[0][0]


def response_for(template_name: str, response: str) -> str:
    """``templates.format_response``; the answer as it is for ``"chat"`` (EOS follows it as an id)."""
    return response if template_name == CHAT_TEMPLATE_NAME else format_response(template_name, response)


def turns_for(tokenizer, template_name: str, messages: Sequence[dict]) -> list[tuple[str, Optional[str]]]:
    """``templates.chat_turns``, or ``template_turns`` for ``"chat"``."""
    if template_name == CHAT_TEMPLATE_NAME:
        return template_turns(tokenizer, messages)
    return chat_turns(template_name, messages)
