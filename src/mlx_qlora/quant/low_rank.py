"""A projection as the fused few-row kernels take it: a bare per-row 4-bit base, and optionally a low-rank
update computed beside the launch (``Stacked``: several projections' updates of one input as two matmuls) or
inside the fused layer's launches (``Terms``: the A-products written by the launch before, B applied in the
kernel's epilogue).

A LoRA layer in inference computes ``base(x) + scale * (x @ A.T) @ B.T``. The kernels read the base's
packed weight once per token; the update is two small matmuls (M <= 8 rows, rank r) done in MLX beside
the launch and handed to it: as an addend that the kernel adds to its float32 sums before its epilogue
(q/k/v before the rotary embeddings and the cache write, gate/up before SwiGLU: ``qmv_source.Variant.addend``),
or, where the kernel's output is linear in its residual input (o_proj, down_proj), folded into that
residual. ``fused_form`` says whether a layer is such a projection. The LoRA layer lives above this
package (``lora/layer.py``), so it is recognised by what it offers: ``low_rank_form()`` (and
``decoding_stack(dtype)``, its update as a ``Stacked`` of one, cast once before compiled decoding).

The fused decoder layer (``model/fused_decode.py``) takes ``Terms``: there each input's updates cost no
launch of their own and no normed copy of the input: ``norm(x) @ A.T = (x @ (A * gamma).T) / rms(x)``, the
launch before writes ``x @ (A * gamma).T``, and the kernel, which computes 1/rms for its own RMSNorm,
applies it together with B (``qmv.LowRank``).
"""

from __future__ import annotations

from typing import Optional, Sequence

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


def _same(sources: tuple, updates: Sequence[Optional[LowRank]]) -> bool:
    """Whether ``updates`` are the very arrays and scales recorded in ``sources`` (None where not adapted)."""
    return len(updates) == len(sources) and all(
        (u is None) == (s is None) and (u is None or (u[0] is s[0] and u[1] is s[1] and float(u[2]) == s[2]))
        for u, s in zip(updates, sources))


class Stacked:
    """The updates of projections that read one input, as two matmuls whatever their number: ``x @ a_t``
    with the adapted projections' A matrices stacked, (M, in) @ (in, R) -> (M, R) with R the sum of their
    ranks, then ``@ b_t``, their B matrices block-diagonally, (M, R) @ (R, N) -> (M, N) with N the sum of
    their outputs (the zeros add exact zeros). Both are cast to the compute dtype once: built before
    tracing (``prepare``), a compiled decoding graph neither casts the float32 adapters nor runs a matmul
    per projection on every token. q/k/v's three updates then cost two matmuls, gate/up's two, o_proj's
    and down_proj's one plus an ``addmm``."""

    def __init__(self, updates: Sequence[Optional[LowRank]], dtype: mx.Dtype):
        adapted = [u for u in updates if u is not None]
        self.dtype = dtype
        self.sources = tuple(None if u is None else (u[0], u[1], float(u[2])) for u in updates)  # what it holds
        ranks = [a.shape[0] for a, _, _ in adapted]
        outs = [b.shape[0] for _, b, _ in adapted]
        self.a_t = mx.concatenate([a.astype(dtype) for a, _, _ in adapted], axis=0).T  # (in, R)
        b_t = mx.zeros((sum(ranks), sum(outs)), dtype)  # (R, N), block-diagonal
        self.columns: list[Optional[tuple[float, int, int]]] = []  # per projection: (scale, first, count)
        r0 = c0 = 0
        it = iter(zip(adapted, ranks, outs))
        for u in updates:
            if u is None:
                self.columns.append(None)
                continue
            (_, b, scale), r, n = next(it)
            b_t[r0:r0 + r, c0:c0 + n] = b.astype(dtype).T
            self.columns.append((float(scale), c0, n))
            r0, c0 = r0 + r, c0 + n
        self.b_t = b_t

    @classmethod
    def build(cls, updates: Sequence[Optional[LowRank]], dtype: mx.Dtype) -> Optional["Stacked"]:
        """The stack of ``updates`` (None where a projection is not adapted); None where none is."""
        return cls(updates, dtype) if any(u is not None for u in updates) else None

    def holds(self, updates: Sequence[Optional[LowRank]], dtype: mx.Dtype) -> bool:
        """Whether this stack was built from exactly these adapter arrays (the same objects: an update
        of the adapters replaces them) and scales, for ``dtype``."""
        return dtype == self.dtype and _same(self.sources, updates)

    @property
    def arrays(self) -> list[mx.array]:
        return [self.a_t, self.b_t]

    def addends(self, x: mx.array) -> list[Optional[tuple[float, mx.array]]]:
        """Per projection ``(scale, (x @ A.T) @ B.T)``, x (..., in) -> addends (M, out) for a kernel that
        multiplies each by its scale (``qmv.Addend``); None where not adapted."""
        u = (x.reshape(-1, x.shape[-1]) @ self.a_t) @ self.b_t  # (M, in) -> (M, R) -> (M, N)
        return [None if c is None else (c[0], u[:, c[1]:c[1] + c[2]]) for c in self.columns]

    def plus(self, residual: mx.array, x: mx.array) -> mx.array:
        """``residual + scale * (x @ A.T) @ B.T`` for a stack of one projection (the sum and the scale in
        the second matmul's epilogue): x (..., in), residual (..., out) -> residual's shape. A kernel
        computing ``residual + x @ W.T`` then computes the LoRA layer's output plus the residual."""
        (scale, _, _), = self.columns
        h = x.reshape(-1, x.shape[-1]) @ self.a_t  # (M, r)
        out = mx.addmm(residual.reshape(-1, residual.shape[-1]), h, self.b_t, alpha=scale)
        return out.reshape(residual.shape)


