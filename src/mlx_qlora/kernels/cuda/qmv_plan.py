"""Launch planning of the few-row 4-bit kernels (``qmv.py``): which body a launch takes, how many output
rows one warp computes, whether the input rows are staged in shared memory, and the launch's arguments.

Decoding calls every layer once per token, and building the arguments on each call cost more than the
kernel itself, so a plan is built once per shape and cached; the caches key on ``settings.current()``
too, so that ``settings.override`` takes effect. Which body is faster where: ``qmv_probe.py`` and
``decode_layer_probe.py`` measure it (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ... import settings
from ...settings import KernelSettings
from . import l2_prefetch
from .qmv_source import HEADER, LOW_RANK_HEADER, THREADS, Variant
from .sources import cuda_kernel

MAX_ROWS = 8  # input rows handled by one launch (every warp keeps one accumulator per row)
DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1}  # input dtypes the kernels read (float16: not yet)
MMA_ROWS = 16  # output rows per block of the tensor-core body; also its ``per_warp`` code
_MMA_SHARED_BYTES = 48 * 1024  # static shared memory of a block


def takes_mma(rows: int, in_features: int, out_rows: tuple[int, ...], variant: Variant, dtype: mx.Dtype,
              head_dim: int = 0) -> bool:
    """Whether a launch can use the tensor-core body: bfloat16 inputs (float32 ones would be rounded),
    K split into ``qmv_mma_warps`` warps of whole 32-input chunks, every matrix in whole tiles of
    ``MMA_ROWS`` rows (rotary pairs (p, p + HD/2) of 8 consecutive p), and the inputs and partial sums
    within the 48 KB of static shared memory."""
    warps = settings.current().qmv_mma_warps
    tiles = 2 if variant.swiglu else 1
    shared = rows * in_features * 2 + (warps + 1) * tiles * MMA_ROWS * rows * 4 + (2 * warps + 1) * rows * 4
    return (dtype == mx.bfloat16 and in_features % (32 * warps) == 0
            and all(n % MMA_ROWS == 0 for n in out_rows) and shared <= _MMA_SHARED_BYTES
            and (not any(variant.rope) or head_dim % MMA_ROWS == 0))


def prefers_mma(n_rows: int) -> bool:
    """Whether the tensor-core body is the one to take (where ``takes_mma``) for a launch of ``n_rows``
    output rows (gate and up: rows of each): from ``qmv_mma_min_rows`` on, unless ``qmv_mma`` is off
    (faster for gate/up, slower for o, down and q/k/v: ``qmv_probe.py``)."""
    s = settings.current()
    return s.qmv_mma and n_rows >= s.qmv_mma_min_rows


def rows_per_warp(out_rows: tuple[int, ...], even: bool = False) -> int:
    """Output rows one warp computes: more rows share each loaded input, fewer keep small layers busy
    (at least ``qmv_min_warps`` warps). A warp never straddles two matrices, so R divides every matrix's
    rows; ``even`` (rotary pairs) excludes 1."""
    min_warps = settings.current().qmv_min_warps
    total = sum(out_rows)
    for r in (4, 2):
        if all(n % r == 0 for n in out_rows) and (total // r >= min_warps or (even and r == 2)):
            return r
    if even:
        raise ValueError(f"rotary outputs need an even number of rows per matrix, got {out_rows}")
    return 1


def stage_bytes(rows: int, in_features: int) -> int:
    """Shared memory of a staged input: the rows of x * gamma in float32."""
    return rows * in_features * 4


def stages(variant: Variant, args: dict) -> bool:
    """Whether a launch (``launch_args``) stages its input rows in shared memory: the CUDA-core body of an
    RMSNorm variant (q/k/v, gate/up) where ``stage_bytes`` fits in ``qmv_stage_bytes``, unless
    ``qmv_stage`` is ``none`` (staged, q/k/v were faster; o and down have no norm and read per warp)."""
    s = settings.current()
    t = dict(args["template"])
    if t["R"] == MMA_ROWS or s.qmv_stage == "none" or variant.norm_eps is None:
        return False
    return stage_bytes(t["M"], t["K"]) <= s.qmv_stage_bytes


def uses_mma(args: dict) -> bool:
    """Whether launch arguments from ``launch_args`` are the tensor-core body's."""
    return dict(args["template"])["R"] == MMA_ROWS


def launch_args(rows: int, in_features: int, out_rows: tuple[int, ...], variant: Variant, dtype: mx.Dtype,
                per_warp: int = 0, shapes: Optional[tuple] = None, head_dim: int = 0, capacity: int = 0,
                prefetch_ranges: tuple[tuple[int, int], ...] = ()) -> dict:
    """The launch arguments (template, grid, threadgroup, output shapes and dtypes) of one shape. ``shapes``:
    the outputs' shapes (any shape with the elements of (rows, N) in row-major order), default (rows, N)
    each. ``capacity``: the slots of the cache a ``Variant.cache`` kernel writes to. ``per_warp``: 0 picks
    (the tensor-core body where ``takes_mma`` and ``prefers_mma``), ``MMA_ROWS`` asks for the tensor-core
    body, 1, 2 or 4 for the CUDA-core body. ``prefetch_ranges``: the byte ranges of the arrays that blocks
    appended to the launch ask L2 for (``l2_prefetch``)."""
    return _launch_args(rows, in_features, out_rows, variant, dtype, per_warp, shapes, head_dim, capacity,
                        prefetch_ranges, settings.current())


