"""Text generation with the KV cache: one sequence streamed token by token, or a left-padded batch.

The prompt is processed in chunks of ``prefill_chunk`` tokens (only the last position goes through the
language-model head), then one token per step. While Python handles token ``t`` the device already
computes token ``t + 1`` (``mx.async_eval``). Generation stops at an end-of-sequence id, at a stop
string, after ``max_tokens``, or when the next position would pass the model's context
(``max_position_embeddings``).

A conversation passes a ``PromptCache``: the keys and values of every token fed so far stay with it, and
the next prompt runs only from the first token where it differs from them (normally the new turn), instead
of reading the whole conversation again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import settings
from ..errors import UserError
from ..model.cache import KVCache
from ..model.static_cache import grown_capacity, static_capacity
from .decode_step import DecodeState, decoder_for
from .sampling import KeyStream, SamplerConfig, mark_seen, sample, seen_mask

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of prompt processing and of generation."""

    prompt_tokens: int = 0  # run through the model; the prompt's tokens taken from a ``PromptCache`` not counted
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    reused_tokens: int = 0  # the prompt's tokens whose keys and values came from a ``PromptCache``

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def add(self, other: "GenerationStats") -> None:
        """Accumulate ``other`` into this one (a chat session's totals)."""
        self.prompt_tokens += other.prompt_tokens
        self.prompt_seconds += other.prompt_seconds
        self.generated_tokens += other.generated_tokens
        self.generation_seconds += other.generation_seconds
        self.reused_tokens += other.reused_tokens

    def summary(self) -> str:
        reused = f" | reused: {self.reused_tokens} cached tokens" if self.reused_tokens else ""
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
                f"generation: {self.generated_tokens} tokens, {self.generation_tps:.1f} tokens/s{reused}")


@dataclass
class PromptCache:
    """What a conversation has fed the model: the token ids and their per-layer caches.

    ``generate_stream`` takes the longest common prefix of ``tokens`` and the new prompt from here and
    leaves the caches of everything it fed (prompt and reply) for the next call. ``capacity``: the slot
    count of the last compiled decoding; the next one keeps at least as many (doubling when it must grow),
    so a conversation traces its decoding graph a few times, not every turn."""

    tokens: list[int] = field(default_factory=list)
    caches: Optional[list[KVCache]] = None
    capacity: int = 0

    def clear(self) -> None:
        self.tokens, self.caches, self.capacity = [], None, 0

    def take(self, model, prompt_ids: list[int]) -> tuple[list[KVCache], int]:
        """Caches holding the first n prompt tokens (n < len(prompt_ids), so that one is left to run) and n;
        fresh caches and 0 when nothing can be reused."""
        n = 0
        limit = min(len(self.tokens), len(prompt_ids) - 1)
        while n < limit and self.tokens[n] == prompt_ids[n]:
            n += 1
        caches = self.caches
        # A sliding window that wrapped around holds no earlier positions to cut back to: it is reused only
        # when the new prompt goes on from everything fed.
        if not n or caches is None or any(c.max_size is not None and c.offset > c.max_size and n < c.offset
                                          for c in caches):
            return model.make_cache(), 0
        for c in caches:
            c.offset = n  # positions past n are overwritten by the new prompt; only [:n] is read
        return caches, n

    def keep(self, fed: list[int], caches: list[KVCache], capacity: int = 0) -> None:
        self.tokens, self.caches, self.capacity = fed, caches, max(capacity, self.capacity)


@dataclass
class StreamStep:
    """One generated token. ``text`` is the new text it releases (possibly empty: an incomplete UTF-8
    character or the start of a stop string is held back). ``finish_reason`` is set on the last step:
    ``"eos"``, ``"stop"`` or ``"length"``."""

    token: int
    text: str
    finish_reason: Optional[str]
    stats: GenerationStats


@dataclass
class GenerationResult:
    """A finished generation: ``tokens`` (without the EOS that ended it), ``text`` (cut before a stop string)."""

    tokens: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


def context_length(model) -> int:
    """Positions the model was built for (``max_position_embeddings``)."""
    return int(model.args.max_position_embeddings)


