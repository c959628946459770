"""``LoRALinear``: a frozen base linear layer plus a trainable low-rank update.

``LoRALinear`` keeps PEFT's names and shapes (``lora_A`` (r, in), ``lora_B`` (out, r)), so adapters move
between this project and PEFT without renaming. The scale and the delta weight are ``merge.py``'s formulas.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..config import LoRAConfig
from ..quant.dequant import dequantize_weight
from ..quant.low_rank import Stacked
from ..quant.quantized_linear import QuantizedLinear
from .matmul import lora_matmul_fn
from .merge import lora_delta, lora_scale, merge_weight

BaseLinear = Union[nn.Linear, QuantizedLinear]


def base_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` or ``QuantizedLinear``, the layers LoRA wraps."""
    if isinstance(layer, QuantizedLinear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    raise TypeError(f"LoRA wraps nn.Linear or QuantizedLinear, got {type(layer).__name__}")


class LoRALinear(nn.Module):
    """``y = base(x) + scale * (dropout(x) @ lora_A.T) @ lora_B.T``; only ``lora_A`` and ``lora_B`` train.

    ``scale`` is ``lora_scale``'s: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA. ``lora_A`` (rank, in) starts as
    PEFT's Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); ``lora_B`` (out, rank) starts
    at zero, so a new adapter leaves the base's output unchanged. The adapter computes in the input's dtype.
    Where the base runs one dense matmul (training, prompts), the layer is one function with the adapter's
    product added in that matmul's epilogue (``matmul.py``).
    """

    def __init__(
        self,
        base: BaseLinear,
        rank: int = LoRAConfig.rank,
        alpha: float = LoRAConfig.alpha,
        dropout: float = LoRAConfig.dropout,
        use_rslora: bool = LoRAConfig.use_rslora,
        dtype: mx.Dtype = mx.float32,
    ):
        super().__init__()
        out_features, in_features = base_shape(base)
        if rank < 1:
            raise ValueError(f"rank: must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scale = lora_scale(self.alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(p=dropout)
        # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in) = 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_features), dtype=dtype)
        self.lora_B = mx.zeros((out_features, rank), dtype=dtype)
        self.base.freeze()

    @classmethod
    def from_base(
        cls,
        layer: BaseLinear,
        rank: int = LoRAConfig.rank,
        alpha: float = LoRAConfig.alpha,
        dropout: float = LoRAConfig.dropout,
        use_rslora: bool = LoRAConfig.use_rslora,
    ) -> "LoRALinear":
        """Wrap ``layer`` (an ``nn.Linear`` or ``QuantizedLinear``, which is frozen) with a new adapter."""
        return cls(layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def unfreeze(self, *args, **kwargs):
        """Unfreezing this layer trains the adapters, never the wrapped base layer.

        (``Module.unfreeze`` of a parent does not call this method: after ``model.unfreeze()``, run
        ``apply_lora`` on a fresh model or freeze the base layers again.)
        """
        super().unfreeze(*args, **kwargs)
        self.base.freeze()
        return self

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., in) -> (..., out)."""
        fused = self._fused(x)
        if fused is not None:
            return fused
        y = self.base(x)
        stack = None if self.training else self._prepared(x.dtype)
        if stack is not None:
            return stack.plus(y, x)  # the adapters as prepared for decoding, cast once
        h = self.dropout(x) @ self.lora_A.astype(x.dtype).T  # (..., rank)
        return y + (self.scale * (h @ self.lora_B.astype(x.dtype).T)).astype(y.dtype)

    def _fused(self, x: mx.array) -> Optional[mx.array]:
        """The adapter's sum inside the base's dense matmul (``matmul.py``), the base's frozen bias (if any)
        added after, or None where that does not apply: dropout in effect, or a 4-bit base whose call on
        ``x`` is not dequantize + matmul (decoding few rows)."""
        if self.training and self.dropout_p > 0:
            return None
        base = self.base
        if isinstance(base, QuantizedLinear) and base.takes_dense(x):
            fn = lora_matmul_fn(dequantize_weight, base.bits, base.group_size, self.scale)
            y = fn(x, self.lora_A, self.lora_B, *base.parts)
        elif isinstance(base, nn.Linear):
            y = lora_matmul_fn(None, 0, None, self.scale)(x, self.lora_A, self.lora_B, base.weight)
        else:
            return None
        if "bias" in base:
            y = y + base.bias.astype(y.dtype)
        return y

    def prepare_decoding(self, dtype: mx.Dtype) -> None:
        """Cast the adapters to ``dtype`` now, for the few-row calls of compiled decoding (which would
        otherwise cast them on every token); used while this layer holds the same adapter arrays."""
        self.__dict__["_decoding"] = Stacked([(self.lora_A, self.lora_B, self.scale)], dtype)  # not a parameter
        mx.eval(self.__dict__["_decoding"].arrays)

    def _prepared(self, dtype: mx.Dtype) -> Optional[Stacked]:
        """``prepare_decoding``'s stack while it holds this layer's adapter arrays and scale, else None."""
        stack = self.__dict__.get("_decoding")
        return stack if stack is not None and stack.holds([(self.lora_A, self.lora_B, self.scale)], dtype) else None

    def decoding_stack(self, dtype: mx.Dtype) -> Stacked:
        """The update as a one-projection ``Stacked`` in ``dtype`` (for the fused kernels' addends):
        ``prepare_decoding``'s, else built now."""
        return self._prepared(dtype) or Stacked([(self.lora_A, self.lora_B, self.scale)], dtype)

    def low_rank_form(self) -> Optional[tuple[BaseLinear, mx.array, mx.array, float]]:
        """``(base, lora_A, lora_B, scale)`` where this layer's call is exactly ``base(x) + scale * (x @
        lora_A.T) @ lora_B.T``: in inference (no dropout, no gradient wanted), so that kernels may run the
        base and add the update beside it (``quant/low_rank.py``); None in training."""
        if self.training or (self.dropout.training and self.dropout_p > 0):
            return None
        return self.base, self.lora_A, self.lora_B, self.scale

    def delta_weight(self) -> mx.array:
        """``scale * lora_B @ lora_A``, (out, in) in float32."""
        return lora_delta(self.lora_A, self.lora_B, self.scale)

    def fuse(self, full_weight: Optional[mx.array] = None) -> nn.Linear:
        """A plain ``nn.Linear`` with weight ``W + scale * B @ A``.

        ``full_weight`` (out, in): the original full-precision weight of a quantized base, so the merge
        adds no quantization error. Without it, ``W`` is the base's weight (dequantized for a
        ``QuantizedLinear``). The sum is formed in float32 and stored in ``W``'s dtype (for a quantized
        base without ``full_weight``: its scales' dtype).
        """
        out_features, in_features = base_shape(self.base)
        if full_weight is not None:
            if tuple(full_weight.shape) != (out_features, in_features):
                raise ValueError(
                    f"full_weight: expected shape {(out_features, in_features)}, got {tuple(full_weight.shape)}"
                )
            weight = full_weight
        elif isinstance(self.base, QuantizedLinear):
            weight = self.base.dequantize(mx.float32).astype(self.base.scales.dtype)
        else:
            weight = self.base.weight
        has_bias = "bias" in self.base
        fused = nn.Linear(in_features, out_features, bias=has_bias)
        fused.weight = merge_weight(weight, self.lora_A, self.lora_B, self.scale)
        if has_bias:
            fused.bias = self.base.bias
        return fused

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p:g}"
