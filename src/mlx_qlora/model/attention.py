"""The attention seam: the one place that chooses how the model's attention runs.

The model calls ``scaled_dot_product_attention`` with the plain arguments; this picks the variant:

- without a cache where cuDNN's fused kernel runs (``sdpa.fused_kernel``), with a sliding window narrower
  than the sequence (Mistral v0.1 past 4,096 tokens), at any length unless ``settings.attention_chunk_up_to``
  bounds it: the window as a band of chunks, each through MLX's fused attention (``model/banded.py``),
  memory linear in the length at the fused kernel's speed (``settings.attention_chunk``);
- without a cache, over ``settings.blockwise_from`` tokens or more, where the plain path's scores would not
  fit in ``settings.blockwise_share`` of MLX's memory limit: block-wise attention in MLX operations
  (``model/blockwise.py``), whose memory is linear in the length, forward and backward; the mask stays a
  rule (``mask.MaskRule``) and no (L, L) array is built; a soft-cap (below) is applied inside each chunk;
- training on CUDA without a cache (``settings.sdpa_pad``): the query length padded to cuDNN's tile, so
  that MLX differentiates attention with cuDNN's fused backward (``kernels/cuda/sdpa.py``);
- everywhere else, MLX's ``mx.fast.scaled_dot_product_attention`` as it is;
- with ``softcap`` (Gemma 2: scores become ``cap * tanh(scores / cap)`` before the mask), which MLX's fused
  attention cannot apply, below the block-wise threshold or with a cache: the plain formula in MLX
  operations (``softcapped_attention``), on every backend.

Causal attention without a window, segments or padding never goes block-wise where cuDNN's fused kernel
runs it (``sdpa.fused_kernel``: CUDA on compute capability 8.0 or newer): it holds no scores there,
forward or backward; past ``settings.causal_call_pairs`` query-key pairs (a 32,768-token sequence's) it runs
as chunks of queries, each one call against the keys before it (``model/causal_chunks.py``).

Compiled decoding on CUDA does not come here: its decoder layers run attention inside the fused layer
step (``fused_decode.py``), over the static cache without a mask.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

from .. import settings
from ..device import on_cuda
from ..kernels.cuda import sdpa
from .banded import banded_attention
from .blockwise import blockwise_attention
from .causal_chunks import chunk_rows, chunked_causal_attention
from .mask import Mask, MaskRule

SCORE_BUDGET = 1 << 27  # float32 scores of one chunk of full (not windowed) block-wise attention: 512 MB


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                                 mask: Union[Mask, MaskRule], cache=None, training: bool = False,
                                 softcap: Optional[float] = None) -> mx.array:
    """q (B, H, L, hd), k/v (B, Hkv, S, hd) -> (B, H, L, hd). ``mask``: a ``MaskRule`` (no cache),
    ``"causal"``, a boolean or additive array broadcastable to (B, H, L, S), or None; ``cache``: the
    layer's cache (None in training); ``softcap``: soft-capping of the scores (None: none)."""
    if isinstance(mask, MaskRule):
        rows = q.shape[0] * q.shape[1]  # B * H
        fused = softcap is None and sdpa.fused_kernel(q)
        if cache is None and fused and uses_banded(mask):
            return banded_attention(q, k, v, scale, mask, settings.current().attention_chunk)
        if cache is None and fused and mask.causal_only() and uses_causal_chunks(mask.length):
            chunk = chunk_rows(mask.length, settings.current().causal_call_pairs)
            return chunked_causal_attention(q, k, v, scale, chunk)
        if cache is None and not (fused and mask.causal_only()) and uses_blockwise(mask.length, rows,
                                                                                   q.dtype.size):
            block = blockwise_block(rows, mask.length, mask.window)
            return blockwise_attention(q, k, v, scale, mask.window, mask.segment_ids, mask.attention_mask,
                                       block=block, softcap=softcap)
        mask = mask.dense()
    if softcap is not None:
        return softcapped_attention(q, k, v, scale, mask, softcap)
    pad = training and cache is None and on_cuda() and settings.current().sdpa_pad
    return sdpa.attention(q, k, v, scale, mask, pad=pad)


