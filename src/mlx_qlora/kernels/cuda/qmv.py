"""Few-row matmuls with per-row 4-bit weights as CUDA kernels (batch decoding on NVIDIA GPUs).

For a row ``n`` with scale ``s`` and offset ``b``, ``W[n, k] = s * q[n, k] + b``, so

    y[m, n] = s * sum_k q[n, k] * x[m, k]  +  b * sum_k x[m, k]

and the kernel reads each packed row once, straight from memory: each warp computes 1, 2 or 4 output
rows that share every loaded input, each lane loading 16 bytes (32 weights) at a time, the M <=
``MAX_ROWS`` input rows read alongside and both sums accumulated in float32, then a warp reduction (the
RMSNorm launches first stage their input rows in shared memory once per block). No dequantized weight
and no expanded scales exist. A second body does the multiply-adds on the tensor cores (bfloat16 inputs,
float32 sums) for the launches with the most rows. ``mx.quantized_matmul`` needs MLX's group layout
(our one scale per row repeated for every group of 64) and runs far below the memory's speed at one row
(``qmv_probe.py`` compares them).

The kernels (``qmv.cu``, assembled per ``Variant`` in ``qmv_source.py``, launches planned in
``qmv_plan.py``): one weight (``qmv``), up to three weights of one input with one output each
(``qmv_split``: q, k and v), gate and up with SwiGLU (``qmv_swiglu``), and for the fused decoder layer an
RMSNorm prologue, rotary embeddings in the epilogue and a residual sum (``qkv_norm_rope``,
``swiglu_norm``, ``matmul_residual``).

Only CUDA is covered: ``quant/matmul.py`` takes these kernels where ``supports`` says so, and MLX's
``quantized_matmul`` or dequantize + matmul elsewhere. The ``reference*`` functions are the same formulas
in portable MLX operations (the CPU tests check them against the dequantized weight and run the kernels'
sources through a CUDA emulation against them; the GPU probes check the kernels against them).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ... import settings
from ...device import on_cuda
from .qmv_plan import DTYPE_CODES, MAX_ROWS, launch
from .qmv_source import HEADER, Variant
from .sources import cuda_kernel, sections

Weight = tuple[mx.array, mx.array, mx.array]  # (packed (N, K/8) uint32, scales (N, 1), biases (N, 1))
# What a launch adds to one weight's float32 sums before its epilogue: factor F and an array (..., N) (a LoRA
# update: F = scale, the array (x @ A.T) @ B.T); per weight, None for none.
Addend = tuple[float, mx.array]
# A launch's low-rank terms (``Variant.low_rank``): h, the A-products x @ A.T of the adapted weights side by side
# ((..., R), or the layer's scratch where an earlier launch wrote them: see ``Emit``), and per weight None or
# (F, c, b) with b (N, r) its B: F * h[..., c:c + r] @ b.T is added to that weight's float32 sums (with the
# RMSNorm launches, h is of the raw input through A * gamma, and the kernel multiplies the term by its 1/rms).
LowRank = tuple[mx.array, Sequence[Optional[tuple[float, int, mx.array]]]]
# A launch that writes the next launch's A-products of its outputs (``Variant.emit_cols``): (ea (N, C), the next
# launch's A.T; scratch, the layer's float32 scratch; offset, where the (M, C) A-products start in it).
Emit = tuple[mx.array, mx.array, int]


def _low_rank(variant: Variant, low_rank: Optional[LowRank], offset: int = 0) -> tuple[Variant, list[mx.array]]:
    """``variant`` with its ``low_rank`` terms (h's rows from ``offset``) and their inputs ``lh``, ``lb<g>..``;
    unchanged without any."""
    if low_rank is None or all(t is None for t in low_rank[1]):
        return variant, []
    h, terms = low_rank
    if len(terms) != variant.n_matrices:
        raise ValueError(f"one low-rank term (or None) per weight: {variant.n_matrices} weights, {len(terms)} terms")
    spec = tuple(None if t is None else (float(t[0]), int(t[1]), int(t[2].shape[1])) for t in terms)
    cols = max(t[1] + t[2] for t in spec if t is not None)  # the terms' columns, side by side from 0
    if offset == 0 and h.ndim > 1 and h.shape[-1] != cols:
        raise ValueError(f"h has {h.shape[-1]} columns, the low-rank terms {cols}")
    return (replace(variant, low_rank=spec, low_rank_cols=cols, low_rank_offset=int(offset)),
            [h] + [t[2] for t in terms if t is not None])


def _emit_zero(variant: Variant, emit: Optional[Emit], zero: Optional[mx.array]) -> tuple[Variant, list[mx.array]]:
    """``variant`` writing A-products (``emit``) and zeroing a scratch first (``zero``), with their inputs."""
    extra = []
    if emit is not None:
        ea, scratch, offset = emit
        variant = replace(variant, emit_cols=int(ea.shape[1]), emit_offset=int(offset))
        extra += [ea, scratch]
    if zero is not None:
        variant = replace(variant, zero=int(zero.size))
        extra.append(zero)
    return variant, extra


def _addends(variant: Variant, addends: Optional[Sequence[Optional[Addend]]]) -> tuple[Variant, list[mx.array]]:
    """``variant`` with its ``addend`` factors and the addend arrays as (M, N) inputs; unchanged without any."""
    if addends is None or all(a is None for a in addends):
        return variant, []
    if len(addends) != variant.n_matrices:
        raise ValueError(f"one addend (or None) per weight: {variant.n_matrices} weights, {len(addends)} addends")
    factors = tuple(None if a is None else float(a[0]) for a in addends)
    arrays = [a[1].reshape(-1, a[1].shape[-1]) for a in addends if a is not None]
    return replace(variant, addend=factors), arrays


def supports(x: mx.array, in_features: int, bits: int, group_size, out_features: Optional[int] = None) -> bool:
    """Whether ``qmv`` takes this call: per-row 4-bit, an input dtype it reads, whole 32-input blocks, at
    most ``MAX_ROWS`` rows, CUDA, ``settings.qmv`` on, and (when ``out_features`` is given) a layer of at
    least ``qmv_min_weights`` weights."""
    return supports_rows(x.size // max(x.shape[-1], 1), x.dtype, in_features, bits, group_size, out_features)


def supports_rows(rows: int, dtype: mx.Dtype, in_features: int, bits: int, group_size,
                  out_features: Optional[int] = None) -> bool:
    """``supports`` for an input of ``rows`` rows in ``dtype``.

    Alone (``out_features`` given), a layer smaller than ``qmv_min_weights`` keeps MLX's
    ``quantized_matmul``: a custom-kernel call costs more host time than MLX's operation, and decoding
    that is not compiled is bound by the host (``gpu_generate.py`` measures it)."""
    s = settings.current()
    return (
        bits == 4 and group_size is None and dtype in DTYPE_CODES and 1 <= rows <= MAX_ROWS
        and in_features % 32 == 0 and (out_features is None or out_features * in_features >= s.qmv_min_weights)
        and s.qmv and on_cuda()
    )


@lru_cache(maxsize=None)
def _qmv_fn(dequantize: Callable) -> Callable:
    @mx.custom_function
    def qmv_fn(x2, wq, scales, biases):
        return launch(x2, [(wq, scales, biases)])[0]

    @qmv_fn.vjp
    def qmv_vjp(primals, cotangent, output):
        # Rarely needed (a gradient through a few-row call): dx = dy @ W with W dequantized.
        x2, wq, scales, biases = primals
        w = dequantize(wq, scales, biases, 4, None, cotangent.dtype)  # (N, K)
        return (cotangent @ w).astype(x2.dtype), mx.zeros_like(wq), mx.zeros_like(scales), mx.zeros_like(biases)

    return qmv_fn


def qmv(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    dequantize: Optional[Callable] = None,
) -> mx.array:
    """x (..., K) with at most ``MAX_ROWS`` rows -> (..., N) in x.dtype; see ``supports``.

    With ``dequantize`` (the layer's pure dequantization function) the call is differentiable with
    respect to ``x`` (the backward pass dequantizes); without it the kernel runs bare, which is what
    inference wants (the wrapper costs Python time on every call).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if dequantize is None:
        y = launch(x2, [(wq, scales, biases)])[0]  # (M, N)
    else:
        y = _qmv_fn(dequantize)(x2, wq, scales, biases)
    return y.reshape(*lead, wq.shape[0])


def qmv_split(x: mx.array, weights: Sequence[Weight], shapes: Optional[Sequence[tuple[int, ...]]] = None,
              addends: Optional[Sequence[Optional[Addend]]] = None) -> list[mx.array]:
    """x (..., K) times up to three per-row 4-bit weights (packed, scales, biases) in one launch: one
    output per weight, (..., N) or the given ``shapes`` (same elements in row-major order; with one input
    row per sequence, (B, 1, H * D) and (B, H, 1, D) are the same memory). ``addends``: per weight, None
    or ``(F, a)`` with a (..., N): ``F * a`` is added to that output in float32. Inference only."""
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"qmv_split takes 1 to 3 weights, got {len(weights)}")
    lead = x.shape[:-1]
    if shapes is None:
        shapes = [(*lead, w.shape[0]) for w, _, _ in weights]
    variant, extra = _addends(Variant(len(weights)), addends)
    return launch(x.reshape(-1, x.shape[-1]), weights, variant, shapes=tuple(tuple(s) for s in shapes), extra=extra)


def qmv_swiglu(x: mx.array, gate: Weight, up: Weight,
               addends: Optional[Sequence[Optional[Addend]]] = None) -> mx.array:
    """``silu(x @ gate.T) * (x @ up.T)`` for x (..., K) in one launch -> (..., N), both products and the
    activation in float32 and rounded once. ``addends``: as ``qmv_split``'s, of gate and of up (added to
    the products before the activation). Inference only."""
    if gate[0].shape != up[0].shape:
        raise ValueError(f"gate and up weights differ in shape: {gate[0].shape} vs {up[0].shape}")
    lead = x.shape[:-1]
    variant, extra = _addends(Variant(2, swiglu=True), addends)
    return launch(x.reshape(-1, x.shape[-1]), [gate, up], variant, shapes=((*lead, gate[0].shape[0]),),
                  extra=extra)[0]


# ---- the kernels of one decoder layer of batch decoding (``model/fused_decode.py``) -----------------------


def qkv_norm_rope(x: mx.array, gamma: mx.array, eps: float, weights: Sequence[Weight], position: mx.array,
                  head_dim: int, rope_base: float, rope_scale: float, q_shape: tuple[int, ...],
                  cache: tuple[mx.array, mx.array], low_rank: Optional[LowRank] = None,
                  low_rank_offset: int = 0, zero: Optional[mx.array] = None) -> list[mx.array]:
    """q, k and v of ``rms_norm(x, gamma, eps)`` (x (M, K), M sequences of one token) in one launch, with
    rotary embeddings (Hugging Face's rotate-half pairs) on q and k at ``position`` (int32, 0-d); q comes
    out in ``q_shape`` (any shape of its elements in row-major order).

    ``cache``: the key and value buffers (M, n_kv_heads, C, head_dim) of a ``StaticKVCache``, row-major;
    k and v are written into them in place, at slot ``position % C``, and the buffers are returned in
    their place: ``[q, keys, values]``. The write is invisible to MLX's graph, so whatever reads the
    buffers must depend on q (attention does) and nothing may read the buffers' old contents afterwards
    (the cache's are dropped as it advances).

    ``low_rank``: LoRA updates of the normed input as ``LowRank`` terms, added before the rotation and the
    cache write; h = x @ (A * gamma).T of the raw input (the kernel applies 1/rms and B), its rows from
    ``low_rank_offset`` (in the layer before's scratch). ``zero``: the layer's low-rank scratch, zeroed by
    the launch before anything else (``Variant.zero``)."""
    variant, lr = _low_rank(Variant(3, norm_eps=float(eps), rope=(True, True, False), rope_base=float(rope_base),
                                    rope_scale=float(rope_scale), cache=True), low_rank, low_rank_offset)
    variant, ez = _emit_zero(variant, None, zero)
    q = launch(x.reshape(-1, x.shape[-1]), weights, variant, shapes=(tuple(q_shape),),
               extra=[gamma, position.astype(mx.int32), *cache, *lr, *ez], head_dim=head_dim,
               capacity=cache[0].shape[2])
    return q + list(cache)


def swiglu_norm(x: mx.array, gamma: mx.array, eps: float, gate: Weight, up: Weight,
                low_rank: Optional[LowRank] = None, low_rank_offset: int = 0,
                emit: Optional[Emit] = None) -> mx.array:
    """``silu(gate(n)) * up(n)`` with ``n = rms_norm(x, gamma, eps)``, in one launch: x (..., K) -> (..., N).
    ``low_rank``: as ``qkv_norm_rope``'s, of gate and of up (added before the activation), h's rows from
    ``low_rank_offset``. ``emit``: the next launch's A-products of the output (``Emit``)."""
    lead = x.shape[:-1]
    variant, lr = _low_rank(Variant(2, swiglu=True, norm_eps=float(eps)), low_rank, low_rank_offset)
    variant, ez = _emit_zero(variant, emit, None)
    return launch(x.reshape(-1, x.shape[-1]), [gate, up], variant, shapes=((*lead, gate[0].shape[0]),),
                  extra=[gamma, *lr, *ez])[0]


def matmul_residual(x: mx.array, weight: Weight, residual: mx.array, prefetch=(),
                    low_rank: Optional[LowRank] = None, low_rank_offset: int = 0,
                    emit: Optional[Emit] = None) -> mx.array:
    """``residual + x @ W.T`` in one launch (added in float32, rounded once): x (..., K) -> residual's shape.
    ``prefetch``: arrays or (array, begin, end) byte ranges that blocks appended to the launch ask L2 for
    (``l2_prefetch``). ``low_rank``: a LoRA update of x as a ``LowRank`` term (h = x @ A.T, its rows from
    ``low_rank_offset``), added before the residual. ``emit``: the next launch's A-products of the output."""
    variant, lr = _low_rank(Variant(1, residual=True), low_rank, low_rank_offset)
    variant, ez = _emit_zero(variant, emit, None)
    return launch(x.reshape(-1, x.shape[-1]), [weight], variant, shapes=(tuple(residual.shape),),
                  extra=[residual.reshape(-1, residual.shape[-1]), *lr, *ez], prefetch=prefetch)[0]


_A_THREADS = 256  # threads per block of ``a_products``


@lru_cache(maxsize=None)
def _a_products_kernel():
    return cuda_kernel(name="mlx_qlora_a_products", input_names=["x", "a"], output_names=["h"],
                       source=sections("qmv.cu")["a_products"].replace("A_THREADS", str(_A_THREADS)), header=HEADER)


def a_products_args(rows: int, in_features: int, cols: int, dtype: mx.Dtype) -> dict:
    """Launch arguments of ``a_products``: one block per column."""
    return dict(template=[("DT", DTYPE_CODES[dtype]), ("M", rows), ("K", in_features), ("R", cols)],
                grid=(cols * _A_THREADS, 1, 1), threadgroup=(_A_THREADS, 1, 1), output_shapes=[(rows, cols)],
                output_dtypes=[mx.float32])


def a_products(x: mx.array, a: mx.array) -> mx.array:
    """``x @ a.T`` in float32 in one launch of our own: x (..., K) with at most ``MAX_ROWS`` rows, a (R, K) in
    x's dtype -> (M, R). The low-rank terms' A-products where no earlier launch writes them (see the
    ``a_products`` section of ``qmv.cu`` for why not a matmul). Inference only."""
    x2 = x.reshape(-1, x.shape[-1])
    if a.dtype != x2.dtype or a.shape[1] != x2.shape[1]:
        raise ValueError(f"a_products: x (..., {x2.shape[1]}) {x2.dtype} against a {a.shape} {a.dtype}")
    return _a_products_kernel()(inputs=[x2, a], **a_products_args(x2.shape[0], x2.shape[1], a.shape[0], x2.dtype))[0]


# ---- the same formulas in MLX operations ------------------------------------------------------------------


def reference(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """The kernel's formula in MLX operations: x (M, K), wq (N, K/8) uint32, scales/biases (N, 1) -> (M, N)
    float32. ``s * (x @ q.T) + b * sum(x)``, all in float32."""
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)  # (8,)
    q = ((wq[:, :, None] >> shifts) & 0xF).reshape(wq.shape[0], -1).astype(mx.float32)  # (N, K)
    xf = x.astype(mx.float32)
    dots = xf @ q.T  # (M, N)
    return scales.astype(mx.float32).T * dots + biases.astype(mx.float32).T * xf.sum(axis=-1, keepdims=True)


def _plus(y: mx.array, addend: Optional[Addend]) -> mx.array:
    return y if addend is None else y + addend[0] * addend[1].reshape(y.shape).astype(mx.float32)


def reference_swiglu(x: mx.array, gate: Weight, up: Weight,
                     addends: Optional[Sequence[Optional[Addend]]] = None) -> mx.array:
    """``qmv_swiglu``'s formula in MLX operations, in float32: x (M, K) -> (M, N); ``addends`` as there."""
    addends = addends or (None, None)
    g = _plus(reference(x, *gate), addends[0])
    return g * mx.sigmoid(g) * _plus(reference(x, *up), addends[1])


def reference_rms_norm(x: mx.array, gamma: mx.array, eps: float) -> mx.array:
    """float32 RMSNorm: x (M, K) -> (M, K)."""
    return x.astype(mx.float32) * reference_inv_rms(x, eps) * gamma.astype(mx.float32)


def reference_inv_rms(x: mx.array, eps: float) -> mx.array:
    """float32 1/rms of each row: x (M, K) -> (M, 1)."""
    xf = x.astype(mx.float32)
    return mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)


