"""The attention seam: the one place that chooses how the model's attention runs.

The model calls ``scaled_dot_product_attention`` with the plain arguments; this picks the variant:

- without a cache, over ``settings.blockwise_from`` tokens or more: block-wise attention in MLX operations
  (``model/blockwise.py``), whose memory is linear in the length, forward and backward; the mask stays a
  rule (``mask.MaskRule``) and no (L, L) array is built;
- training on CUDA without a cache (``settings.sdpa_pad``): the query length padded to cuDNN's tile, so
  that MLX differentiates attention with cuDNN's fused backward (``kernels/cuda/sdpa.py``);
- everywhere else, MLX's ``mx.fast.scaled_dot_product_attention`` as it is.

Compiled decoding on CUDA does not come here: its decoder layers run attention inside the fused layer
step (``fused_decode.py``), over the static cache without a mask.
"""

from __future__ import annotations

from typing import Union

import mlx.core as mx

from .. import settings
from ..device import on_cuda
from ..kernels.cuda import sdpa
from .blockwise import blockwise_attention
from .mask import Mask, MaskRule

SCORE_BUDGET = 1 << 27  # float32 scores of one chunk of full (not windowed) block-wise attention: 512 MB


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                                 mask: Union[Mask, MaskRule], cache=None, training: bool = False) -> mx.array:
    """q (B, H, L, hd), k/v (B, Hkv, S, hd) -> (B, H, L, hd). ``mask``: a ``MaskRule`` (no cache),
    ``"causal"``, a boolean or additive array broadcastable to (B, H, L, S), or None; ``cache``: the
    layer's cache (None in training)."""
    if isinstance(mask, MaskRule):
        if cache is None and uses_blockwise(mask.length):
            block = blockwise_block(q.shape[0] * q.shape[1], mask.length, mask.window)
            return blockwise_attention(q, k, v, scale, mask.window, mask.segment_ids, mask.attention_mask,
                                       block=block)
        mask = mask.dense()
    pad = training and cache is None and on_cuda() and settings.current().sdpa_pad
    return sdpa.attention(q, k, v, scale, mask, pad=pad)


def uses_blockwise(length: int) -> bool:
    """Whether attention without a cache over ``length`` tokens runs block-wise (``settings.blockwise_from``)."""
    threshold = settings.current().blockwise_from
    return threshold > 0 and length >= threshold


def blockwise_block(rows: int, length: int, window) -> int:
    """Query rows per chunk: ``settings.blockwise_block``, halved (down to 64) while a chunk's float32 scores,
    ``rows`` (B * H) x block x the keys it sees, exceed ``SCORE_BUDGET`` elements."""
    block = settings.current().blockwise_block
    while block > 64 and rows * block * min(length, (window or length) + block) > SCORE_BUDGET:
        block //= 2
    return block