def uses_banded(rule: MaskRule) -> bool:
    """Whether attention under ``rule`` runs as a band of chunks (``model/banded.py``): a window narrower than
    the sequence, ``settings.attention_chunk`` on and the length within ``settings.attention_chunk_up_to`` (the
    caller checks the backend and shapes)."""
    s = settings.current()
    if s.attention_chunk <= 0 or rule.window is None or rule.length <= rule.window:
        return False
    return s.attention_chunk_up_to <= 0 or rule.length <= s.attention_chunk_up_to


def uses_causal_chunks(length: int) -> bool:
    """Whether causal attention over ``length`` tokens runs as chunks of queries (``model/causal_chunks.py``):
    one call would cover more query-key pairs than ``settings.causal_call_pairs`` (the caller checks the
    backend, the shapes and that the mask is plainly causal)."""
    pairs = settings.current().causal_call_pairs
    return pairs > 0 and length * length > pairs


def plain_scores_bytes(rows: int, length: int, itemsize: int) -> int:
    """What the plain path's attention holds at its peak, as counted by ``uses_blockwise``: two (rows, L, L)
    arrays (scores and probabilities; rows = B * H) of ``itemsize`` bytes."""
    return 2 * rows * length * length * itemsize


def uses_blockwise(length: int, rows: int = 1, itemsize: int = 4) -> bool:
    """Whether attention without a cache over ``length`` tokens (``rows`` = B * H query rows of ``itemsize``
    bytes) runs block-wise: from ``settings.blockwise_from`` tokens on, where ``plain_scores_bytes`` exceeds
    ``settings.blockwise_share`` of ``mx.get_memory_limit()`` (always, with a share of 0)."""
    s = settings.current()
    if s.blockwise_from <= 0 or length < s.blockwise_from:
        return False
    if s.blockwise_share <= 0:
        return True
    return plain_scores_bytes(rows, length, itemsize) > s.blockwise_share * mx.get_memory_limit()


def blockwise_block(rows: int, length: int, window) -> int:
    """Query rows per chunk: ``settings.blockwise_block``, halved (down to 64) while a chunk's float32 scores,
    ``rows`` (B * H) x block x the keys it sees, exceed ``SCORE_BUDGET`` elements."""
    block = settings.current().blockwise_block
    while block > 64 and rows * block * min(length, (window or length) + block) > SCORE_BUDGET:
        block //= 2
    return block


def softcapped_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask,
                         softcap: float) -> mx.array:
    """Attention whose scores are ``softcap * tanh(q.k * scale / softcap)``, then masked, softmax in
    float32 (as transformers' eager Gemma 2 attention). Shapes as ``scaled_dot_product_attention``."""
    B, H, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    q = q.reshape(B, n_kv, H // n_kv, L, D)  # query heads grouped by the key/value head they share
    scores = (q * scale) @ k[:, :, None].swapaxes(-1, -2)  # (B, Hkv, G, L, S)
    scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):  # "causal": the L queries are the last L of the S positions
        mask = mx.arange(S)[None, :] <= mx.arange(S - L, S)[:, None]  # (L, S)
    if mask is not None:
        if mask.ndim == 4:  # (B, 1 or H, L, S) -> (B, 1 or Hkv, 1 or G, L, S)
            heads = (n_kv, H // n_kv) if mask.shape[1] == H and H > 1 else (1, 1)
            mask = mask.reshape(mask.shape[0], *heads, L, S)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=scores.dtype))
        else:
            scores = scores + mask
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    out = weights @ v[:, :, None]  # (B, Hkv, G, L, D)
    return out.reshape(B, H, L, D)