class Terms:
    """The updates of projections that read one input, as a fused kernel's low-rank terms (``qmv.LowRank``):
    the A-products ``h = x @ a.T``, (M, in) -> (M, R) with ``a`` (R, in) the adapted projections' A matrices
    stacked, come from the launch before (which multiplies each value it writes by its row of ``a_t``) or
    from ``qmv.a_products``; the kernel adds ``scale * h[:, c:c + r] @ B.T`` to each adapted projection in
    its epilogue, B (N, r) as the LoRA layer holds it. With ``gamma`` (the weight of the RMSNorm that the
    kernel applies to its input) the A matrices are taken through it, ``A * gamma``, so that h is of the raw
    input and the kernel's 1/rms of the row completes ``norm(x) @ A.T``. Cast to the compute dtype once
    (``fused_decode.prepare``, before tracing), in float32 before the one rounding."""

    def __init__(self, updates: Sequence[Optional[LowRank]], dtype: mx.Dtype, gamma: Optional[mx.array] = None):
        adapted = [u for u in updates if u is not None]
        self.dtype, self.gamma = dtype, gamma
        self.sources = tuple(None if u is None else (u[0], u[1], float(u[2])) for u in updates)  # what it holds
        a = mx.concatenate([a.astype(mx.float32) for a, _, _ in adapted], axis=0)  # (R, in)
        if gamma is not None:
            a = a * gamma.astype(mx.float32)
        self.a = a.astype(dtype)  # (R, in): the rows ``kernels/cuda/qmv.a_products`` reads
        self.a_t = mx.contiguous(self.a.T)  # (in, R), row-major: row n is what input n adds to h
        self.terms: list[Optional[tuple[float, int, mx.array]]] = []  # per projection: (scale, first column, B)
        first = 0
        for u in updates:
            if u is None:
                self.terms.append(None)
                continue
            lora_a, lora_b, scale = u
            self.terms.append((float(scale), first, lora_b.astype(dtype)))  # B (N, r)
            first += lora_a.shape[0]

    @classmethod
    def build(cls, updates: Sequence[Optional[LowRank]], dtype: mx.Dtype,
              gamma: Optional[mx.array] = None) -> Optional["Terms"]:
        """The terms of ``updates`` (None where a projection is not adapted); None where none is."""
        return cls(updates, dtype, gamma) if any(u is not None for u in updates) else None

    def holds(self, updates: Sequence[Optional[LowRank]], dtype: mx.Dtype, gamma: Optional[mx.array] = None) -> bool:
        """Whether these terms were built from exactly these adapter arrays, scales and norm weight (the same
        objects: an update replaces them), for ``dtype``."""
        return gamma is self.gamma and dtype == self.dtype and _same(self.sources, updates)

    @property
    def arrays(self) -> list[mx.array]:
        return [self.a, self.a_t] + [t[2] for t in self.terms if t is not None]

    @property
    def cols(self) -> int:
        """R: the columns of h."""
        return self.a_t.shape[1]
