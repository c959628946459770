"""One-token attention over a ``StaticKVCache`` in two CUDA kernels (compiled decoding on NVIDIA GPUs).

A static cache holds empty slots, so ``mx.fast.scaled_dot_product_attention`` needs an array mask, and
with an array mask MLX's CUDA backend composes attention from several operations (matmuls, softmax,
select) in every layer, each with the host's work per operation (``benchmarks/RESULTS.md``), so
attention here is two launches that read the number of filled slots from the cache's offset on the
device: with position ``p`` just written, slots ``0 .. p`` are filled while ``p`` < capacity, and all of
them once the ring has wrapped (the capacity is then the sliding window, so every slot is inside it).
No mask exists.

Pass 1 splits the filled slots of each key/value head into ``splits(capacity)`` ranges, one block each,
and scores them for every query head of the group, one warp per run of slots with an online softmax
(grouped-query attention reads each key and value row once); it writes per head and range the maximum
score, the sum of exponentials and the weighted sum of values, in float32. Pass 2 combines the ranges
(the split softmax of flash-decoding).

``reference`` is the same computation in MLX operations (CPU tests check it against attention with the
mask of ``build_mask``, and run the kernels' sources on the CPU through ``tests/cuda_emulation.h``).
Metal and the CPU keep MLX's attention with the mask.
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

from ...device import on_cuda
from . import l2_prefetch

_THREADS = 128  # 4 warps; the head dimension is at most this
# Threads per block of pass 1 (fewer where its shared arrays would not fit: ``partial_threads``) and the
# slots each warp reads per run (in flight together). 8 warps with runs of 8 slots: pass 1 of Mistral-7B's
# decoding 0.287 against 0.315 ms per token with 4 warps and runs of 4 (H100, benchmarks/RESULTS.md).
# Env knobs for measurements (pass 2 keeps _THREADS).
PARTIAL_THREADS = int(os.environ.get("MLX_QLORA_ATTENTION_THREADS", "256"))
UNROLL = int(os.environ.get("MLX_QLORA_ATTENTION_UNROLL", "8"))
_SHARED_BYTES = 48 * 1024
# Off unless MLX_QLORA_DECODE_ATTENTION=ours (the fused decoder layers use these passes regardless). On an
# H100 a first form (one block per query head, 32 blocks in all) took more GPU time than it saved host
# time (5.9 against 4.6 ms per token with MLX's masked attention); the present two-pass form measured
# 5.21 against 5.91 ms in one run and 6.48 against 5.29 in another (benchmarks/RESULTS.md).
_ENABLED = os.environ.get("MLX_QLORA_DECODE_ATTENTION", "mlx") == "ours"

# Pass 1: one block per (sequence, key/value head, split of the slots). Each warp takes runs of UNROLL
# consecutive slots of the split and keeps, for all REP query heads that share the key/value head, a
# running maximum, sum of exponentials and exp-weighted sum of values (online softmax), each lane holding
# D/32 consecutive head dimensions: every key and value row is read once, by one warp, with the loads of
# UNROLL rows in flight together. The warps' results are then merged through shared memory and the block
# writes per head the maximum score, the sum of exp(score - max) and the exp-weighted sum of values.
_PARTIAL = r"""
  // q (B, H, 1, D); k, v (B, HKV, C, D); offset: the position just written.
  // part_acc (B, H, S, D), part_ml (B, H, S, 2): float32 partial results of split s.
  constexpr int REP = H / HKV;
  constexpr int WARPS = THREADS / 32;
  constexpr int PL = D / 32;  // head dimensions per lane
  constexpr int UNROLL = @UNROLL@;
  __shared__ float qs[REP * D];
  __shared__ float wacc[WARPS * REP * D];
  __shared__ float wml[WARPS * REP * 2];
  const int split = (@BLOCK@) % S;
  const int bk = (@BLOCK@) / S;  // b * HKV + hk
  const int b = bk / HKV;
  const int hk = bk % HKV;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int pos = offset[0];
  const int n_valid = pos >= C ? C : pos + 1;  // slots 0 .. pos until the ring wraps, then all
  const int chunk = (n_valid + S - 1) / S;
  const int s0 = split * chunk < n_valid ? split * chunk : n_valid;
  const int s1 = s0 + chunk < n_valid ? s0 + chunk : n_valid;
  const size_t q0 = ((size_t)b * H + (size_t)hk * REP) * D;
  const T* kh = k + (size_t)bk * C * D;
  const T* vh = v + (size_t)bk * C * D;
  @ACCESS@
  for (int i = tid; i < REP * D; i += THREADS) {
    qs[i] = q_at(q0 + i) * SCALE;
  }
  __syncthreads();
  float qr[REP][PL];
  float m[REP];
  float l[REP];
  float acc[REP][PL];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      qr[r][i] = qs[r * D + lane * PL + i];
      acc[r][i] = 0.0f;
    }
  }

  for (int base = s0 + warp * UNROLL; base < s1; base += WARPS * UNROLL) {
    float kv[UNROLL][PL];
    float vv[UNROLL][PL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u < s1) {
        key_row(base + u, kv[u]);
        value_row(base + u, vv[u]);
      } else {
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          kv[u][i] = 0.0f;
          vv[u][i] = 0.0f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (base + u < s1) {  // the same for every lane
        float dot[REP];
#pragma unroll
        for (int r = 0; r < REP; ++r) {
          dot[r] = 0.0f;
#pragma unroll
          for (int i = 0; i < PL; ++i) {
            dot[r] = fmaf(qr[r][i], kv[u][i], dot[r]);
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
          for (int r = 0; r < REP; ++r) {
            dot[r] += __shfl_xor_sync(0xffffffffu, dot[r], o);
          }
        }
#pragma unroll
        for (int r = 0; r < REP; ++r) {
          const float mn = fmaxf(m[r], dot[r]);
          const float alpha = __expf(m[r] - mn);  // 0 for the first slot (m = -inf)
          const float p = __expf(dot[r] - mn);
          l[r] = fmaf(l[r], alpha, p);
#pragma unroll
          for (int i = 0; i < PL; ++i) {
            acc[r][i] = fmaf(acc[r][i], alpha, p * vv[u][i]);
          }
          m[r] = mn;
        }
      }
    }
  }

  // merge the warps: M = max of their maxima, weights exp(m_w - M) (0 for a warp without slots)
#pragma unroll
  for (int r = 0; r < REP; ++r) {
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      wacc[(warp * REP + r) * D + lane * PL + i] = acc[r][i];
    }
    if (lane == 0) {
      wml[(warp * REP + r) * 2] = m[r];
      wml[(warp * REP + r) * 2 + 1] = l[r];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < REP * D; idx += THREADS) {
    const int r = idx / D;
    const int d = idx % D;
    float M = -INFINITY;
    for (int w = 0; w < WARPS; ++w) {
      M = fmaxf(M, wml[(w * REP + r) * 2]);
    }
    float a = 0.0f;
    float L = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      const float mw = wml[(w * REP + r) * 2];
      if (mw != -INFINITY) {
        const float e = __expf(mw - M);
        a = fmaf(e, wacc[(w * REP + r) * D + d], a);
        L = fmaf(e, wml[(w * REP + r) * 2 + 1], L);
      }
    }
    const size_t row = ((size_t)b * H + hk * REP + r) * S + split;
    part_acc[row * D + d] = a;
    if (d == 0) {
      part_ml[row * 2] = M;
      part_ml[row * 2 + 1] = L;
    }
  }
