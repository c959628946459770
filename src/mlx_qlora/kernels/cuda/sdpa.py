"""Training attention on CUDA: the sequence padded to a multiple of 128 so that MLX's cuDNN backward runs.

MLX's CUDA backend differentiates ``mx.fast.scaled_dot_product_attention`` with cuDNN's fused flash
backward only when the query length is a multiple of 128 (cuDNN's tile). Otherwise the gradient goes
through the composed formula, which materializes the (B, H, L, L) scores several times over. Training
sequences rarely have such lengths: a row of 2048 tokens is 2047 inputs once shifted for next-token
prediction. Padded to the tile, forward + backward of one layer's attention runs several times faster
(``sdpa_probe.py`` measures one layer, ``step_probe.py``'s ``unpadded`` variant a training step); the step
gains from it only where the host does not wait for the gradients before building the update: otherwise
the host's work, not the GPU's, sets the step's length.

A boolean mask goes to the kernel as an additive one in the inputs' dtype, at its own shape: MLX turns a
boolean mask into an additive one after broadcasting it to (B, H, L, S), which materializes B * H * L * S
half-precision values (4.3 GB for one 8,192-token row of a 32-head model), while an additive mask is
handed to cuDNN as the broadcast view it is (``additive``; ``on_cuda`` callers only: on other backends
MLX takes boolean masks as they are).

Padding changes nothing in the result. The padded keys come after every real query: a causal mask hides
them already, and an array mask gets ``False`` there. Each padded query sees only itself, so its softmax
is defined, and its rows are sliced off (their cotangent is zero). ``model/attention.py`` asks for ``pad``
when training on CUDA without a cache (``settings.sdpa_pad``); masks that are neither ``"causal"`` nor
boolean arrays are left alone.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

from ...device import on_cuda
from . import nvrtc

TILE = 128  # cuDNN's flash backward needs the query length to be a multiple of this


def fused_kernel(q: mx.array) -> bool:
    """Whether MLX runs attention over queries like ``q`` (B, H, L, D) with cuDNN's fused kernel, forward and
    backward (the backward for L a multiple of ``TILE``): CUDA on a GPU of compute capability 8.0 or newer,
    half precision, a head dimension that is a multiple of 8 up to 128 (MLX's own conditions). Elsewhere
    MLX composes attention from operations that hold the (B, H, L, S) scores."""
    D = q.shape[-1]
    return (q.dtype in (mx.bfloat16, mx.float16) and D % 8 == 0 and D <= 128 and on_cuda()
            and nvrtc.capability()[0] >= 8)


def padded_length(length: int) -> int:
    """``length`` rounded up to a multiple of ``TILE``."""
    return -(-length // TILE) * TILE


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Union[None, str, mx.array],
              pad: bool) -> mx.array:
    """q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, H, L, D): ``mx.fast.scaled_dot_product_attention``, with
    ``pad`` computed on L rounded up to a multiple of ``TILE`` (see the module docstring)."""
    L = q.shape[2]
    mask_p = padded_mask(mask, L) if pad and L % TILE and k.shape[2] == L else None
    if mask_p is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=additive(mask, q.dtype))
    padded = padded_length(L)
    out = mx.fast.scaled_dot_product_attention(*(pad_sequence(x, padded) for x in (q, k, v)), scale=scale,
                                               mask=additive(mask_p, q.dtype))
    return out[:, :, :L, :]


def pad_sequence(x: mx.array, length: int) -> mx.array:
    """(B, H, L, D) -> (B, H, ``length``, D): zeros after the sequence."""
    return mx.pad(x, [(0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)])


def additive(mask: Union[None, str, mx.array], dtype: mx.Dtype) -> Union[None, str, mx.array]:
    """A boolean mask as 0 where allowed and -inf elsewhere in ``dtype``, at the mask's own shape, on CUDA
    (see the module docstring); any other mask, or any mask elsewhere, as it is. Every row must allow a
    key (``model/mask.py``'s rule does: a query always sees itself)."""
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_ or not on_cuda():
        return mask
    return additive_of(mask, dtype)


def additive_of(mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """Boolean ``mask`` -> 0 / -inf in ``dtype``, same shape."""
    return mx.where(mask, mx.array(0.0, dtype=dtype), mx.array(-float("inf"), dtype=dtype))


def padded_mask(mask: Union[None, str, mx.array], length: int) -> Optional[Union[str, mx.array]]:
    """The mask over the padded length, or None where padding does not apply."""
    if isinstance(mask, str):
        return mask if mask == "causal" else None
    if mask is None or mask.dtype != mx.bool_ or mask.shape[-2:] != (length, length):
        return None
    extra = padded_length(length) - length
    widths = [(0, 0)] * (mask.ndim - 2) + [(0, extra), (0, extra)]
    idx = mx.arange(length + extra)
    own = (idx[:, None] == idx[None, :]) & (idx >= length)[:, None]  # padded queries see themselves only
    return mx.pad(mask, widths, constant_values=False) | own