def check_prompt_length(model, n_prompt: int, what: str = "prompt") -> None:
    """``UserError`` for an empty prompt or one longer than the model's context."""
    limit = context_length(model)
    if n_prompt == 0:
        raise UserError(f"{what} is empty: give at least one token (BOS counts)")
    if n_prompt > limit:
        raise UserError(
            f"{what} has {n_prompt} tokens, more than the model's context of {limit} "
            f"(max_position_embeddings in config.json); shorten it"
        )


def eos_token_ids(model, tokenizer) -> set[int]:
    """Ids that end a generation: the tokenizer's EOS and the model config's ``eos_token_id``(s)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_id is not None:
        ids.add(int(tokenizer.eos_id))
    configured = (getattr(model, "config", None) or {}).get("eos_token_id", model.args.eos_token_id)
    for value in configured if isinstance(configured, list) else [configured]:
        if isinstance(value, int):
            ids.add(value)
    return ids


class TextStream:
    """Turns a growing list of token ids into text released piece by piece.

    Text is held back while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in the
    beginning of a stop string; a completed stop string ends the text just before it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # all text released so far
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens) if self.tokenizer is not None else ""

    def add(self, token: int) -> str:
        """Append ``token``; return the newly released text. Sets ``stopped`` on a stop string."""
        self.tokens.append(token)
        full = self._decode()
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        cut = min((i for i in (full.find(s, search_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(full[:cut])
        hold = 0
        if full.endswith("\ufffd"):
            hold = len(full) - len(full.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), hold, -1):
                if full.endswith(s[:k]):
                    hold = k
                    break
        return self._release(full[: len(full) - hold])

    def flush(self) -> str:
        """Release everything still held back (the generation ended)."""
        return "" if self.stopped else self._release(self._decode())

    def _release(self, upto: str) -> str:
        # Released text is never taken back: held-back text is exactly what decoding may still change.
        if len(upto) <= len(self.text):
            return ""
        new = upto[len(self.text):]
        self.text += new
        return new


def _prefill(model, ids: mx.array, cache, chunk: int, position_ids=None, attention_mask=None) -> mx.array:
    """Run ``ids`` (B, L) through the model in chunks; return the logits of the last position (B, V)."""
    L = ids.shape[1]
    hidden = None
    for start in range(0, L, chunk):
        end = min(L, start + chunk)
        kwargs = {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, start:end]
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :end]
        # The prompt pass a few layers at a time (``settings.prefill_eval_layers``; 0: queued at once): a
        # GPU holds each layer's dequantized weights until the queued work that read them has run, so
        # queued at once the pass held most layers' weights together, and a layer at a time was faster
        # too (``gpu_generate.py``'s prefill variants). The same on the CPU.
        hidden = model.hidden_states(ids[:, start:end], cache=cache,
                                     eval_every=settings.current().prefill_eval_layers, **kwargs)  # (B, l, D)
        if end < L:
            mx.eval([c.state for c in cache])
    return model.logits_from_hidden(hidden[:, -1, :]).astype(mx.float32)  # (B, V)


def generate_stream(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    max_tokens: int = 256,
    sampler: Optional[SamplerConfig] = None,
    stop: Sequence[str] = (),
    seed: int = 0,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    eos_ids: Optional[set[int]] = None,
    compiled: bool = True,
    prompt_cache: Optional[PromptCache] = None,
) -> Iterator[StreamStep]:
    """Generate after ``prompt_ids`` (BOS included if wanted), yielding one ``StreamStep`` per token.

    ``tokenizer`` may be None (no text; ids only). ``eos_ids`` default: ``eos_token_ids(model, tokenizer)``.
    The EOS token ends the stream and is yielded (with ``finish_reason="eos"``) but releases no text.
    ``compiled``: decode through ``CompiledDecoder`` (one traced graph per step, same numbers) instead of
    building every step's graph in Python. ``prompt_cache``: reuse and keep the keys and values of a
    conversation (see ``PromptCache``); it is updated when the stream ends or is closed.
    """
    sampler = sampler or SamplerConfig()
    prompt_ids = [int(t) for t in prompt_ids]
    check_prompt_length(model, len(prompt_ids))
    if max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    eos_ids = eos_token_ids(model, tokenizer) if eos_ids is None else set(eos_ids)
    # every position fed to the model stays below max_position_embeddings; the last token is never fed
    max_tokens = min(max_tokens, context_length(model) - len(prompt_ids) + 1)
    vocab = model.args.vocab_size
    keys = KeyStream(seed)
    stream = TextStream(tokenizer, stop)
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    use_seen = sampler.repetition_penalty != 1.0

    start = time.perf_counter()
    cache, reused = prompt_cache.take(model, prompt_ids) if prompt_cache is not None else (model.make_cache(), 0)
    stats.prompt_tokens, stats.reused_tokens = len(prompt_ids) - reused, reused
    prompt = mx.array(prompt_ids, dtype=mx.int32)[None]  # (1, L)
    seen = seen_mask(prompt, vocab) if use_seen else None
    logits = _prefill(model, prompt[:, reused:], cache, prefill_chunk)
    token = sample(logits, sampler, None if sampler.greedy else keys.next(), seen)  # (1,)
    state = None
    if compiled and max_tokens > 1:
        decoder = decoder_for(model)
        needed = len(prompt_ids) + max_tokens
        widest = _widest_window(cache)
        capacity = grown_capacity(needed, widest, prompt_cache.capacity if prompt_cache is not None else 0)
        state = DecodeState.from_caches(cache, needed, capacity)

        def forward(tokens):
            return decoder.step(state, tokens)
    else:
        def forward(tokens):
            return model(tokens, cache=cache)[:, -1, :]
    mx.eval(token)
    stats.prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generated: list[int] = []
    try:
        yield from _decode_loop(forward, token, max_tokens, sampler, keys, seen, use_seen, eos_ids, stream,
                                stats, start, generated)
    finally:  # also when the caller stops reading: the caches hold what was fed
        if prompt_cache is not None:
            fed = prompt_ids + generated
            if state is not None:
                caches = state.to_caches([c.max_size for c in cache])
                prompt_cache.keep(fed[: caches[0].offset], caches, state.capacity)
            else:
                prompt_cache.keep(fed[: cache[0].offset], cache)


def _decode_loop(forward, token, max_tokens, sampler, keys, seen, use_seen, eos_ids, stream, stats, start,
                 generated: list[int]) -> Iterator[StreamStep]:
    """The token-by-token part of ``generate_stream``; appends each token handed out to ``generated``."""
    for n in range(1, max_tokens + 1):
        if n < max_tokens:  # compute the next token while this one is handed out
            if use_seen:
                seen = mark_seen(seen, token)
            logits = forward(token[:, None])
            next_token = sample(logits, sampler, None if sampler.greedy else keys.next(), seen)
            mx.async_eval(next_token)
        value = int(token.item())
        generated.append(value)
        stats.generated_tokens = n
        stats.generation_seconds = time.perf_counter() - start
        if value in eos_ids:
            yield StreamStep(value, stream.flush(), "eos", stats)
            return
        text = stream.add(value)
        if stream.stopped:
            yield StreamStep(value, text, "stop", stats)
            return
        if n == max_tokens:
            yield StreamStep(value, text + stream.flush(), "length", stats)
            return
        yield StreamStep(value, text, None, stats)
        token = next_token


def generate(model, tokenizer, prompt_ids: Sequence[int], max_tokens: int = 256,
             sampler: Optional[SamplerConfig] = None, stop: Sequence[str] = (), seed: int = 0,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, eos_ids: Optional[set[int]] = None,
             compiled: bool = True) -> GenerationResult:
    """``generate_stream`` run to the end: the tokens (no EOS), the text and the statistics."""
    tokens: list[int] = []
    text = ""
    step = None
    for step in generate_stream(model, tokenizer, prompt_ids, max_tokens, sampler, stop, seed, prefill_chunk, eos_ids,
                                compiled):
        if step.finish_reason != "eos":
            tokens.append(step.token)
        text += step.text
    return GenerationResult(tokens, text, step.finish_reason, step.stats)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad prompts to one length: ``input_ids``, ``attention_mask`` (0 on padding) and
    ``position_ids`` (0, 1, ... from each row's first real token), all (B, S) int32."""
    S = max(len(p) for p in prompts)
    ids = np.full((len(prompts), S), pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), S), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, S - len(prompt):] = prompt
            mask[row, S - len(prompt):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def _widest_window(cache) -> Optional[int]:
    """The window that sizes static caches: the widest layer's (layers may differ: Qwen2's
    max_window_layers; narrower ones keep their own, ``DecodeState.from_caches``), None if any has none."""
    return None if any(c.max_size is None for c in cache) else max(c.max_size for c in cache)


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 256,
    sampler: Optional[SamplerConfig] = None,
    stop: Sequence[str] = (),
    seed: int = 0,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    eos_ids: Optional[set[int]] = None,
    compiled: bool = True,
) -> list[GenerationResult]:
    """Generate for several prompts at once (left padding, attention mask, per-row positions).

    ``compiled``: the decoding steps replay one compiled graph over static caches (``decode_step``), the
    left padding as a mask over the slots; else each step runs operation by operation.

    Each row stops on its own (EOS, stop string, ``max_tokens`` or the context); the batch ends when every
    row has. Greedy results equal ``generate`` on each prompt alone. ``stats`` of every result are the
    batch's totals (prompt tokens without padding, generated tokens of all rows).
    """
    sampler = sampler or SamplerConfig()
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        return []
    for index, prompt in enumerate(prompts):
        check_prompt_length(model, len(prompt), what=f"prompt {index}")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    eos_ids = eos_token_ids(model, tokenizer) if eos_ids is None else set(eos_ids)
    limit = context_length(model)
    row_max = [min(max_tokens, limit - len(p) + 1) for p in prompts]
    pad_id = getattr(tokenizer, "pad_id", None) or 0  # any id will do: padding is masked out
    B, vocab = len(prompts), model.args.vocab_size
    keys = KeyStream(seed)
    use_seen = sampler.repetition_penalty != 1.0
    ids_np, mask_np, pos_np = left_pad(prompts, pad_id)
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))

    cache = model.make_cache()
    start = time.perf_counter()
    attention_mask = mx.array(mask_np)
    seen = seen_mask(mx.array(ids_np), vocab, attention_mask) if use_seen else None
    logits = _prefill(model, mx.array(ids_np), cache, prefill_chunk, mx.array(pos_np), attention_mask)
    token = sample(logits, sampler, None if sampler.greedy else keys.next(), seen)  # (B,)
    mx.eval(token)
    stats.prompt_seconds = time.perf_counter() - start
    start = time.perf_counter()

    next_position = mx.array([len(p) for p in prompts], dtype=mx.int32)  # (B,)
    ones = mx.ones((B, 1), dtype=mx.int32)
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    reasons: list[Optional[str]] = [None] * B
    steps = max(row_max)
    state = None
    needed = ids_np.shape[1] + steps
    capacity = static_capacity(needed, _widest_window(cache))
    # compiled where the static slots hold the whole padded prompt (a window narrower than the prompt
    # decodes operation by operation: its ring would need the padding of positions it no longer holds)
    if compiled and steps > 1 and capacity >= ids_np.shape[1]:
        decoder = decoder_for(model)
        state = DecodeState.from_caches(cache, needed, capacity)
        slots = np.ones((B, state.capacity), dtype=np.int32)  # every slot to come is a real token
        slots[:, : mask_np.shape[1]] = mask_np
        slot_mask = mx.array(slots)  # (B, capacity), by slot position as the eager mask is
    for n in range(1, steps + 1):
        if n < steps:
            if use_seen:
                seen = mark_seen(seen, token)
            if state is not None:
                logits = decoder.step(state, token[:, None], next_position[:, None], slot_mask)
            else:
                attention_mask = mx.concatenate([attention_mask, ones], axis=1)
                logits = model(token[:, None], cache=cache, position_ids=next_position[:, None],
                               attention_mask=attention_mask)[:, -1, :]
            next_position = next_position + 1
            next_token = sample(logits, sampler, None if sampler.greedy else keys.next(), seen)
            mx.async_eval(next_token)
        values = np.array(token).tolist()
        for row, value in enumerate(values):
            if reasons[row] is not None:
                continue
            stats.generated_tokens += 1
            if value in eos_ids:
                reasons[row] = "eos"
                streams[row].flush()
                continue
            streams[row].add(value)
            if streams[row].stopped:
                reasons[row] = "stop"
            elif n >= row_max[row]:
                reasons[row] = "length"
                streams[row].flush()
        stats.generation_seconds = time.perf_counter() - start
        if all(r is not None for r in reasons):
            break
        token = next_token
    return [GenerationResult(s.tokens, s.text, r, stats) for s, r in zip(streams, reasons)]
