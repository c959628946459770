"""The attention seam: the one place that chooses how the model's attention runs.

The model calls ``scaled_dot_product_attention`` with the plain arguments; this picks the variant:

- training on CUDA without a cache (``settings.sdpa_pad``): the query length padded to cuDNN's tile, so
  that MLX differentiates attention with cuDNN's fused backward (``kernels/cuda/sdpa.py``);
- everywhere else, MLX's ``mx.fast.scaled_dot_product_attention`` as it is.

Compiled decoding on CUDA does not come here: its decoder layers run attention inside the fused layer
step (``fused_decode.py``), over the static cache without a mask.
"""

from __future__ import annotations

import mlx.core as mx

from .. import settings
from ..device import on_cuda
from ..kernels.cuda import sdpa
from .mask import Mask


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask, cache=None,
                                 training: bool = False) -> mx.array:
    """q (B, H, L, hd), k/v (B, Hkv, S, hd) -> (B, H, L, hd). ``mask``: ``"causal"``, a boolean or additive
    array broadcastable to (B, H, L, S), or None; ``cache``: the layer's cache (None in training)."""
    pad = training and cache is None and on_cuda() and settings.current().sdpa_pad
    return sdpa.attention(q, k, v, scale, mask, pad=pad)