def low_rank_addends(low_rank: Optional[LowRank], inv_rms: Optional[mx.array] = None) -> Optional[list]:
    """The terms of ``low_rank`` as the addends (F, (M, N) float32) they amount to, for the references:
    ``h[:, c:c + r] @ b.T``, times ``inv_rms`` (M, 1) where the launch norms its input."""
    if low_rank is None:
        return None
    h, terms = low_rank
    h = h.reshape(-1, h.shape[-1]).astype(mx.float32)  # (M, R)
    out = []
    for t in terms:
        if t is None:
            out.append(None)
            continue
        factor, first, b = t
        u = h[:, first:first + b.shape[1]] @ b.astype(mx.float32).T  # (M, N)
        out.append((factor, u if inv_rms is None else u * inv_rms))
    return out


def reference_qkv_norm_rope(x, gamma, eps, weights, position: int, head_dim: int, rope_base: float,
                            rope_scale: float, addends: Optional[Sequence[Optional[Addend]]] = None
                            ) -> list[mx.array]:
    """``qkv_norm_rope``'s formula in MLX operations, float32: outputs (M, N_g) each; ``addends`` as there."""
    n = reference_rms_norm(x, gamma, eps)
    outs = [_plus(reference(n, *w), a) for w, a in zip(weights, addends or [None] * len(weights))]
    for g in (0, 1):
        y = outs[g]
        heads = y.reshape(y.shape[0], -1, 1, head_dim)  # (M, heads, 1, hd)
        roped = mx.fast.rope(heads, head_dim, traditional=False, base=rope_base, scale=rope_scale, offset=position)
        outs[g] = roped.reshape(y.shape)
    return outs
