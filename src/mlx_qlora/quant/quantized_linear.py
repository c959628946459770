"""``QuantizedLinear``: a frozen linear layer (no bias) whose weight is stored in 4 bits.

Parameters, named as a checkpoint stores them: ``weight`` uint32 (out, in * bits / 32), ``scales`` and
``biases`` (out, n_groups), with n_groups = 1 per row (the default) or in / group_size.

The forward pass computes in the input's dtype and picks its path by the number of input rows
(``benchmarks/quantization.py --speed`` measures both):
- few rows (decoding): ``mx.quantized_matmul`` reads the packed words directly, with per-row scales
  expanded into MLX's group layout. On a 2-core x86 CPU (float32) it took 15 ms against 66 ms for
  dequantize + matmul on a 4096x4096 layer with one row and broke even near 4 rows; on an H100 (CUDA,
  bfloat16) it won up to 16 rows (0.13 against 0.27 ms for 14336x4096 at one row);
- more rows (prefill, training): dequantize the whole weight, then one dense matmul. For 4096 rows on the
  H100 that took 0.92 ms against 3.5 ms for ``quantized_matmul``.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..device import device_type
from ..kernels.cuda import dequant as dequant_cuda
from ..kernels.cuda import qmv as qmv_cuda
from .dequant_matmul import dequantized_matmul_fn
from .quantize import dequantize, mlx_group_layout, mlx_group_size, n_groups_for, quantize

# Largest number of input rows for which ``mx.quantized_matmul`` is used, per device type (measured: see
# the module docstring; the GPU value comes from CUDA, Metal was not measured).
QMM_MAX_ROWS = {"cpu": 4, "gpu": 16}


def dequantize_weight(
    wq: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: Optional[int], dtype: mx.Dtype
) -> mx.array:
    """The full weight (out, in) in ``dtype``, by the fastest exact path of the current device.

    For half-precision outputs on the GPU, MLX's fused ``mx.dequantize`` runs our layout (0.3 ms against
    1.1 ms for our own ops on a 14336x4096 layer, H100); it computes in the scales' dtype, so float32
    outputs take our own ops, which are exact. On the CPU our own unpacking was faster (63 ms against
    104 ms for 4096x4096). Dtypes that differ from the scales' are reached through float32, so no scale
    is rounded to a coarser format before it multiplies.
    """
    in_features = wq.shape[1] * (32 // bits)
    if dequant_cuda.supports(wq, bits, group_size, dtype):  # CUDA, unless MLX_QLORA_DEQUANT=mlx
        return dequant_cuda.dequantize(wq, scales, biases, dtype)
    if device_type() == "gpu" and dtype != mx.float32:
        layout = mlx_group_layout(scales, biases, in_features, group_size)
        if layout is not None:
            mlx_scales, mlx_biases, mlx_size = layout
            return mx.dequantize(wq, mlx_scales, mlx_biases, group_size=mlx_size, bits=bits, dtype=dtype)
    compute = dtype if dtype in (scales.dtype, mx.float32) else mx.float32
    return dequantize(wq, scales, biases, bits, group_size, dtype=compute).astype(dtype)


class QuantizedLinear(nn.Module):
    """``y = x @ W.T`` with ``W`` stored as ``bits``-bit integers and an affine scale/bias per row or group.

    Args:
        in_features, out_features: the shape of the full-precision weight is (out_features, in_features).
        bits: 2, 4 or 8.
        group_size: None for one scale and bias per output row, or 32/64/128 inputs per group.
        dtype: dtype of ``scales`` and ``biases``.

    The arrays start as zeros so that a checkpoint loader can fill them by name; the layer is frozen.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: Optional[int] = None,
        dtype: mx.Dtype = mx.float32,
    ):
        super().__init__()
        n_groups = n_groups_for(in_features, bits, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.weight = mx.zeros((out_features, in_features * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((out_features, n_groups), dtype=dtype)
        self.biases = mx.zeros((out_features, n_groups), dtype=dtype)
        self.freeze()

    @classmethod
    def from_linear(
        cls, linear: nn.Module, bits: int = 4, group_size: Optional[int] = None, dtype: Optional[mx.Dtype] = None
    ) -> "QuantizedLinear":
        """Quantize a bias-free ``nn.Linear``; scales/biases take ``dtype`` (default: the weight's dtype)."""
        if "bias" in linear:
            raise ValueError("QuantizedLinear.from_linear: linear layers with a bias are not supported")
        out_features, in_features = linear.weight.shape
        dtype = dtype or linear.weight.dtype
        layer = cls(in_features, out_features, bits=bits, group_size=group_size, dtype=dtype)
        layer.weight, layer.scales, layer.biases = quantize(linear.weight, bits, group_size, dtype=dtype)
        return layer

    def unfreeze(self, *args, **kwargs):
        """Quantized weights are never trained: unfreezing this layer leaves it frozen (as in MLX's own)."""
        super().unfreeze(*args, **kwargs)
        self.freeze(recurse=False)
        return self

    def dequantize(self, dtype: Optional[mx.Dtype] = None) -> mx.array:
        """The full weight (out, in) in ``dtype`` (default: the scales' dtype).

        See ``dequantize_weight`` for the path taken on each device.
        """
        return dequantize_weight(self.weight, self.scales, self.biases, self.bits, self.group_size,
                                 dtype or self.scales.dtype)

    def _mlx_layout(self, dtype: mx.Dtype) -> Optional[tuple[mx.array, mx.array, int]]:
        """MLX's group layout of our scales/biases in ``dtype``, built once per weight and dtype.

        Decoding calls every layer once per token: expanding per-row scales on each call costs a few
        kernel launches per layer, which dominated batch-1 decoding on a GPU. The cache is a plain
        attribute (not a parameter) and is rebuilt when ``scales`` is replaced.
        """
        cached = self.__dict__.get("_layout_cache")
        if cached is not None and cached[0] is self.scales and cached[1] is self.biases and cached[2] == dtype:
            return cached[3]
        layout = mlx_group_layout(self.scales, self.biases, self.in_features, self.group_size)
        if layout is not None:
            scales, biases, group_size = layout
            layout = (scales.astype(dtype), biases.astype(dtype), group_size)
            try:
                mx.eval(layout[0], layout[1])
            except Exception:  # inside mx.compile: placeholders cannot be kept, so do not cache
                return layout
        self.__dict__["_layout_cache"] = (self.scales, self.biases, dtype, layout)
        return layout

    def _quantized_matmul(self, x: mx.array) -> Optional[mx.array]:
        layout = self._mlx_layout(x.dtype)
        if layout is None:
            return None
        scales, biases, group_size = layout
        return mx.quantized_matmul(
            x,
            self.weight,
            scales,
            biases,
            transpose=True,
            group_size=group_size,
            bits=self.bits,
        )

    @property
    def parts(self) -> tuple[mx.array, mx.array, mx.array]:
        """``(weight, scales, biases)``: the arrays a kernel reads."""
        return self.weight, self.scales, self.biases

    @property
    def runs_bare_per_row_4bit(self) -> bool:
        """In inference, 4 bits, one scale per row: what the fused CUDA kernels take."""
        return not self.training and self.bits == 4 and self.group_size is None

    def prepare_decoding(self, dtype: mx.Dtype) -> None:
        """Build now what a one-row call in ``dtype`` will need (MLX's group layout, when that path is
        taken), so that a compiled decoding step finds it cached."""
        if not self._takes_qmv(1, dtype) and self._takes_quantized_matmul(1):
            self._mlx_layout(dtype)

    def _takes_qmv(self, rows: int, dtype: mx.Dtype) -> bool:
        return qmv_cuda.supports_rows(rows, dtype, self.in_features, self.bits, self.group_size, self.out_features)

    def _takes_quantized_matmul(self, rows: int) -> bool:
        return rows <= QMM_MAX_ROWS[device_type()] and mlx_group_size(self.in_features, self.group_size) is not None

    def takes_dense(self, x: mx.array) -> bool:
        """Whether a call on ``x`` dequantizes the whole weight and runs one dense matmul."""
        rows = x.size // max(x.shape[-1], 1)
        return not self._takes_qmv(rows, x.dtype) and not self._takes_quantized_matmul(rows)

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., in) -> (..., out), computed in ``x.dtype``."""
        rows = x.size // max(x.shape[-1], 1)
        if self._takes_qmv(rows, x.dtype):
            # In training mode the call stays differentiable; in inference it runs bare (less Python).
            dequantize = dequantize_weight if self.training else None
            return qmv_cuda.qmv(x, self.weight, self.scales, self.biases, dequantize)
        if self._takes_quantized_matmul(rows):
            return self._quantized_matmul(x)
        # dequantize + one dense matmul; the backward pass dequantizes again rather than keep W
        matmul = dequantized_matmul_fn(dequantize_weight, self.bits, self.group_size)
        return matmul(x, self.weight, self.scales, self.biases)

    def _extra_repr(self) -> str:
        groups = "per-row" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"input_dims={self.in_features}, output_dims={self.out_features}, bits={self.bits}, {groups}, "
            f"dtype={str(self.scales.dtype).rpartition('.')[2]}"
        )
