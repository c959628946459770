"""The attention seam: the one place that chooses how the model's attention runs.

The model calls ``scaled_dot_product_attention`` with the plain arguments; this picks the variant:

- training on CUDA without a cache (``settings.sdpa_pad``): the query length padded to cuDNN's tile, so
  that MLX differentiates attention with cuDNN's fused backward (``kernels/cuda/sdpa.py``);
- everywhere else, MLX's ``mx.fast.scaled_dot_product_attention`` as it is;
- with ``softcap`` (Gemma 2: scores become ``cap * tanh(scores / cap)`` before the mask), which MLX's fused
  attention cannot apply: the plain formula in MLX operations (``softcapped_attention``), on every backend.

Compiled decoding on CUDA does not come here: its decoder layers run attention inside the fused layer
step (``fused_decode.py``), over the static cache without a mask.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .. import settings
from ..device import on_cuda
from ..kernels.cuda import sdpa
from .mask import Mask


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask, cache=None,
                                 training: bool = False, softcap: Optional[float] = None) -> mx.array:
    """q (B, H, L, hd), k/v (B, Hkv, S, hd) -> (B, H, L, hd). ``mask``: ``"causal"``, a boolean or additive
    array broadcastable to (B, H, L, S), or None; ``cache``: the layer's cache (None in training);
    ``softcap``: soft-capping of the scores (None: none)."""
    if softcap is not None:
        return softcapped_attention(q, k, v, scale, mask, softcap)
    pad = training and cache is None and on_cuda() and settings.current().sdpa_pad
    return sdpa.attention(q, k, v, scale, mask, pad=pad)


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
