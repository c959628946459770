"""One-token attention over a ``StaticKVCache`` in two CUDA kernels (the fused decoder layer on NVIDIA GPUs).

A static cache holds empty slots, so ``mx.fast.scaled_dot_product_attention`` needs an array mask, and
with an array mask MLX's CUDA backend composes attention from several operations (matmuls, softmax,
select) in every layer, each with the host's work per operation. Here attention is two launches that
read the number of filled slots from the cache's offset on the device: with position ``p`` just
written, slots ``0 .. p`` are filled while ``p`` < capacity, and all of them once the ring has wrapped
(the capacity is then the sliding window, so every slot is inside it). No mask exists.

Pass 1 splits the filled slots of each key/value head into ``splits(capacity)`` ranges, one block each,
and scores them for every query head of the group, one warp per run of slots with an online softmax
(grouped-query attention reads each key and value row once); it writes per head and range the maximum
score, the sum of exponentials and the weighted sum of values, in float32. Pass 2 combines the ranges
(the split softmax of flash-decoding). Their CUDA text is ``attention.cu``.

``model/fused_decode.py`` runs these passes inside the fused decoder layer; everywhere else attention is
MLX's with the mask. ``reference`` is the same computation in MLX operations (CPU tests check it against
attention with the mask of ``build_mask``, and run the kernels' sources on the CPU through
``tests/kernels/cuda_emulation.h``); ``attention_probe.py`` and ``decode_layer_probe.py`` time the passes.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ... import settings
from ...device import on_cuda
from . import l2_prefetch
from .sources import cuda_kernel, sections

_CU = sections("attention.cu")
PARTIAL_HEADER = _CU["partial_header"]
_THREADS = 128  # threads per block of pass 2 (4 warps); the head dimension is at most this
_SHARED_BYTES = 48 * 1024


def supports_shapes(q_shape, kv_shape, q_dtype: mx.Dtype, kv_dtype: mx.Dtype) -> bool:
    """Whether the passes take q (B, H, L, D) over keys/values (B, HKV, C, D): CUDA, one query per
    sequence, a head dimension that is a multiple of 32 up to 128, at most 16 query heads per key/value
    head."""
    B, H, L, D = q_shape
    HKV = kv_shape[1]
    return (
        L == 1 and D % 32 == 0 and D <= _THREADS and H % HKV == 0 and H // HKV <= 16
        and q_dtype in (mx.float32, mx.bfloat16, mx.float16) and kv_dtype == q_dtype and on_cuda()
    )


def partial_shared_bytes(threads: int, rep: int, D: int) -> int:
    """Pass 1's shared arrays: ``qs``, ``wacc`` and ``wml``."""
    warps = threads // 32
    return (warps + 1) * rep * D * 4 + warps * rep * 2 * 4


def partial_threads(rep: int, D: int) -> int:
    """Threads per block of pass 1: ``settings.attention_threads``, halved (down to one warp) while its
    shared arrays would exceed 48 KB (with 16 query heads per key/value head and D = 128, 4 warps)."""
    threads = settings.current().attention_threads
    while threads > 32 and partial_shared_bytes(threads, rep, D) > _SHARED_BYTES:
        threads //= 2
    return threads


