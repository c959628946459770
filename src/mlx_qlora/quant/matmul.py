"""The quantized-matmul seam: the one place that chooses how ``x @ W.T`` runs for a 4-bit layer.

``quantized_matmul(layer, x)`` (what ``QuantizedLinear.__call__`` does) takes one of three paths, by the
number of input rows (``path``):

- ``"qmv"``: CUDA, per-row 4-bit, at most 8 rows, a layer of at least ``settings.qmv_min_weights``
  weights: our few-row kernel, which reads the packed words and the per-row scales as they are
  (``kernels/cuda/qmv.py``);
- ``"quantized_matmul"``: few rows (decoding; up to ``QMM_MAX_ROWS`` per device type): MLX's
  ``mx.quantized_matmul`` on the packed words, per-row scales expanded into MLX's group layout (cached
  per layer);
- ``"dense"``: more rows (prompts, training): dequantize the whole weight (``dequant.py``) and run one
  dense matmul, whose backward pass dequantizes again instead of keeping the weight
  (``dequant_matmul.py``).

``project(layers, x)`` and ``swiglu(gate, up, x)`` are the model's calls for the projections that read one
input (q, k and v; gate and up): in CUDA inference over bare per-row 4-bit layers, or LoRA layers over
them (the update computed beside the launch and added in it: ``low_rank.py``), they are one launch
each (``settings.fused``), and otherwise one call per layer. ``quantization.py --speed`` measures the
single-layer paths, ``qmv_probe.py --fused`` the fused launches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .. import settings
from ..device import device_type
from ..kernels.cuda import qmv as qmv_cuda
from .dequant import dequantize_weight
from .dequant_matmul import dequantized_matmul_fn
from .low_rank import fused_form
from .quantize import mlx_group_size

# Largest number of input rows for which ``mx.quantized_matmul`` is used, per device type: where it was
# faster than dequantize + matmul (``quantization.py --speed``; the GPU value comes from CUDA, Metal was
# not measured).
QMM_MAX_ROWS = {"cpu": 4, "gpu": 16}


def path(layer, rows: int, dtype: mx.Dtype) -> str:
    """The path a call of ``layer`` (a ``QuantizedLinear``) on ``rows`` input rows in ``dtype`` takes:
    ``"qmv"``, ``"quantized_matmul"`` or ``"dense"`` (see the module docstring)."""
    if qmv_cuda.supports_rows(rows, dtype, layer.in_features, layer.bits, layer.group_size, layer.out_features):
        return "qmv"
    if rows <= QMM_MAX_ROWS[device_type()] and mlx_group_size(layer.in_features, layer.group_size) is not None:
        return "quantized_matmul"
    return "dense"


def quantized_matmul(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a ``QuantizedLinear`` ``layer``: x (..., in) -> (..., out), computed in ``x.dtype``."""
    taken = path(layer, x.size // max(x.shape[-1], 1), x.dtype)
    if taken == "qmv":
        # In training mode the call stays differentiable; in inference it runs bare (less Python).
        return qmv_cuda.qmv(x, *layer.parts, dequantize_weight if layer.training else None)
    if taken == "quantized_matmul":
        scales, biases, group_size = layer.mlx_layout(x.dtype)
        return mx.quantized_matmul(x, layer.weight, scales, biases, transpose=True, group_size=group_size,
                                   bits=layer.bits)
    # dequantize + one dense matmul; the backward pass dequantizes again rather than keep W
    return dequantized_matmul_fn(dequantize_weight, layer.bits, layer.group_size)(x, *layer.parts)


def fuses(layers: Sequence, x: mx.array) -> bool:
    """Whether ``project``/``swiglu`` run ``layers`` on ``x`` in one launch: ``settings.fused`` on, every
    layer a bare per-row 4-bit ``QuantizedLinear`` in inference or a LoRA layer over one in inference
    (``low_rank.fused_form``), all reading the same input size, and ``x`` a call the few-row kernel takes
    (CUDA, at most 8 rows)."""
    first = layers[0]
    return settings.current().fused and all(
        fused_form(layer) is not None and layer.in_features == first.in_features for layer in layers
    ) and qmv_cuda.supports(x, first.in_features, 4, None)


def _fused_parts(layers: Sequence, x: mx.array) -> tuple[list, Optional[list]]:
    """The bases' kernel arrays and the adapters' addends (None where no layer has adapters)."""
    forms = [fused_form(layer) for layer in layers]
    # a LoRA layer's update, cast once where ``prepare_decoding`` ran (``LoRALinear.decoding_stack``)
    addends = [None if low_rank is None else layer.decoding_stack(x.dtype).addends(x)[0]
               for layer, (_, low_rank) in zip(layers, forms)]
    return [base.parts for base, _ in forms], addends if any(a is not None for a in addends) else None


def project(layers: Sequence, x: mx.array, heads: Optional[Sequence[int]] = None) -> list[mx.array]:
    """``[layer(x) for layer in layers]`` for up to three layers of one input, in one launch where
    ``fuses``: x (B, L, in) -> (B, L, out) each.

    ``heads``: one head count n per layer; each output is then split into heads, (B, L, n * hd) ->
    (B, n, L, hd). With one token per sequence the fused launch writes that layout directly (the same
    memory as (B, 1, n * hd))."""
    B, L = x.shape[0], x.shape[1]
    if fuses(layers, x):
        parts, addends = _fused_parts(layers, x)
        if heads is not None and L == 1:
            return qmv_cuda.qmv_split(x, parts, [(B, n, 1, layer.out_features // n) for layer, n in zip(layers, heads)],
                                      addends=addends)
        outs = qmv_cuda.qmv_split(x, parts, addends=addends)
    else:
        outs = [layer(x) for layer in layers]
    if heads is None:
        return outs
    # (B, L, n * hd) -> (B, n, L, hd)
    return [y.reshape(B, L, n, -1).transpose(0, 2, 1, 3) for y, n in zip(outs, heads)]


def swiglu(gate, up, x: mx.array) -> mx.array:
    """``silu(gate(x)) * up(x)``: x (..., in) -> (..., out); one launch where ``fuses``, the activation in
    its epilogue."""
    if fuses([gate, up], x) and gate.out_features == up.out_features:
        (gate_parts, up_parts), addends = _fused_parts([gate, up], x)
        return qmv_cuda.qmv_swiglu(x, gate_parts, up_parts, addends=addends)
    return nn.silu(gate(x)) * up(x)