"""

# Pass 2: one block per (sequence, query head) combines the splits: out = sum_s e^(m_s - M) acc_s /
# sum_s e^(m_s - M) l_s, with M the largest m_s (splits without slots have m = -inf, l = 0 and acc = 0, and
# weigh 0). The loops have no branch, so the compiler may issue their loads together.
_COMBINE = r"""
  // part_acc (B, H, S, D), part_ml (B, H, S, 2) -> out (B, 1, H * D)
  const int bh = @BLOCK@;
  const int d = threadIdx.x;
  @ACCESS@
  float ms[S];
#pragma unroll
  for (int j = 0; j < S; ++j) {
    ms[j] = ml_at(((size_t)bh * S + j) * 2);
  }
  float M = -INFINITY;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    M = fmaxf(M, ms[j]);
  }
  float L = 0.0f;
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < S; ++j) {
    const float w = ms[j] == -INFINITY ? 0.0f : __expf(ms[j] - M);
    L += w * ml_at(((size_t)bh * S + j) * 2 + 1);
    acc += w * (d < D ? acc_at(((size_t)bh * S + j) * D + d) : 0.0f);
  }
  if (d < D) {
    out[(size_t)bh * D + d] = static_cast<T>(acc / L);
  }
"""


def supports(q: mx.array, keys: mx.array) -> bool:
    """Whether ``decode_attention`` takes this call: opted in (``MLX_QLORA_DECODE_ATTENTION=ours``) and
    ``supports_shapes``."""
    return _ENABLED and supports_shapes(q.shape, keys.shape, q.dtype, keys.dtype)


def supports_shapes(q_shape, kv_shape, q_dtype: mx.Dtype, kv_dtype: mx.Dtype) -> bool:
    """CUDA, one query per sequence, a head dimension that is a multiple of 32 up to 128, at most 16
    query heads per key/value head."""
    B, H, L, D = q_shape
    HKV = kv_shape[1]
    return (
        L == 1 and D % 32 == 0 and D <= _THREADS and H % HKV == 0 and H // HKV <= 16
        and q_dtype in (mx.float32, mx.bfloat16, mx.float16) and kv_dtype == q_dtype and on_cuda()
    )


def _partial_shared_bytes(threads: int, rep: int, D: int) -> int:
    """Pass 1's shared arrays: ``qs``, ``wacc`` and ``wml``."""
    warps = threads // 32
    return (warps + 1) * rep * D * 4 + warps * rep * 2 * 4


