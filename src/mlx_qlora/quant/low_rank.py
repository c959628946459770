"""A projection as the fused few-row kernels take it: a bare per-row 4-bit base, and optionally a low-rank
update computed beside the launch.

A LoRA layer in inference computes ``base(x) + scale * (x @ A.T) @ B.T``. The kernels read the base's
packed weight once per token; the update is two small matmuls (M <= 8 rows, rank r) done in MLX beside
the launch and handed to it: as an addend that the kernel adds to its float32 sums before its epilogue
(q/k/v before the rotary embeddings and the cache write, gate/up before SwiGLU: ``qmv_source.Variant.addend``),
or, where the kernel's output is linear in its residual input (o_proj, down_proj), folded into that
residual. ``fused_form`` says whether a layer is such a projection. The LoRA layer lives above this
package (``lora/layer.py``), so it is recognised by what it offers: ``low_rank_form()``.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

LowRank = tuple[mx.array, mx.array, float]  # (lora_A (r, in), lora_B (out, r), scale)


def fused_form(layer) -> Optional[tuple[object, Optional[LowRank]]]:
    """``(base, low_rank)`` where ``layer`` runs as a bare per-row 4-bit matmul (``base``, a layer whose
    ``runs_bare_per_row_4bit`` holds) plus, for a layer offering ``low_rank_form()`` (``LoRALinear`` in
    inference, no dropout in effect), its ``(lora_A, lora_B, scale)``; ``(layer, None)`` for a bare layer;
    None where the fused kernels do not take the layer (training, other bases, full precision)."""
    if getattr(layer, "runs_bare_per_row_4bit", False):
        return layer, None
    form = getattr(layer, "low_rank_form", None)
    form = form() if callable(form) else None
    if form is None:
        return None
    base, lora_a, lora_b, scale = form
    if not getattr(base, "runs_bare_per_row_4bit", False):
        return None
    return base, (lora_a, lora_b, float(scale))


def low_rank_addend(x: mx.array, low_rank: Optional[LowRank]) -> Optional[tuple[float, mx.array]]:
    """``(scale, (x @ A.T) @ B.T)``: x (..., in) -> an addend (M, out) for a kernel that multiplies it by
    ``scale`` (``qmv.Addend``); None without an update. The adapters compute in x's dtype, as the LoRA
    layer's own call does."""
    if low_rank is None:
        return None
    lora_a, lora_b, scale = low_rank
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    return scale, (x2 @ lora_a.astype(x.dtype).T) @ lora_b.astype(x.dtype).T  # (M, r) -> (M, out)


def plus_low_rank(residual: mx.array, x: mx.array, low_rank: Optional[LowRank]) -> mx.array:
    """``residual + scale * (x @ A.T) @ B.T`` (one matmul with the sum and the scale in its epilogue):
    x (..., in), residual (..., out) -> residual's shape; ``residual`` itself without an update. A kernel
    computing ``residual + x @ W.T`` then computes the LoRA layer's output plus the residual."""
    if low_rank is None:
        return residual
    lora_a, lora_b, scale = low_rank
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    h = x2 @ lora_a.astype(x.dtype).T  # (M, r)
    out = mx.addmm(residual.reshape(-1, residual.shape[-1]), h, lora_b.astype(x.dtype).T, alpha=scale)
    return out.reshape(residual.shape)
