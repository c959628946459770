"""Several 4-bit projections of one input in one kernel launch, for few-row decoding on CUDA.

A decoder layer reads q, k and v from the same normed input, and gate and up from the same input again.
Launched as one kernel each (``qmv_cuda.qmv_split``, ``qmv_cuda.qmv_swiglu``, the latter with the SwiGLU
activation in its epilogue), a layer takes 4 launches instead of 7 plus the activation, which matters
when decoding is bound by the work of issuing kernels. No weight is copied or concatenated.

Both helpers return None when the fused path does not apply (not CUDA, training mode, adapters on a
projection, group-wise or non-4-bit weights, too many rows), and the caller runs the layers one by one.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import mlx.core as mx

from ..kernels.cuda import qmv as qmv_cuda
from .quantized_linear import QuantizedLinear


# Benchmark knob: MLX_QLORA_FUSED=0 launches every projection on its own.
_ENABLED = os.environ.get("MLX_QLORA_FUSED", "1") != "0"


def _fusable(layers: Sequence, x: mx.array) -> bool:
    first = layers[0]
    return _ENABLED and all(
        type(layer) is QuantizedLinear and layer.runs_bare_per_row_4bit and layer.in_features == first.in_features
        for layer in layers
    ) and qmv_cuda.supports(x, first.in_features, 4, None)


def fused_projections(layers: Sequence, x: mx.array,
                      shapes: Optional[Sequence[tuple[int, ...]]] = None) -> Optional[list[mx.array]]:
    """``[layer(x) for layer in layers]`` (up to 3 layers) from one launch, or None (see the module doc).

    ``shapes``: the outputs' shapes, if not (..., out_features); any shape holding the same elements in
    row-major order, such as (B, heads, 1, head_dim) for one token per sequence."""
    if not _fusable(layers, x):
        return None
    return qmv_cuda.qmv_split(x, [layer.parts for layer in layers], shapes)


def fused_swiglu(gate, up, x: mx.array) -> Optional[mx.array]:
    """``silu(gate(x)) * up(x)`` from one launch, or None (see the module docstring)."""
    if not _fusable([gate, up], x) or gate.out_features != up.out_features:
        return None
    return qmv_cuda.qmv_swiglu(x, gate.parts, up.parts)
