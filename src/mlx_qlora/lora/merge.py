"""The LoRA update as formulas: the delta weight ``scale * B @ A`` and the merged weight ``W + scale * B @ A``
(float32, cast once), for one layer or a whole state dict. The scale is ``config.lora_scale`` (it lives with
``LoRAConfig``, below this package), re-exported here."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from ..config import lora_scale
from ..errors import UserError

__all__ = ["lora_scale", "lora_delta", "merge_weight", "merge_state"]


def lora_delta(a: mx.array, b: mx.array, scale: float) -> mx.array:
    """``scale * B @ A`` in float32: A (r, in), B (out, r) -> (out, in)."""
    return scale * (b.astype(mx.float32) @ a.astype(mx.float32))


def merge_weight(weight: mx.array, a: mx.array, b: mx.array, scale: float, dtype: Optional[mx.Dtype] = None) -> mx.array:
    """``W + scale * B @ A`` computed in float32 and cast to ``dtype`` (default: W's dtype)."""
    dtype = dtype or weight.dtype
    return (weight.astype(mx.float32) + lora_delta(a, b, scale)).astype(dtype)


def merge_state(state: dict[str, mx.array], adapters: dict[str, mx.array], scale: float,
                dtype: mx.Dtype) -> tuple[dict[str, mx.array], int]:
    """Every floating tensor of ``state`` in ``dtype``, adapted projections merged; and how many were merged.

    adapters: flat ``{model.layers.i.<parent>.<proj>.lora_A|lora_B: array}``. ``UserError`` when a
    projection is missing or its shape does not fit the adapters (adapters for another model).
    """
    projections = sorted({k.rsplit(".", 1)[0] for k in adapters})
    merged = dict(state)
    for proj in projections:
        key = f"{proj}.weight"
        if key not in state:
            raise UserError(f"the adapters adapt {proj}, which this model does not have (made for another model?)")
        a, b = adapters[f"{proj}.lora_A"], adapters[f"{proj}.lora_B"]
        w = state[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise UserError(f"the adapters of {proj} make a ({b.shape[0]}, {a.shape[1]}) update but the weight is "
                            f"{tuple(w.shape)}: the adapters were made for another model shape")
        merged[key] = merge_weight(w, a, b, scale, dtype)
    for key, value in merged.items():
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != dtype:
            merged[key] = value.astype(dtype)
    return merged, len(projections)
