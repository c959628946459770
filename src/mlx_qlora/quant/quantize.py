"""Affine k-bit quantization of a weight matrix, per output row or per group along the input axis.

Each row of ``w`` (out, in) is cut into ``n_groups`` groups of ``group_size`` inputs (one group of the whole
row by default, "per-row"). A group with minimum ``lo`` and maximum ``hi`` gets

    scale = (hi - lo) / (2**bits - 1),   bias = lo,   q = round((w - bias) / scale) in [0, 2**bits - 1]

and is restored as ``w ~= scale * q + bias``, so every weight is within half a step (``scale / 2``) of its
original. The integers are packed ``32 // bits`` to a ``uint32`` along the input axis, the first input in
the lowest bits: the same order as MLX's ``mx.quantize``, so ``mx.dequantize`` and ``mx.quantized_matmul``
read our words as they are. MLX only knows groups of 32/64/128 inputs; a per-row layer runs through them
by repeating its one scale and bias for every group of the row (``mlx_group_layout``), which changes no
number.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .. import settings
from .rounding import choose_ranges, codes

SUPPORTED_BITS = (2, 4, 8)  # widths that fill a uint32 exactly
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Expanding a per-row layer prefers group 64: batch-1 decoding through ``quantized_matmul`` was faster
# expanded to 64 than to 128 (``gpu_generate.py``); 64 is also MLX's default. ``settings.expand_group``
# picks one size instead.
MLX_GROUP_SIZES = (64, 128, 32)


def n_groups_for(in_features: int, bits: int = 4, group_size: Optional[int] = None) -> int:
    """Number of scale/bias groups per row; raises ``ValueError`` when the layout is impossible.

    ``group_size`` None means one group per row. ``in_features`` must be a multiple of ``32 // bits``
    (whole ``uint32`` words) and of ``group_size``.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits: {bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size: {group_size} is not supported (per-row: null, or one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
        )
    per_word = 32 // bits
    if in_features < 1 or in_features % per_word:
        raise ValueError(f"in_features: {in_features} is not a positive multiple of {per_word} ({bits}-bit packing)")
    if group_size is None:
        return 1
    if in_features % group_size:
        raise ValueError(f"in_features: {in_features} is not a multiple of group_size {group_size}")
    return in_features // group_size


def quantize(
    w: mx.array,
    bits: int = 4,
    group_size: Optional[int] = None,
    dtype: Optional[mx.Dtype] = None,
    rounding: str = "nearest",
    column_weights: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize ``w`` (out, in) to ``bits`` bits with an affine scale and bias per row or per group.

    Returns ``wq`` uint32 (out, in * bits / 32), ``scales`` and ``biases`` (out, n_groups) in ``dtype``
    (default: ``w``'s dtype). ``rounding`` chooses each group's range (``rounding.py``): ``nearest`` is
    the group's min/max, ``search`` a range searched for a lower error (per row: each input column
    weighed by ``column_weights`` (in,), the weight of the norm the layer reads, where given). The
    statistics are computed in float32; the integers are chosen against the rounded scales and biases that
    will actually be stored.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    n_groups = n_groups_for(in_features, bits, group_size)
    dtype = dtype or w.dtype

    groups = w.astype(mx.float32).reshape(out_features, n_groups, -1)  # (out, n_groups, group)
    scales, biases = choose_ranges(groups, bits, dtype, rounding, per_row=group_size is None,
                                   column_weights=column_weights)  # (out, n_groups, 1)
    q = codes(groups, scales, biases, bits)
    return pack(q.reshape(out_features, in_features), bits), scales.squeeze(-1), biases.squeeze(-1)


def pack(q: mx.array, bits: int = 4) -> mx.array:
    """Integers ``q`` (out, in) in 0..2**bits-1 (any numeric dtype) -> packed uint32 (out, in * bits / 32),
    the first input in the lowest bits."""
    per_word = 32 // bits
    out_features, in_features = q.shape
    q = q.astype(mx.uint32).reshape(out_features, in_features // per_word, per_word)  # (out, words, per_word)
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    return mx.sum(q << shifts, axis=-1).astype(mx.uint32)  # disjoint bits: the sum is a bitwise or


def unpack(wq: mx.array, bits: int = 4) -> mx.array:
    """The integers of packed ``wq`` (out, words) as uint32 (out, words * 32 / bits)."""
    per_word = 32 // bits
    shifts = mx.arange(per_word, dtype=mx.uint32) * bits
    q = (wq[:, :, None] >> shifts) & (2**bits - 1)  # (out, words, per_word)
    return q.reshape(wq.shape[0], -1)


def dequantize(
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int = 4,
    group_size: Optional[int] = None,
    dtype: Optional[mx.Dtype] = None,
) -> mx.array:
    """Restore ``w[o, i] = scales[o, g] * q[o, i] + biases[o, g]`` with ``g = i // group_size``.

    ``wq`` uint32 (out, in * bits / 32); ``scales``, ``biases`` (out, n_groups). Returns (out, in) in
    ``dtype`` (default: the scales' dtype), computed in that dtype.
    """
    dtype = dtype or scales.dtype
    out_features = wq.shape[0]
    in_features = wq.shape[1] * (32 // bits)
    n_groups = n_groups_for(in_features, bits, group_size)
    if scales.shape != (out_features, n_groups) or biases.shape != (out_features, n_groups):
        raise ValueError(
            f"scales/biases: expected shape {(out_features, n_groups)}, got {tuple(scales.shape)} and "
            f"{tuple(biases.shape)}"
        )
    q = unpack(wq, bits).astype(dtype).reshape(out_features, n_groups, -1)  # (out, n_groups, group)
    w = scales.astype(dtype)[..., None] * q + biases.astype(dtype)[..., None]
    return w.reshape(out_features, in_features)


def mlx_group_size(in_features: int, group_size: Optional[int]) -> Optional[int]:
    """The group size MLX's kernels should use for our layout, or None when MLX cannot run it."""
    if group_size is not None:
        return group_size if group_size in MLX_GROUP_SIZES else None
    expand_to = settings.current().expand_group
    if expand_to and in_features % expand_to == 0:
        return expand_to
    for size in MLX_GROUP_SIZES:
        if in_features % size == 0:
            return size
    return None


def mlx_group_layout(
    scales: mx.array, biases: mx.array, in_features: int, group_size: Optional[int] = None
) -> Optional[tuple[mx.array, mx.array, int]]:
    """Scales and biases in the layout of ``mx.dequantize`` / ``mx.quantized_matmul``.

    Per-row ``scales``, ``biases`` (out, 1) are repeated to (out, in / G) for the first MLX group size G
    that divides ``in_features``; grouped ones are returned as they are. Returns ``(scales, biases, G)``
    or None when no MLX group size fits (then use ``dequantize``).
    """
    mlx_size = mlx_group_size(in_features, group_size)
    if mlx_size is None:
        return None
    if group_size is None:
        repeats = in_features // mlx_size
        # mx.repeat gives a broadcast view; MLX's CUDA kernels accept only row-contiguous scales/biases
        scales = mx.contiguous(mx.repeat(scales, repeats, axis=1))  # (out, in / G)
        biases = mx.contiguous(mx.repeat(biases, repeats, axis=1))
    return scales, biases, mlx_size
