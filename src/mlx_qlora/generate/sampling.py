"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p.

Pure functions of arrays, with the definitions of ``transformers``' logits processors and in their order:
repetition penalty, then temperature, top-k, top-p and min-p. Temperature 0 means greedy (argmax of the
penalised logits). Randomness comes only from an explicit ``mx.random`` key, so a seed fixes the output.

Shapes: ``logits`` (B, V); ``seen`` (B, V) boolean, True for every token id already in the sequence
(prompt included, as transformers does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..config import number

NEG_INF = float("-inf")


@dataclass
class SamplerConfig:
    """How the next token is chosen. The defaults give greedy decoding."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the sequence

    def __post_init__(self):
        self.temperature = number("temperature", self.temperature, at_least=0)
        self.top_k = number("top_k", self.top_k, integer=True, at_least=0)
        self.top_p = number("top_p", self.top_p, above=0, at_most=1)
        self.min_p = number("min_p", self.min_p, at_least=0, at_most=1)
        self.repetition_penalty = number("repetition_penalty", self.repetition_penalty, above=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def seen_mask(token_ids: mx.array, vocab_size: int, valid: Optional[mx.array] = None) -> mx.array:
    """(B, T) token ids -> (B, V) boolean, True where an id occurs; ``valid`` (B, T) leaves out padding."""
    B = token_ids.shape[0]
    token_ids = token_ids.astype(mx.int32)
    if valid is not None:  # padding writes into an extra column that is dropped
        token_ids = mx.where(valid.astype(mx.bool_), token_ids, vocab_size)
    seen = mx.zeros((B, vocab_size + 1), dtype=mx.bool_)
    seen = mx.put_along_axis(seen, token_ids, mx.array(True), axis=-1)
    return seen[:, :vocab_size]


def mark_seen(seen: mx.array, tokens: mx.array) -> mx.array:
    """Add one new token per row: seen (B, V), tokens (B,) -> (B, V)."""
    return seen | (mx.arange(seen.shape[-1])[None, :] == tokens[:, None])


def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """Seen tokens: a positive logit is divided by ``penalty``, a negative one multiplied (CTRL's rule)."""
    if penalty == 1.0:
        return logits
    penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, penalised, logits)


def apply_temperature(logits: mx.array, temperature: float) -> mx.array:
    """``logits / temperature`` (temperature > 0)."""
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep logits >= the k-th largest of each row (ties at the boundary are kept); the rest become -inf."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = mx.partition(logits, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]  # (B, 1)
    return mx.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filtering: drop the least likely tokens whose probabilities sum to at most ``1 - p``.

    The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    order = mx.argsort(logits, axis=-1)  # ascending
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    cumulative = mx.cumsum(mx.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - p)
    keep_last = mx.arange(logits.shape[-1]) == logits.shape[-1] - 1
    remove_sorted = remove_sorted & ~keep_last
    remove = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, remove_sorted, axis=-1)
    return mx.where(remove, NEG_INF, logits)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below ``min_p`` times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = mx.softmax(logits, axis=-1)
    threshold = min_p * probs.max(axis=-1, keepdims=True)
    remove = probs < threshold
    # the top token always survives (it could fail only through rounding when min_p == 1)
    remove = remove & (mx.arange(logits.shape[-1])[None, :] != mx.argmax(logits, axis=-1, keepdims=True))
    return mx.where(remove, NEG_INF, logits)


def process_logits(logits: mx.array, config: SamplerConfig, seen: Optional[mx.array] = None) -> mx.array:
    """All filters of ``config`` in transformers' order, in float32: (B, V) -> (B, V).

    With temperature 0 only the repetition penalty is applied (greedy decoding takes the argmax of that).
    """
    logits = logits.astype(mx.float32)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    logits = apply_temperature(logits, config.temperature)
    logits = apply_top_k(logits, config.top_k)
    logits = apply_top_p(logits, config.top_p)
    return apply_min_p(logits, config.min_p)


def sample(logits: mx.array, config: SamplerConfig, key: Optional[mx.array] = None,
           seen: Optional[mx.array] = None) -> mx.array:
    """The next token of each row: logits (B, V) -> (B,) int32. ``key`` is needed unless greedy."""
    processed = process_logits(logits, config, seen)
    if config.greedy:
        return mx.argmax(processed, axis=-1).astype(mx.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs an mx.random key")
    return mx.random.categorical(processed, axis=-1, key=key).astype(mx.int32)


class KeyStream:
    """Successive independent ``mx.random`` keys derived from one seed."""

    def __init__(self, seed: int):
        self._key = mx.random.key(seed)

    def next(self) -> mx.array:
        self._key, sub = mx.random.split(self._key)
        return sub
