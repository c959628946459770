"""``QuantizedLinear``: a frozen linear layer whose weight is stored in 4 bits.

Parameters, named as a checkpoint stores them: ``weight`` uint32 (out, in * bits / 32), ``scales`` and
``biases`` (out, n_groups), with n_groups = 1 per row (the default) or in / group_size; and, for a layer
with a bias (Qwen2's q, k and v), ``bias`` (out,), kept un-quantized in the scales' dtype.

The forward pass computes in the input's dtype; ``matmul.py`` chooses its path (our few-row CUDA kernel,
MLX's ``quantized_matmul`` for few rows, or dequantize + one dense matmul) and ``dequant.py`` the path of
``dequantize``.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .. import settings
from . import matmul
from .dequant import dequantize_weight
from .quantize import mlx_group_layout, n_groups_for, quantize


class QuantizedLinear(nn.Module):
    """``y = x @ W.T`` with ``W`` stored as ``bits``-bit integers and an affine scale/bias per row or group.

    Args:
        in_features, out_features: the shape of the full-precision weight is (out_features, in_features).
        bits: 2, 4 or 8.
        group_size: None for one scale and bias per output row, or 32/64/128 inputs per group.
        dtype: dtype of ``scales`` and ``biases``.
        bias: whether the layer adds a (frozen, un-quantized) ``bias`` (out,) in ``dtype``.

    The arrays start as zeros so that a checkpoint loader can fill them by name; the layer is frozen.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: Optional[int] = None,
        dtype: mx.Dtype = mx.float32,
        bias: bool = False,
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
        if bias:
            self.bias = mx.zeros((out_features,), dtype=dtype)
        self.freeze()

    @classmethod
    def from_linear(
        cls, linear: nn.Module, bits: int = 4, group_size: Optional[int] = None, dtype: Optional[mx.Dtype] = None,
        rounding: str = "nearest",
    ) -> "QuantizedLinear":
        """Quantize an ``nn.Linear``; scales/biases take ``dtype`` (default: the weight's dtype), and its bias,
        if any, is kept as it is, cast to ``dtype``; ``rounding`` as ``quantize``'s."""
        out_features, in_features = linear.weight.shape
        dtype = dtype or linear.weight.dtype
        has_bias = "bias" in linear
        layer = cls(in_features, out_features, bits=bits, group_size=group_size, dtype=dtype, bias=has_bias)
        layer.weight, layer.scales, layer.biases = quantize(linear.weight, bits, group_size, dtype=dtype,
                                                            rounding=rounding)
        if has_bias:
            layer.bias = linear.bias.astype(dtype)
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

    def mlx_layout(self, dtype: mx.Dtype) -> Optional[tuple[mx.array, mx.array, int]]:
        """MLX's group layout of our scales/biases in ``dtype``, built once per weight and dtype.

        Decoding calls every layer once per token: expanding per-row scales on each call costs a few
        kernel launches per layer, which dominated batch-1 decoding on a GPU. The cache is a plain
        attribute (not a parameter) and is rebuilt when ``scales`` is replaced or the group size it was
        expanded to (``settings.expand_group``) changes.
        """
        key = (dtype, settings.current().expand_group)
        cached = self.__dict__.get("_layout_cache")
        if cached is not None and cached[0] is self.scales and cached[1] is self.biases and cached[2] == key:
            return cached[3]
        layout = mlx_group_layout(self.scales, self.biases, self.in_features, self.group_size)
        if layout is not None:
            scales, biases, group_size = layout
            layout = (scales.astype(dtype), biases.astype(dtype), group_size)
            try:
                mx.eval(layout[0], layout[1])
            except Exception:  # inside mx.compile: placeholders cannot be kept, so do not cache
                return layout
        self.__dict__["_layout_cache"] = (self.scales, self.biases, key, layout)
        return layout

    @property
    def parts(self) -> tuple[mx.array, mx.array, mx.array]:
        """``(weight, scales, biases)``: the arrays a kernel reads."""
        return self.weight, self.scales, self.biases

    @property
    def runs_bare_per_row_4bit(self) -> bool:
        """In inference, 4 bits, one scale per row, no bias: what the fused CUDA kernels take (they read
        ``parts`` only)."""
        return not self.training and self.bits == 4 and self.group_size is None and "bias" not in self

    def prepare_decoding(self, dtype: mx.Dtype) -> None:
        """Build now what a one-row call in ``dtype`` will need (MLX's group layout, when that path is
        taken), so that a compiled decoding step finds it cached."""
        if matmul.path(self, 1, dtype) == "quantized_matmul":
            self.mlx_layout(dtype)

    def takes_dense(self, x: mx.array) -> bool:
        """Whether a call on ``x`` dequantizes the whole weight and runs one dense matmul."""
        return matmul.path(self, x.size // max(x.shape[-1], 1), x.dtype) == "dense"

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., in) -> (..., out), computed in ``x.dtype`` (the path: ``matmul.quantized_matmul``)."""
        y = matmul.quantized_matmul(self, x)
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y

    def _extra_repr(self) -> str:
        groups = "per-row" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"input_dims={self.in_features}, output_dims={self.out_features}, bits={self.bits}, {groups}, "
            f"dtype={str(self.scales.dtype).rpartition('.')[2]}" + (", bias=True" if "bias" in self else "")
        )
