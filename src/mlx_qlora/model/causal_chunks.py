"""Causal attention over long sequences as chunks of queries, each through MLX's fused attention.

One call of ``mx.fast.scaled_dot_product_attention`` (CUDA's cuDNN kernel) ran one layer's causal attention
over 32,768 tokens in 2.02 GB above its inputs, forward and backward, and ran out of 80 GB at 65,536
(an H100, MLX 0.32.4, Llama 3 8B's heads; ``probes/long_attention_probe.py``'s ``causal`` path): memory
that a flash kernel should keep linear jumps once a call covers more query-key pairs than 32,768 tokens do.
So a longer sequence runs as calls of ``C`` queries each, chunk j (queries [jC, (j+1)C)) against the keys
[0, (j+1)C) with ``mask="causal"``: MLX aligns a causal mask to the last query when there are fewer
queries than keys (cuDNN's bottom-right diagonal; the same rule on every backend), so each call is exact
and the work is the causal triangle's, not more. ``C`` is the largest multiple of 128 whose calls cover
at most ``pairs`` query-key pairs (``settings.causal_call_pairs``, 2**30: a 32,768-token sequence's).

The sequence is first padded with zeros to a multiple of 128 (cuDNN's backward tile, as
``kernels/cuda/sdpa.py`` does): padded keys come after every real query, so causality hides them, and the
padded queries' rows are dropped. The queries are cut by ``model/split.py`` (one concatenation in the
gradient); each call's keys and values are a slice of the sequence's, so the backward pass makes one
key-sized gradient per chunk (a quarter of the queries' size under Llama 3's grouped heads).

``model/attention.py`` takes this path on CUDA only, where the calls are fused forward and backward; the
CPU tests call it directly against one call of the same attention.
"""

from __future__ import annotations

import mlx.core as mx

from ..kernels.cuda.sdpa import TILE, pad_sequence, padded_length
from .split import split


def chunk_rows(length: int, pairs: int) -> int:
    """C: query rows per call over a sequence of ``length`` tokens, the largest multiple of ``TILE`` whose
    calls cover at most ``pairs`` query-key pairs (``TILE`` at least; ``length`` padded if one call does)."""
    padded = padded_length(length)
    if padded * padded <= pairs:
        return padded
    return max(TILE, pairs // padded // TILE * TILE)


def chunked_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, chunk: int) -> mx.array:
    """q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, H, L, D): causal attention, ``chunk`` (a multiple of
    ``TILE``) query rows per call of the fused kernel (see the module docstring)."""
    L = q.shape[2]
    padded = padded_length(L)
    if padded != L:
        q, k, v = (pad_sequence(x, padded) for x in (q, k, v))
    ends = list(range(chunk, padded, chunk)) + [padded]
    pieces = split(q, ends[:-1], axis=2)  # (B, H, C, D) each, the last one possibly shorter
    outs = [mx.fast.scaled_dot_product_attention(piece, k[:, :, :end], v[:, :, :end], scale=scale, mask="causal")
            for piece, end in zip(pieces, ends)]
    out = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return out[:, :, :L] if padded != L else out
