"""Talking to a model: a one-shot prompt, or a multi-turn chat read line by line from standard input.

Conversations are encoded with the training template. The model's own chat template (``"chat"``) renders the
whole conversation (a system prompt first, when given) with the generation prompt, tokenized in one go after
BOS, exactly as ``transformers``' ``apply_chat_template`` and multi-turn training data
(``data.conversation``). A named template gives BOS once, then each finished turn ``prompt + response + EOS``
and the new prompt (``data.prepare.encode_chat``).
Without a template (``template=None``) each input is sent as it is after BOS, with no history: that is
for completion models and checks. Replies are streamed token by token. Commands: ``/reset`` forgets the
conversation, ``/quit`` (or end of input) ends the session, ``/help`` lists them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, TextIO

from ..errors import UserError
from .generator import (GenerationResult, GenerationStats, PromptCache, check_prompt_length, context_length,
                        generate_stream)
from .sampling import SamplerConfig

HELP = "commands: /reset (forget the conversation), /quit (leave), /help (this text)"


def not_utf8(text: str) -> Optional[str]:
    """Why ``text`` is not UTF-8 text, or None when it is. Python decodes the bytes of the command line and
    of a piped standard input that are not UTF-8 into lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start].encode("utf-8", "surrogateescape")
        return f"not UTF-8 text (byte 0x{byte.hex()} at character {e.start + 1})"
    return None


@dataclass
class ChatSession:
    """The state of one conversation: the model, how it is prompted and the turns so far."""

    model: object
    tokenizer: object
    template: Optional[str]  # None: raw prompts after BOS, no history
    max_tokens: int = 256
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stop: Sequence[str] = ()
    seed: int = 0
    system: Optional[str] = None  # system prompt (the model's chat template only)
    messages: list[dict] = field(default_factory=list)
    totals: GenerationStats = field(default_factory=GenerationStats)
    turns: int = 0
    # The keys and values of the conversation so far: a turn runs only its new tokens through the model.
    prompt_cache: PromptCache = field(default_factory=PromptCache)

    def reset(self) -> None:
        """Forget the conversation (statistics are kept)."""
        self.messages = []
        self.prompt_cache.clear()

    def prompt_ids(self, text: str) -> tuple[list[int], int]:
        """Token ids for the next reply to ``text`` and how many earlier turns had to be dropped to fit
        the model's context. ``UserError`` when ``text`` alone does not fit or is not UTF-8 text."""
        problem = not_utf8(text)
        if problem:
            raise UserError(f"prompt: {problem}")
        if self.template is None:
            ids = self.tokenizer.encode(text, add_bos=True)
            check_prompt_length(self.model, len(ids))
            return ids, 0
        from ..data.chat_template import CHAT_TEMPLATE_NAME
        from ..data.conversation import generation_prompt_ids
        from ..data.prepare import encode_chat

        def encode(messages: list[dict]) -> list[int]:
            if self.template == CHAT_TEMPLATE_NAME:
                head = [] if self.system is None else [{"role": "system", "content": self.system}]
                return generation_prompt_ids(self.tokenizer, head + messages)
            if self.system is not None:
                raise UserError("a system prompt needs the model's chat template (template 'chat')")
            return encode_chat(self.tokenizer, self.template, messages)[0]

        history = list(self.messages)
        dropped = 0
        while True:
            ids = encode(history + [{"role": "user", "content": text}])
            if len(ids) < context_length(self.model) or not history:
                break
            history = history[2:]  # the oldest user/assistant pair
            dropped += 1
        check_prompt_length(self.model, len(ids))
        if dropped:
            self.messages = history
        return ids, dropped

    def reply(self, text: str, write: Callable[[str], None]) -> GenerationResult:
        """Generate the answer to ``text``, passing each new piece of text to ``write``; remember the turn.

        When earlier turns had to be dropped to fit the context, a note saying so is written first."""
        ids, dropped = self.prompt_ids(text)
        if dropped:
            write(f"(the conversation was too long for the context: dropped its {dropped} oldest turn(s))\n")
        pieces, tokens, step = [], [], None
        reuse = self.prompt_cache if self.template is not None else None  # raw prompts: no history to keep
        for step in generate_stream(self.model, self.tokenizer, ids, self.max_tokens, self.sampler, self.stop,
                                    seed=self.seed + self.turns, prompt_cache=reuse):
            if step.finish_reason != "eos":
                tokens.append(step.token)
            if step.text:
                pieces.append(step.text)
                write(step.text)
        answer = "".join(pieces)
        self.turns += 1
        self.totals.add(step.stats)
        if self.template is not None:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return GenerationResult(tokens, answer, step.finish_reason, step.stats)


def _lines(stream: TextIO, interactive: bool, out: TextIO) -> Iterable[str]:
    """User inputs: ``input()`` with a ``>>>`` prompt in a terminal, else the lines of ``stream``.

    Bytes that are not UTF-8 never stop the session: they come as lone surrogates (``not_utf8``), read
    from the stream's bytes where it has them (a strict decoder would raise and lose its place)."""
    if interactive:
        while True:
            try:
                yield input(">>> ")
            except EOFError:
                out.write("\n")
                return
            except UnicodeDecodeError as e:
                yield e.object.decode("utf-8", "surrogateescape").rstrip("\r\n")
    source = getattr(stream, "buffer", None)
    if source is None:
        for line in stream:
            yield line.rstrip("\n")
        return
    for raw in source:
        yield raw.decode("utf-8", "surrogateescape").rstrip("\n")


def chat_loop(session: ChatSession, stream: Optional[TextIO] = None, out: Optional[TextIO] = None,
              interactive: Optional[bool] = None) -> GenerationStats:
    """Read inputs until ``/quit`` or the end of input; stream every reply to ``out``; return the totals.

    stream, out: default ``sys.stdin`` and ``sys.stdout`` (as they are when called). With piped input (not a
    terminal) each input line is echoed after ``>>> `` so the output reads as a transcript. A ``UserError``
    of one turn (e.g. a message longer than the context, or a line that is not UTF-8 text) is reported on
    one line ``error: ...`` and the session goes on.
    """
    stream = sys.stdin if stream is None else stream
    out = sys.stdout if out is None else out
    if interactive is None:
        interactive = stream.isatty() and out.isatty()
    mode = f"template {session.template!r}" if session.template else "no template (raw prompts after BOS)"
    out.write(f"chat with {mode}; {HELP}\n")
    out.flush()

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    for line in _lines(stream, interactive, out):
        text = line.strip()
        if not interactive and text:
            out.write(f">>> {line.encode('utf-8', 'replace').decode('utf-8')}\n")
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                session.reset()
                out.write("(conversation cleared)\n")
            else:
                out.write(f"{HELP}\n")
            out.flush()
            continue
        try:
            session.reply(text, write)
        except UserError as e:
            out.write(f"error: {e}\n")
        out.write("\n")
        out.flush()
    return session.totals