def splits(capacity: int) -> int:
    """Slot ranges per key/value head: about ``settings.attention_slots`` slots each, at most 64 (enough
    blocks to fill a GPU, few partial results to combine)."""
    return max(1, min(64, capacity // settings.current().attention_slots))


def partial_source(scale: float, unroll: int, prefetch: int = 0) -> str:
    """Pass 1 as a kernel body (one block per (sequence, key/value head, range)), runs of ``unroll`` slots;
    with ``prefetch`` arrays, blocks from ``WORK_BLOCKS`` on only ask L2 for them (``l2_prefetch``)."""
    body = _CU["partial"].replace("@UNROLL@", str(unroll)).replace("SCALE", repr(float(scale)) + "f")
    return l2_prefetch.prefix(prefetch) + body


def combine_source(emit_cols: int = 0, emit_offset: int = 0) -> str:
    """Pass 2 as a kernel body (one block per (sequence, query head)); with ``emit_cols``, it also adds o_proj's
    A-products of its output to the layer's scratch (inputs ``ea``, ``eh``; ``qmv.Emit``)."""
    if not emit_cols:
        return _CU["combine"]
    return _CU["combine"] + "\n" + (_CU["combine_emit"].replace("EMIT_OFFSET", str(int(emit_offset)))
                                    .replace("EMIT_COLS", str(int(emit_cols))))


@lru_cache(maxsize=None)
def _kernels(scale: float, unroll: int, prefetch: int = 0):
    # The scale is a compile-time constant of the first kernel (one per model).
    suffix = f"_pf{prefetch}" if prefetch else ""
    partial = cuda_kernel(  # the scale is in the source, so in the name's digest
        name=f"mlx_qlora_decode_attention_partial_u{unroll}{suffix}",
        input_names=["q", "k", "v", "offset"] + [f"pf{i}" for i in range(prefetch)],
        output_names=["part_acc", "part_ml"],
        source=partial_source(scale, unroll, prefetch),
        header=PARTIAL_HEADER + (l2_prefetch.HEADER if prefetch else ""),
    )
    return partial, _combine_kernel(0, 0)


@lru_cache(maxsize=None)
def _combine_kernel(emit_cols: int, emit_offset: int):
    suffix = f"_emit{emit_cols}_{emit_offset}" if emit_cols else ""
    return cuda_kernel(
        name="mlx_qlora_decode_attention_combine" + suffix,
        input_names=["part_acc", "part_ml"] + (["ea", "eh"] if emit_cols else []),
        output_names=["out"],
        source=combine_source(emit_cols, emit_offset),
    )


def launch_args(B: int, H: int, HKV: int, D: int, C: int, dtype: mx.Dtype,
                prefetch_ranges: tuple[tuple[int, int], ...] = ()) -> tuple[dict, dict]:
    """Launch arguments of the two passes (``partial``, ``combine``); with ``prefetch_ranges`` (the byte
    ranges of the arrays pass 1 prefetches) the prefetching blocks appended to pass 1 (``l2_prefetch``)."""
    S = splits(C)
    threads = partial_threads(H // HKV, D)
    prefetch, blocks = l2_prefetch.launch(B * HKV * S, prefetch_ranges, settings.current().prefetch_blocks)
    partial = dict(
        template=[("T", dtype), ("H", H), ("HKV", HKV), ("D", D), ("C", C), ("S", S), ("THREADS", threads),
                  *prefetch],
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, H, S, D), (B, H, S, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    combine = dict(
        template=[("T", dtype), ("H", H), ("D", D), ("S", S)],
        grid=(B * H * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(B, 1, H * D)],
        output_dtypes=[dtype],
    )
    return partial, combine


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, offset: mx.array, scale: float,
                     prefetch=(), emit=None) -> mx.array:
    """q (B, H, 1, D), keys/values (B, HKV, C, D) with position ``offset`` just written -> (B, 1, H * D).
    ``prefetch``: arrays (or (array, begin, end) byte ranges) the next kernels read, asked into L2 during
    pass 1 where ``l2_prefetch`` is on. ``emit``: ``qmv.Emit`` of o_proj's low-rank term, (o_proj's A.T
    (H * D, r), the layer's scratch, offset), written by pass 2."""
    B, H, _, D = q.shape
    prefetch, pf_ranges = l2_prefetch.ranges(prefetch)
    partial_args, combine_args = launch_args(B, H, keys.shape[1], D, keys.shape[2], q.dtype, pf_ranges)
    partial, combine = _kernels(float(scale), settings.current().attention_unroll, len(prefetch))
    part_acc, part_ml = partial(inputs=[q, keys, values, offset.astype(mx.int32), *prefetch], **partial_args)
    if emit is None:
        return combine(inputs=[part_acc, part_ml], **combine_args)[0]
    ea, scratch, emit_offset = emit
    return _combine_kernel(int(ea.shape[1]), int(emit_offset))(inputs=[part_acc, part_ml, ea, scratch],
                                                               **combine_args)[0]


def reference(q: mx.array, keys: mx.array, values: mx.array, offset: int, scale: float) -> mx.array:
    """The kernels' computation in MLX operations, float32: attention over the filled slots only."""
    B, H, _, D = q.shape
    HKV, C = keys.shape[1], keys.shape[2]
    n_valid = C if offset >= C else offset + 1
    rep = H // HKV
    k = mx.repeat(keys[:, :, :n_valid].astype(mx.float32), rep, axis=1)  # (B, H, n, D)
    v = mx.repeat(values[:, :, :n_valid].astype(mx.float32), rep, axis=1)
    scores = (q.astype(mx.float32) * scale) @ k.transpose(0, 1, 3, 2)  # (B, H, 1, n)
    out = mx.softmax(scores, axis=-1) @ v  # (B, H, 1, D)
    return out.transpose(0, 2, 1, 3).reshape(B, 1, H * D)