def partial_threads(rep: int, D: int) -> int:
    """Threads per block of pass 1: ``PARTIAL_THREADS``, halved (down to one warp) while its shared arrays
    would exceed 48 KB (with 16 query heads per key/value head and D = 128, 4 warps)."""
    threads = PARTIAL_THREADS
    while threads > 32 and _partial_shared_bytes(threads, rep, D) > _SHARED_BYTES:
        threads //= 2
    return threads


# Slots per range of pass 1 (env knob for measurements).
SLOTS_PER_SPLIT = int(os.environ.get("MLX_QLORA_ATTENTION_SLOTS", "64"))


def splits(capacity: int) -> int:
    """Slot ranges per key/value head: about ``SLOTS_PER_SPLIT`` slots each, at most 64 (enough blocks to
    fill a GPU, few partial results to combine)."""
    return max(1, min(64, capacity // SLOTS_PER_SPLIT))


# Pass 1's kernel reads a lane's PL consecutive values of a key or value row with one load where it can (4
# values of bfloat16: 8 bytes; of float32: 16 bytes; rows of D = 128 start at multiples of that), else one
# load per value.
PARTIAL_HEADER = r"""
template <typename U, int N>
struct RowLoad {
  static __device__ __forceinline__ void run(const U* p, float* o) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      o[i] = static_cast<float>(p[i]);
    }
  }
};

template <>
struct RowLoad<float, 4> {
  static __device__ __forceinline__ void run(const float* p, float* o) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
};

template <>
struct RowLoad<__nv_bfloat16, 4> {
  static __device__ __forceinline__ void run(const __nv_bfloat16* p, float* o) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xffff0000u);
  }
};
"""

# How the passes read their inputs. As kernels: plain loads (key and value rows through ``RowLoad``).
# Inside the one-launch decoder layer (``model/layer_kernel.py``): q and the partial results come from
# other blocks of the same launch (read through L2), and this position's key and value come from
# ``k_new``/``v_new``, not from the cache, whose slot for it is written after the launch.
_PARTIAL_ACCESS = {
    "kernel": """auto q_at = [&](size_t i) { return static_cast<float>(q[i]); };
  auto key_row = [&](int s, float* o) { RowLoad<T, PL>::run(kh + (size_t)s * D + lane * PL, o); };
  auto value_row = [&](int s, float* o) { RowLoad<T, PL>::run(vh + (size_t)s * D + lane * PL, o); };""",
    "fused": """const int cur = pos % C;
  const T* kn = k_new + (size_t)bk * D;
  const T* vn = v_new + (size_t)bk * D;
  auto q_at = [&](size_t i) { return load_f_cg<DT>(q, i); };
  auto key_at = [&](int s, int d) {
    return s == cur ? load_f_cg<DT>(kn, d) : static_cast<float>(kh[(size_t)s * D + d]);
  };
  auto value_at = [&](int s, int d) {
    return s == cur ? load_f_cg<DT>(vn, d) : static_cast<float>(vh[(size_t)s * D + d]);
  };
  auto key_row = [&](int s, float* o) {
    for (int i = 0; i < PL; ++i) {
      o[i] = key_at(s, lane * PL + i);
    }
  };
  auto value_row = [&](int s, float* o) {
    for (int i = 0; i < PL; ++i) {
      o[i] = value_at(s, lane * PL + i);
    }
  };""",
}
_COMBINE_ACCESS = {
    "kernel": """auto ml_at = [&](size_t i) { return part_ml[i]; };
  auto acc_at = [&](size_t i) { return part_acc[i]; };""",
    "fused": """auto ml_at = [&](size_t i) { return __ldcg(part_ml + i); };
  auto acc_at = [&](size_t i) { return __ldcg(part_acc + i); };""",
}


def _partial(block: str, access: str, scale: float, unroll: int) -> str:
    """Pass 1's body with its block index expression, input access (``_PARTIAL_ACCESS``) and constants."""
    return (_PARTIAL.replace("@BLOCK@", block).replace("@ACCESS@", _PARTIAL_ACCESS[access])
            .replace("@UNROLL@", str(unroll)).replace("SCALE", repr(float(scale)) + "f"))


def partial_source(scale: float, unroll: int, prefetch: int = 0, mode: str = "l2") -> str:
    """Pass 1 as a kernel body (one block per (sequence, key/value head, split)), runs of ``unroll`` slots;
    with ``prefetch`` arrays, blocks from ``WORK_BLOCKS`` on only ask L2 for them (``kernels/cuda/l2_prefetch.py``)."""
    return l2_prefetch.prefix(prefetch, mode) + _partial("blockIdx.x", "kernel", scale, unroll)


def combine_source() -> str:
    """Pass 2 as a kernel body (one block per (sequence, query head))."""
    return _COMBINE.replace("@BLOCK@", "blockIdx.x").replace("@ACCESS@", _COMBINE_ACCESS["kernel"])


def device_functions(scale: float) -> str:
    """Both passes as ``__device__`` functions of the block index ``vb`` for a launch that loops over
    them (``model/layer_kernel.py``); the partial pass takes this position's key and value apart."""
    partial = _partial("vb", "fused", scale, UNROLL)
    combine = _COMBINE.replace("@BLOCK@", "vb").replace("@ACCESS@", _COMBINE_ACCESS["fused"])
    return f"""
template <typename T, int DT, int H, int HKV, int D, int C, int S, int THREADS>
__device__ __forceinline__ void attention_partial(const int vb, const T* q, const T* k, const T* v, const T* k_new,
    const T* v_new, const int32_t* offset, float* part_acc, float* part_ml) {{
{partial}
}}

template <typename T, int H, int D, int S>
__device__ __forceinline__ void attention_combine(const int vb, const float* part_acc, const float* part_ml, T* out) {{
{combine}
}}
"""


@lru_cache(maxsize=None)
def _kernels(scale: float, unroll: int, prefetch: int = 0, mode: str = "l2"):
    # The scale is a compile-time constant of the first kernel (one per model).
    suffix = f"_pf{prefetch}{mode}" if prefetch else ""
    partial = mx.fast.cuda_kernel(
        name=f"mlx_qlora_decode_attention_partial_{abs(hash(scale))}_u{unroll}{suffix}",
        input_names=["q", "k", "v", "offset"] + [f"pf{i}" for i in range(prefetch)],
        output_names=["part_acc", "part_ml"],
        source=partial_source(scale, unroll, prefetch, mode),
        header=PARTIAL_HEADER + (l2_prefetch.HEADER if prefetch else ""),
    )
    combine = mx.fast.cuda_kernel(
        name="mlx_qlora_decode_attention_combine",
        input_names=["part_acc", "part_ml"],
        output_names=["out"],
        source=combine_source(),
    )
    return partial, combine


def launch_args(B: int, H: int, HKV: int, D: int, C: int, dtype: mx.Dtype,
                prefetch_ranges: tuple[tuple[int, int], ...] = ()) -> tuple[dict, dict]:
    """Launch arguments of the two passes (``partial``, ``combine``); with ``prefetch_ranges`` (the byte
    ranges of the arrays pass 1 prefetches) the prefetching blocks appended to pass 1 (``l2_prefetch``)."""
    S = splits(C)
    threads = partial_threads(H // HKV, D)
    prefetch, blocks = l2_prefetch.launch(B * HKV * S, prefetch_ranges)
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
                     prefetch=()) -> mx.array:
    """q (B, H, 1, D), keys/values (B, HKV, C, D) with position ``offset`` just written -> (B, 1, H * D).
    ``prefetch``: arrays (or (array, begin, end) byte ranges) the next kernels read, asked into L2 during
    pass 1 where ``l2_prefetch`` is on."""
    B, H, _, D = q.shape
    prefetch, pf_ranges = l2_prefetch.ranges(prefetch)
    partial_args, combine_args = launch_args(B, H, keys.shape[1], D, keys.shape[2], q.dtype, pf_ranges)
    partial, combine = _kernels(float(scale), UNROLL, len(prefetch), l2_prefetch.MODE if prefetch else "l2")
    part_acc, part_ml = partial(inputs=[q, keys, values, offset.astype(mx.int32), *prefetch], **partial_args)
    return combine(inputs=[part_acc, part_ml], **combine_args)[0]


def reference(q: mx.array, keys: mx.array, values: mx.array, offset: int, scale: float) -> mx.array:
    """The kernel's computation in MLX operations, float32: attention over the filled slots only."""
    B, H, _, D = q.shape
    HKV, C = keys.shape[1], keys.shape[2]
    n_valid = C if offset >= C else offset + 1
    rep = H // HKV
    k = mx.repeat(keys[:, :, :n_valid].astype(mx.float32), rep, axis=1)  # (B, H, n, D)
    v = mx.repeat(values[:, :, :n_valid].astype(mx.float32), rep, axis=1)
    scores = (q.astype(mx.float32) * scale) @ k.transpose(0, 1, 3, 2)  # (B, H, 1, n)
    out = mx.softmax(scores, axis=-1) @ v  # (B, H, 1, D)
    return out.transpose(0, 2, 1, 3).reshape(B, 1, H * D)