@lru_cache(maxsize=None)
def _launch_args(rows: int, in_features: int, out_rows: tuple[int, ...], variant: Variant, dtype: mx.Dtype,
                 per_warp: int, shapes: Optional[tuple], head_dim: int, capacity: int,
                 prefetch_ranges: tuple[tuple[int, int], ...], s: KernelSettings) -> dict:
    # ``s`` is ``settings.current()`` (what the helpers read): a parameter so that the cache keys on it.
    n_warp_rows = out_rows[0] if variant.swiglu else sum(out_rows)
    mma = takes_mma(rows, in_features, out_rows, variant, dtype, head_dim)
    if per_warp == MMA_ROWS and not mma:
        raise ValueError(f"the tensor-core body does not take {rows} x {in_features} inputs for rows {out_rows}")
    mma = mma and (per_warp == MMA_ROWS or (per_warp == 0 and prefers_mma(n_warp_rows)))
    per_warp = MMA_ROWS if mma else per_warp or rows_per_warp(out_rows, even=any(variant.rope))
    padded = tuple(out_rows) + (0,) * (3 - len(out_rows))
    block = 32 * s.qmv_mma_warps if mma else THREADS
    threads = n_warp_rows // per_warp * (block if mma else 32)  # the tensor-core body: a block per R rows
    if shapes is None:
        shapes = ((rows, out_rows[0]),) if variant.swiglu else tuple((rows, n) for n in out_rows)
    template = [("T", dtype), ("DT", DTYPE_CODES[dtype]), ("M", rows), ("K", in_features), ("ROWS", n_warp_rows),
                ("R", per_warp), ("P", 2 if variant.swiglu else 1), ("N0", padded[0]), ("N1", padded[1]),
                ("N2", padded[2])]
    if any(variant.rope) or variant.cache:
        template.append(("HD", head_dim))
    if variant.cache:
        template.append(("C", capacity))
    # with prefetch ranges, blocks appended to ask L2 for the next kernel's arrays (``l2_prefetch``)
    prefetch, blocks = l2_prefetch.launch((threads + block - 1) // block, prefetch_ranges, s.prefetch_blocks)
    template += prefetch
    return dict(
        template=template,
        grid=(blocks * block, 1, 1),
        threadgroup=(block, 1, 1),
        output_shapes=list(shapes),
        output_dtypes=[dtype] * len(shapes),
    )


@lru_cache(maxsize=None)
def kernel(variant: Variant, mma: bool, stage: bool, unroll: int, mma_chunks: int, mma_warps: int) -> Callable:
    """The ``mx.fast.cuda_kernel`` of one variant and body, built once (``Variant.source``)."""
    suffix = f"_mma{mma_chunks}w{mma_warps}" if mma else f"_u{unroll}{'_staged' if stage else ''}"
    return cuda_kernel(
        name=variant.name + suffix,
        input_names=variant.input_names,
        output_names=variant.output_names,
        source=variant.source(mma=mma, stage=stage, unroll=unroll, mma_chunks=mma_chunks, mma_warps=mma_warps),
        header=HEADER + (l2_prefetch.HEADER if variant.prefetch else "") + (
            "\n" + LOW_RANK_HEADER if variant.has_low_rank else ""),
    )


@lru_cache(maxsize=None)
def _plan(rows: int, in_features: int, out_rows: tuple[int, ...], variant: Variant, dtype: mx.Dtype,
          per_warp: int, shapes: Optional[tuple], head_dim: int, capacity: int,
          prefetch_ranges: tuple[tuple[int, int], ...], s: KernelSettings) -> tuple[Callable, dict]:
    """The kernel and launch arguments of one shape: one cache lookup per call on the decoding path."""
    args = _launch_args(rows, in_features, out_rows, variant, dtype, per_warp, shapes, head_dim, capacity,
                        prefetch_ranges, s)
    return kernel(variant, uses_mma(args), stages(variant, args), s.qmv_unroll, s.qmv_mma_chunks,
                  s.qmv_mma_warps), args


def launch(x2: mx.array, weights: Sequence[tuple[mx.array, mx.array, mx.array]], variant: Optional[Variant] = None,
           per_warp: int = 0, shapes: Optional[tuple] = None, extra: Sequence[mx.array] = (),
           head_dim: int = 0, capacity: int = 0, prefetch=()) -> list[mx.array]:
    """x2 (M, K) and (packed, scales, biases) per matrix -> one (M, N) output per matrix, or with SwiGLU
    one (M, N) output. ``extra``: the variant's further inputs in ``Variant.input_names`` order.
    ``prefetch``: arrays or (array, begin, end) byte ranges that the launch's appended blocks ask L2 for.
    ``per_warp``, ``shapes``, ``head_dim``, ``capacity``: see ``launch_args``."""
    variant = variant or Variant(n_matrices=len(weights))
    prefetch, pf_ranges = l2_prefetch.ranges(prefetch)
    if prefetch:
        variant = replace(variant, prefetch=len(prefetch))
    out_rows = tuple(w.shape[0] for w, _, _ in weights)
    run, args = _plan(x2.shape[0], x2.shape[1], out_rows, variant, x2.dtype, per_warp, shapes, head_dim, capacity,
                      pf_ranges, settings.current())
    inputs = [a for triple in weights for a in triple] + [x2, *extra] + prefetch
    return run(inputs=inputs, **args)
