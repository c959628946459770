"""Few-row matmuls with per-row 4-bit weights as CUDA kernels (batch decoding on NVIDIA GPUs).

For a row ``n`` with scale ``s`` and offset ``b``, ``W[n, k] = s * q[n, k] + b``, so

    y[m, n] = s * sum_k q[n, k] * x[m, k]  +  b * sum_k x[m, k]

and the kernel reads each packed row once, straight from memory: each warp computes 1, 2 or 4 output
rows (``rows_per_warp``) that share every loaded input, each lane loading 16 bytes (32 weights) at a
time, the M <= ``MAX_ROWS`` input rows read alongside and both sums accumulated in float32, then a warp
reduction (the RMSNorm launches first stage their input rows in shared memory once per block,
``_STAGE``). No dequantized weight and no expanded scales exist. A second body (``_BODY_MMA``) does the
multiply-adds on the tensor cores (bfloat16 inputs, float32 sums) for the launches with the most rows.
``mx.quantized_matmul`` needs MLX's group layout (our one scale per row repeated for every group of 64)
and ran far below the memory's speed on an H100 (``benchmarks/RESULTS.md``).

One kernel body serves every ``Variant``: one weight (``qmv``), up to three weights of one input with
one output each (``qmv_split``: q, k and v), gate and up with SwiGLU (``qmv_swiglu``), and for the fused
decoder layer an RMSNorm prologue, rotary embeddings in the epilogue and a residual sum
(``qkv_norm_rope``, ``swiglu_norm``, ``matmul_residual``).

Only CUDA is covered: on Metal and on the CPU, ``QuantizedLinear`` keeps MLX's ``quantized_matmul``.
The ``reference*`` functions are the same formulas in portable MLX operations (the CPU tests check them
against the dequantized weight and run the kernels' sources through a CUDA emulation against them; the
GPU probes check the kernels against them).
"""

from __future__ import annotations

import os
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ...device import on_cuda
from . import l2_prefetch

MAX_ROWS = 8  # input rows handled by one launch (every warp keeps one accumulator per row)
_DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1}  # input dtypes the kernel reads (float16: not yet)
_THREADS = 256
MMA_ROWS = 16  # output rows per block of the tensor-core body (``_BODY_MMA``); also its ``per_warp`` code
# Warps per block of the tensor-core body (K split over them): with 4, gate/up's 896 blocks fit on an
# H100 at once (8 blocks per multiprocessor; with 8 warps, 4 blocks: 1.7 waves), 6.5% faster than 8 warps
# (2 warps: no faster than 8). How often the CUDA-core body's weight loop is unrolled (loads in flight per
# lane): 4 took o and down 2% faster than 2 (benchmarks/RESULTS.md). Env knobs for measurements.
_MMA_WARPS = int(os.environ.get("MLX_QLORA_QMV_MMA_WARPS", "4"))
_UNROLL = int(os.environ.get("MLX_QLORA_QMV_UNROLL", "4"))
_MMA_SHARED_BYTES = 48 * 1024
# Benchmark knob: MLX_QLORA_QMV_MMA=0 keeps the tensor-core body off (the CUDA-core body everywhere).
_MMA_ENABLED = os.environ.get("MLX_QLORA_QMV_MMA", "1") != "0"
# Adjacent 16-byte chunks a lane loads per iteration of the tensor-core body (env knob for measurements).
MMA_CHUNKS = int(os.environ.get("MLX_QLORA_QMV_MMA_CHUNKS", "2"))
# The tensor-core body only for launches of at least this many output rows (gate and up: rows of each).
MMA_MIN_ROWS = int(os.environ.get("MLX_QLORA_QMV_MMA_MIN_ROWS", "8192"))
ROWS_PER_WARP_MIN_WARPS = int(os.environ.get("MLX_QLORA_QMV_MIN_WARPS", "2048"))
# Alone (not fused), layers smaller than this keep MLX's quantized_matmul: a custom-kernel call costs
# more host time than MLX's op, and decoding is host-bound; with the kernel on every layer decoding was
# slower (161.8 against 190.3 tokens/s compiled, H100; benchmarks/RESULTS.md). Env knob for measurements.
MIN_WEIGHTS = int(os.environ.get("MLX_QLORA_QMV_MIN", str(1 << 25)))
# Which CUDA-core launches stage their input rows in shared memory once per block (``_STAGE``): "norm" (the
# RMSNorm kernels: q/k/v), "all", or "none"; only where the staged rows fit in STAGE_MAX_BYTES. On an H100
# q/k/v took 0.41 against 0.46 ms per token of Mistral-7B (medians), while o and down staged were slower
# (0.77-0.79 against 0.72 ms; benchmarks/RESULTS.md). Env knobs for measurements.
STAGE = os.environ.get("MLX_QLORA_QMV_STAGE", "norm")
STAGE_MAX_BYTES = int(os.environ.get("MLX_QLORA_QMV_STAGE_BYTES", str(32 * 1024)))
# Benchmark knob: MLX_QLORA_QMV=mlx keeps MLX's quantized_matmul (expanded layout) even on CUDA.
_ENABLED = os.environ.get("MLX_QLORA_QMV", "ours") != "mlx"

_HEADER = r"""
template <typename U>
__device__ __forceinline__ float load_res(const U* p, size_t i) {
  return static_cast<float>(p[i]);
}

// Eight values as floats: two float4 of float32, or one uint4 of eight bfloat16 (first in the low half).
__device__ __forceinline__ void unpack_x8(float4 a, float4 b, float* o) {
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

__device__ __forceinline__ void unpack_x8(uint4 v, float* o) {
  unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(u[i] << 16);
    o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

// Eight consecutive inputs of row `x` starting at element k (a multiple of 8), as floats.
template <int DT>
__device__ __forceinline__ void load_x8(const unsigned char* x, int k, float* o);

template <>
__device__ __forceinline__ void load_x8<0>(const unsigned char* x, int k, float* o) {  // float32
  const float4* p = reinterpret_cast<const float4*>(x) + (k >> 2);
  unpack_x8(p[0], p[1], o);
}

template <>
__device__ __forceinline__ void load_x8<1>(const unsigned char* x, int k, float* o) {  // bfloat16
  unpack_x8(*(reinterpret_cast<const uint4*>(x) + (k >> 3)), o);
}

// Eight staged inputs (``_STAGE``): 16-byte unit u of shared memory (float32: and unit u + stride).
template <int DT>
__device__ __forceinline__ void load_staged(const uint4* s, int u, int stride, float* o);

template <>
__device__ __forceinline__ void load_staged<0>(const uint4* s, int u, int stride, float* o) {  // float32
  const float4* f = reinterpret_cast<const float4*>(s);
  unpack_x8(f[u], f[u + stride], o);
}

template <>
__device__ __forceinline__ void load_staged<1>(const uint4* s, int u, int stride, float* o) {  // bfloat16
  unpack_x8(s[u], o);
}

// RMSNorm of eight inputs xv at k (before the 1/rms factor): adds their squares to ss, multiplies them by gamma.
template <int DT>
__device__ __forceinline__ void norm_x8(const void* gamma, int k, float* xv, float& ss) {
  float gv[8];
  load_x8<DT>(reinterpret_cast<const unsigned char*>(gamma), k, gv);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    ss = fmaf(xv[i], xv[i], ss);
    xv[i] *= gv[i];
  }
}

// The bits of a float rounded to bfloat16 (to nearest, ties to even), in the low 16 bits.
__device__ __forceinline__ unsigned int bf16_bits(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

#ifndef MLX_QLORA_MMA_DEFINED
// d += A b on the tensor cores, for one warp: A 16 x 16 and b 16 x 8 in bfloat16 pairs, d 16 x 8 in float32,
// in PTX's fragment layouts for mma.m16n8k16 (lane = 4 * group + t: a0 = A[group][2t, 2t+1], a1 = A[group+8][..],
// a2 = A[group][2t+8, 2t+9], a3 = A[group+8][..]; b0 = b[2t, 2t+1][group], b1 = b[2t+8, 2t+9][group];
// d = (row group, columns 2t, 2t+1), (row group+8, the same columns)).
__device__ __forceinline__ void mma_bf16_16816(float* d, unsigned int a0, unsigned int a1, unsigned int a2,
                                               unsigned int a3, unsigned int b0, unsigned int b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif
"""

# The kernel body, shared by every variant. ``ROWS`` output rows in all, ``P * R`` weight rows loaded per
# warp (``row_ptr``, set by the variant's SELECT code), ``EPILOGUE`` writes y from ``acc`` and ``xsum``.
_BODY = r"""
  // Packed weights: uint32 words, 8 weights per word, first input in the lowest bits; x (M, K). Each
  // warp computes R consecutive output rows, so every input value is loaded and converted once for R
  // rows. A 4-bit value q becomes the float 1 + q/16 by placing it in the top mantissa bits of 1.0f (no
  // integer-to-float conversion), so the warp accumulates
  //   acc = sum_k (1 + q/16) x = sum(x) + (q.x)/16   and   q.x = 16 * (acc - sum(x)).
  const int lane = threadIdx.x & 31;
  const int n0 = (@WARP@) * R;
  constexpr int XBYTES = DT == 0 ? 4 : 2;
  constexpr int CHUNKS = K / 32;  // 16-byte chunks (32 weights) per weight row
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  @STAGE@
  if (n0 >= ROWS) {
    return;
  }
  constexpr int RR = P * R;       // weight rows read by this warp
  const uint4* row_ptr[RR];
  @SELECT@
  @PROLOGUE@
  float acc[RR][M];
  float xsum[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = @XSUM0@;
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] = 0.0f;
    }
  }
#pragma unroll @UNROLL@
  for (int j = lane; j < CHUNKS; j += 32) {
    uint4 packed[RR];
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      packed[r] = row_ptr[r][j];
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int k = j * 32 + t * 8;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[8];
        @XLOAD@
        @XSCALE@
        @XSUM@
#pragma unroll
        for (int r = 0; r < RR; ++r) {
          const unsigned int word = t == 0 ? packed[r].x : t == 1 ? packed[r].y : t == 2 ? packed[r].z : packed[r].w;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const unsigned int bits = i < 5 ? (word << (19 - 4 * i)) : (word >> (4 * i - 19));
            const float q = __uint_as_float((bits & 0x00780000u) | 0x3f800000u);  // 1 + q/16
            acc[r][m] = fmaf(q, xv[i], acc[r][m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      @XSUM_REDUCE@
#pragma unroll
      for (int r = 0; r < RR; ++r) {
        acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], offset);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] = 16.0f * (acc[r][m] - xsum[m]);  // q.x, what the epilogues read
    }
  }
  @POSTREDUCE@
  // Lane r writes row n0 + r (unrolled with a compare: indexing registers by lane would spill them).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r == lane) {
      const int n = n0 + r;
      @EPILOGUE@
    }
  }
"""

# The tensor-core body (``MMA_ROWS`` = 16 output rows per block, bfloat16 inputs): the same sums as ``_BODY``
# with the multiply-adds done by mma.m16n8k16, so a lane spends about one integer operation per weight
# (``_BODY`` spends three instructions per weight and input row: with several input rows it is bound by
# issuing them). Each of the block's ``_MMA_WARPS`` warps takes its share of K for all the block's rows
# and the partial sums meet in shared memory; then warp 0's lanes r < R run the same epilogues on ``acc``
# (shared) and ``xsum``. Taken where ``takes_mma`` and ``prefers_mma`` (on an H100: gate/up, not o, down or q/k/v).
_BODY_MMA = r"""
  // A 4-bit value q becomes the bfloat16 128 + q by placing it in the low mantissa bits of 128.0 (two at
  // a time: nibbles j and j + 4 of a word land in the two halves of one register), so the mma sums
  // (128 + q) x over k and q.x = sum - 128 sum(x). The inputs are rounded to bfloat16 once (after the
  // RMSNorm's weight, if any) and stored in shared memory in the pair order of the weights.
  constexpr int WARPS = MMA_WARPS;
  constexpr int KS = K / WARPS;    // inputs per warp
  constexpr int CH = KS / 32;      // 16-byte chunks (32 weights) of a row per warp
  constexpr int CHUNKS = K / 32;
  constexpr int RR = P * R;        // weight rows of the block: P tiles of 16
  constexpr int U = MMA_CHUNKS;    // chunks per lane and iteration
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tid = lane & 3;
  const int n0 = blockIdx.x * R;
  const uint4* row_ptr[2 * P];     // rows gid and gid + 8 of each tile
  @SELECT@
  __shared__ uint4 xs[M * K / 8];  // (M, K) as pairs (j, j + 4), (j + 1, j + 5), ... of 8 inputs
  __shared__ float part[WARPS][RR][M];
  __shared__ float part_x[WARPS][2][M];
  __shared__ float acc[RR][M];
  __shared__ float sum_x[M];
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  const int k0 = warp * KS;
  float xsum[M];
  float ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = 0.0f;
    ss[m] = 0.0f;
    for (int gi = lane; gi < KS / 8; gi += 32) {
      const int k = k0 + gi * 8;
      float xv[8];
      load_x8<DT>(xb + (size_t)m * K * 2, k, xv);
      @XPREP@
      unsigned int hb[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        hb[i] = bf16_bits(xv[i]);
        xsum[m] += __uint_as_float(hb[i] << 16);
      }
      xs[(m * K + k) / 8] = make_uint4(hb[0] | (hb[4] << 16), hb[1] | (hb[5] << 16), hb[2] | (hb[6] << 16),
                                       hb[3] | (hb[7] << 16));
    }
  }
  __syncwarp();
  float d[P][4];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    d[p][0] = d[p][1] = d[p][2] = d[p][3] = 0.0f;
  }
  // Lane (gid, tid) loads chunks c0 + U tid + u (u < U) of rows gid and gid + 8 and of input row gid, so a
  // quad reads 16 U contiguous bytes of a row: the mma's k index 2 tid, 2 tid + 1, 2 tid + 8, 2 tid + 9 are
  // inputs 8w + (0, 4, 1, 5) or 8w + (2, 6, 3, 7) of a chunk's word w.
#pragma unroll 1
  for (int c0 = 0; c0 < CH; c0 += 4 * U) {
    uint4 wv[U][2 * P];
    uint4 xv[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + U * tid + u;
      const bool ok = c < CH;
#pragma unroll
      for (int h = 0; h < 2 * P; ++h) {
        wv[u][h] = ok ? row_ptr[h][k0 / 32 + c] : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        xv[u][w] = ok && gid < M ? xs[(gid * K + k0 + c * 32) / 8 + w] : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const unsigned int b[4] = {xv[u][w].x, xv[u][w].y, xv[u][w].z, xv[u][w].w};
#pragma unroll
        for (int p = 0; p < P; ++p) {
          const uint4 wl = wv[u][2 * p], wh = wv[u][2 * p + 1];
          const unsigned int lo = w == 0 ? wl.x : w == 1 ? wl.y : w == 2 ? wl.z : wl.w;
          const unsigned int hi = w == 0 ? wh.x : w == 1 ? wh.y : w == 2 ? wh.z : wh.w;
          unsigned int a[4], a8[4];  // nibbles (j, j + 4) as bfloat16 128 + q
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            a[j] = ((lo >> (4 * j)) & 0x000f000fu) | 0x43004300u;
            a8[j] = ((hi >> (4 * j)) & 0x000f000fu) | 0x43004300u;
          }
          mma_bf16_16816(d[p], a[0], a8[0], a[1], a8[1], b[0], b[1]);
          mma_bf16_16816(d[p], a[2], a8[2], a[3], a8[3], b[2], b[3]);
        }
      }
    }
  }
  // The warps' partial sums: d[p][i] is row p * 16 + gid + 8 (i / 2) of input row 2 tid + i % 2.
#pragma unroll
  for (int p = 0; p < P; ++p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = 2 * tid + (i & 1);
      if (m < M) {
        part[warp][p * 16 + gid + 8 * (i >> 1)][m] = d[p][i];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      xsum[m] += __shfl_xor_sync(0xffffffffu, xsum[m], offset);
      ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], offset);
    }
    if (lane == 0) {
      part_x[warp][0][m] = xsum[m];
      part_x[warp][1][m] = ss[m];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < RR * M; idx += WARPS * 32) {
    const int rr = idx / M, m = idx % M;
    float a = 0.0f, sx = 0.0f, sq = 0.0f;
#pragma unroll
    for (int v = 0; v < WARPS; ++v) {
      a += part[v][rr][m];
      sx += part_x[v][0][m];
      sq += part_x[v][1][m];
    }
    a -= 128.0f * sx;
    @NORM@
    acc[rr][m] = a;
    if (rr == 0) {
      sum_x[m] = sx;
    }
  }
  __syncthreads();
  if (warp != 0) {
    return;
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = sum_x[m];
  }
  // Lane r writes row n0 + r.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r == lane) {
      const int n = n0 + r;
      @EPILOGUE@
    }
  }
"""

_MMA_XPREP_NORM = r"""
      norm_x8<DT>(gamma, k, xv, ss[m]);
"""

_MMA_NORM = r"""
    {
      const float inv_rms = rsqrtf(sq / (float)K + EPS);
      a *= inv_rms;
      sx *= inv_rms;
    }
"""


# Up to three weight matrices of one input (G of them, N0 + N1 + N2 rows in all); matrix g writes its own
# output y<g> (M, N<g>). The code names only the inputs that exist, so it is written out for each G.
# A matrix with rope set gets rotary embeddings in its epilogue: its output rows are heads of HD rows, and
# a warp reads rows (p, p + HD/2) of one head for R/2 consecutive p, the pairs that rotate together.
def _matrix_branches(n_matrices: int) -> list[str]:
    """C code choosing ``base``, ``local`` and ``g`` for the warp's first row ``n0``."""
    lines = ["  const unsigned int* base = w0;", "  int local = n0;", "  int g = 0;"]
    for g in range(1, n_matrices):
        first = " + ".join(f"N{i}" for i in range(g))
        lines += [f"  if (n0 >= {first}) {{", f"    base = w{g};", f"    local = n0 - ({first});", f"    g = {g};", "  }"]
    return lines


def _roped_expr(rope: tuple[bool, ...]) -> str:
    terms = [f"g == {g}" for g, on in enumerate(rope) if on]
    return " || ".join(terms) if terms else "false"


def _select_split(n_matrices: int, rope: tuple[bool, ...] = (), mma: bool = False) -> str:
    """``row_ptr`` of the warp's rows: all R (``_BODY``), or rows gid and gid + 8 of the block (``_BODY_MMA``)."""
    lines = _matrix_branches(n_matrices)
    lines += [f"  const bool roped = {_roped_expr(rope)};", "#pragma unroll"]
    if mma:
        lines += ["  for (int h = 0; h < 2; ++h) {", "    const int r = gid + 8 * h;"]
    else:
        lines += ["  for (int r = 0; r < R; ++r) {"]
    lines += ["    int row = local + r;"]
    if any(rope):
        lines += ["    if (roped) {",
                  "      row = (local / HD) * HD + (local % HD) / 2 + (r < R / 2 ? r : r - R / 2 + HD / 2);",
                  "    }"]
    lines += [f"    row_ptr[{'h' if mma else 'r'}] = reinterpret_cast<const uint4*>(base) + (size_t)row * CHUNKS;",
              "  }"]
    return "\n".join(lines)


def _store(g: int, n: str, value: str, cache: bool) -> str:
    """Write ``value`` to output row ``n`` (of sequence m) of matrix g; with ``cache``, matrices 1 and 2 (k
    and v) go to slot ``rope_pos[0] % C`` of the key/value cache instead, (M, N/HD, C, HD) in place."""
    if cache and g in (1, 2):
        buf = "kc" if g == 1 else "vc"
        return (f"const_cast<T*>({buf})[(((size_t)m * (N{g} / HD) + ({n}) / HD) * C + rope_pos[0] % C) * HD "
                f"+ ({n}) % HD] = static_cast<T>({value});")
    return f"y{g}[(size_t)m * N{g} + {n}] = static_cast<T>({value});"


def _epilogue_split(n_matrices: int, rope: tuple[bool, ...] = (), residual: bool = False, cache: bool = False) -> str:
    """Lane r's writes. Plain rows: row local + r of matrix g. Roped matrices: lanes r < R/2 write the pair
    (p, p + HD/2), p = (local % HD) / 2 + r, rotated by position ``rope_pos[0]``. ``cache``: see ``_store``."""
    lines = ["      " + line.strip() for line in _matrix_branches(n_matrices)]
    lines += [f"      const bool roped = {_roped_expr(rope)};"]
    if any(rope):
        lines += ["      if (roped) {", "        if (r < R / 2) {",
                  "          const int p = (local % HD) / 2 + r;",
                  "          const int na = (local / HD) * HD + p;",
                  "          const int nb = na + HD / 2;",
                  "          const float angle = (float)rope_pos[0] * ROPE_SCALE * exp2f(-(float)p * LOG2_BASE / (HD / 2));",
                  "          float sn, cs;",
                  "          sincosf(angle, &sn, &cs);"]
        for g, on in enumerate(rope):
            if not on:
                continue
            lines += [f"          if (g == {g}) {{",
                      f"            const float sa = static_cast<float>(s{g}[na]), ba = static_cast<float>(b{g}[na]);",
                      f"            const float sb = static_cast<float>(s{g}[nb]), bb = static_cast<float>(b{g}[nb]);",
                      "#pragma unroll", "            for (int m = 0; m < M; ++m) {",
                      "              const float va = sa * acc[r][m] + ba * xsum[m];",
                      "              const float vb = sb * acc[R / 2 + r][m] + bb * xsum[m];",
                      "              " + _store(g, "na", "va * cs - vb * sn", cache),
                      "              " + _store(g, "nb", "vb * cs + va * sn", cache),
                      "            }", "          }"]
        lines += ["        }", "      } else {"]
    else:
        lines += ["      {"]
    for g in range(n_matrices):
        res = f" + load_res(res, (size_t)m * N{g} + local_n)" if residual else ""
        lines += [f"        if (g == {g}) {{",
                  "          const int local_n = local + r;",
                  f"          const float s = static_cast<float>(s{g}[local_n]), b = static_cast<float>(b{g}[local_n]);",
                  "#pragma unroll", "          for (int m = 0; m < M; ++m) {",
                  "            " + _store(g, "local_n", f"s * acc[r][m] + b * xsum[m]{res}",
                                           cache),
                  "          }", "        }"]
    lines += ["      }"]
    return "\n".join(lines)


# RMSNorm of the input rows before the matmul: every warp computes 1/rms of each input row (the rows
# are short and cached), the loop multiplies the inputs by the norm's weight ``gamma``, and the sums are
# scaled by 1/rms after the reduction (the epilogue's formula is linear in acc and xsum).
_NORM_PROLOGUE = r"""
  float inv_rms[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float ss = 0.0f;
    for (int kk = lane * 8; kk < K; kk += 256) {
      float xv[8];
      load_x8<DT>(xb + (size_t)m * K * XBYTES, kk, xv);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        ss = fmaf(xv[i], xv[i], ss);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
    }
    inv_rms[m] = rsqrtf(ss / (float)K + EPS);
  }
"""

_NORM_XSCALE = r"""
        {
          float gv[8];
          load_x8<DT>(reinterpret_cast<const unsigned char*>(gamma), k, gv);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            xv[i] *= gv[i];
          }
        }
"""

_NORM_POSTREDUCE = r"""
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] *= inv_rms[m];
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] *= inv_rms[m];
    }
  }
"""


# The CUDA-core body's per-warp input handling (``_BODY``'s @XLOAD@, @XSUM@, @XSUM_REDUCE@, @XSUM0@): each
# warp reads the input rows from L1/L2 and sums them itself.
_PER_WARP_INPUT = {
    "@STAGE@": "",
    "@XLOAD@": "load_x8<DT>(xb + (size_t)m * K * XBYTES, k, xv);",
    "@XSUM@": """#pragma unroll
        for (int i = 0; i < 8; ++i) {
          xsum[m] += xv[i];
        }""",
    "@XSUM_REDUCE@": "xsum[m] += __shfl_xor_sync(0xffffffffu, xsum[m], offset);",
    "@XSUM0@": "0.0f",
}

# Staged input: the block's warps first copy the M input rows into shared memory once, the RMSNorm's
# x * gamma in float32 where there is a norm (x as it is otherwise), and sum each row (and its squares)
# together; every warp then reads the rows from shared memory and starts from the block's sums, instead
# of reading the rows (and gamma) from L1/L2 and summing them itself. ``stage_bytes`` is its size. The
# rows are stored in planes of 16-byte units, so that the lanes' reads of one step (group t of 8 inputs of
# chunks j = lane + 32 i) are consecutive units, free of bank conflicts: inputs 8 (4 j + t) .. + 7 of row m
# are unit (m * 4 + t) * SU * CHUNKS + j, and its second half (float32) CHUNKS units further.
_STAGE = r"""
  constexpr int SW = STAGE_WARPS;  // warps of the block
  constexpr int SX = @STAGE_XBYTES@;  // bytes per staged input
  constexpr int SU = SX / 2;  // 16-byte units per group of 8 inputs
  __shared__ uint4 xs4[M * K * SX / 16];
  __shared__ float stage_part[2][M][SW];
  {
    const int sw = threadIdx.x >> 5;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float sx = 0.0f, ss = 0.0f;
      for (int kk = threadIdx.x * 8; kk < K; kk += SW * 256) {
        const int unit = (m * 4 + ((kk >> 3) & 3)) * SU * CHUNKS + (kk >> 5);
        float xv[8];
        load_x8<DT>(xb + (size_t)m * K * XBYTES, kk, xv);
        @STAGE_STORE@
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          sx += xv[i];
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        sx += __shfl_xor_sync(0xffffffffu, sx, offset);
        ss += __shfl_xor_sync(0xffffffffu, ss, offset);
      }
      if (lane == 0) {
        stage_part[0][m][sw] = sx;
        stage_part[1][m][sw] = ss;
      }
    }
  }
  __syncthreads();
  float stage_sum[M];
  float stage_ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    stage_sum[m] = 0.0f;
    stage_ss[m] = 0.0f;
#pragma unroll
    for (int w = 0; w < SW; ++w) {
      stage_sum[m] += stage_part[0][m][w];
      stage_ss[m] += stage_part[1][m][w];
    }
  }
"""

# Staged as it is: the raw bytes of 8 inputs (one or two 16-byte words).
_STAGE_STORE_RAW = r"""
        {
          const uint4* src = reinterpret_cast<const uint4*>(xb + ((size_t)m * K + kk) * XBYTES);
#pragma unroll
          for (int c = 0; c < SU; ++c) {
            xs4[unit + c * CHUNKS] = src[c];
          }
        }
"""

# Staged through the RMSNorm's weight: the sum of squares of x, then x * gamma as two float4.
_STAGE_STORE_NORM = r"""
        {
          norm_x8<DT>(gamma, kk, xv, ss);
          float4* dst = reinterpret_cast<float4*>(xs4);
          dst[unit] = make_float4(xv[0], xv[1], xv[2], xv[3]);
          dst[unit + CHUNKS] = make_float4(xv[4], xv[5], xv[6], xv[7]);
        }
"""

_NORM_PROLOGUE_STAGED = r"""
  float inv_rms[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    inv_rms[m] = rsqrtf(stage_ss[m] / (float)K + EPS);
  }
"""


def _staged_input(norm: bool) -> dict[str, str]:
    """``_BODY``'s input handling with the rows staged in shared memory (``_STAGE``)."""
    return {
        "@STAGE@": (_STAGE.replace("@STAGE_XBYTES@", "4" if norm else "XBYTES")
                    .replace("@STAGE_STORE@", _STAGE_STORE_NORM if norm else _STAGE_STORE_RAW)
                    .replace("STAGE_WARPS", str(_THREADS // 32))),
        "@XLOAD@": f"load_staged<{'0' if norm else 'DT'}>(xs4, (m * 4 + t) * SU * CHUNKS + j, CHUNKS, xv);",
        "@XSUM@": "",
        "@XSUM_REDUCE@": "",
        "@XSUM0@": "stage_sum[m]",
    }


def stage_bytes(rows: int, in_features: int, dtype: mx.Dtype, norm: bool) -> int:
    """Shared memory of the staged input (``_STAGE``): float32 rows through the norm, else the rows as they are."""
    return rows * in_features * (4 if norm else dtype.size)


def stages(variant: "Variant", args: dict) -> bool:
    """Whether a CUDA-core launch (``_launch_args``) stages its input rows in shared memory: per ``STAGE``
    (the RMSNorm kernels, every kernel or none) where they fit in ``STAGE_MAX_BYTES``."""
    t = dict(args["template"])
    if t["R"] == MMA_ROWS or STAGE == "none" or (STAGE == "norm" and variant.norm_eps is None):
        return False
    return stage_bytes(t["M"], t["K"], t["T"], variant.norm_eps is not None) <= STAGE_MAX_BYTES


# SwiGLU: gate rows (w0) and up rows (w1) of the same index in one warp; y (M, ROWS) = silu(gate) * up.
_SELECT_SWIGLU = r"""
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ptr[r] = reinterpret_cast<const uint4*>(w0) + (size_t)(n0 + r) * CHUNKS;
    row_ptr[R + r] = reinterpret_cast<const uint4*>(w1) + (size_t)(n0 + r) * CHUNKS;
  }
"""

_SELECT_SWIGLU_MMA = r"""
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_ptr[h] = reinterpret_cast<const uint4*>(w0) + (size_t)(n0 + gid + 8 * h) * CHUNKS;
    row_ptr[2 + h] = reinterpret_cast<const uint4*>(w1) + (size_t)(n0 + gid + 8 * h) * CHUNKS;
  }
"""

_EPILOGUE_SWIGLU = r"""
      const float sg = static_cast<float>(s0[n]), bg = static_cast<float>(b0[n]);
      const float su = static_cast<float>(s1[n]), bu = static_cast<float>(b1[n]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float g = sg * acc[r][m] + bg * xsum[m];
        const float u = su * acc[R + r][m] + bu * xsum[m];
        y[(size_t)m * ROWS + n] = static_cast<T>(g / (1.0f + __expf(-g)) * u);
      }
"""


def reference(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """The kernel's formula in MLX operations: x (M, K), wq (N, K/8) uint32, scales/biases (N, 1) -> (M, N)
    float32. ``s * (x @ q.T) + b * sum(x)``, all in float32."""
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)  # (8,)
    q = ((wq[:, :, None] >> shifts) & 0xF).reshape(wq.shape[0], -1).astype(mx.float32)  # (N, K)
    xf = x.astype(mx.float32)
    dots = xf @ q.T  # (M, N)
    return scales.astype(mx.float32).T * dots + biases.astype(mx.float32).T * xf.sum(axis=-1, keepdims=True)


def supports(x: mx.array, in_features: int, bits: int, group_size, out_features: Optional[int] = None) -> bool:
    """Whether ``qmv`` takes this call: per-row 4-bit, an input dtype it reads, whole 32-input blocks,
    and (when ``out_features`` is given) a layer of at least ``MIN_WEIGHTS`` weights."""
    return supports_rows(x.size // max(x.shape[-1], 1), x.dtype, in_features, bits, group_size, out_features)


def supports_rows(rows: int, dtype: mx.Dtype, in_features: int, bits: int, group_size,
                  out_features: Optional[int] = None) -> bool:
    """``supports`` for an input of ``rows`` rows in ``dtype``."""
    return (
        bits == 4 and group_size is None and dtype in _DTYPE_CODES and 1 <= rows <= MAX_ROWS
        and in_features % 32 == 0 and (out_features is None or out_features * in_features >= MIN_WEIGHTS)
        and _ENABLED and on_cuda()
    )


@dataclass(frozen=True)
class Variant:
    """What one kernel computes besides the matmuls: ``n_matrices`` weights with one output each, or gate
    and up with SwiGLU; optional RMSNorm of the input (``norm_eps``; input ``gamma``), rotary embeddings
    on some outputs (``rope`` per matrix; input ``rope_pos``), a residual added to the output (input
    ``res``)."""

    n_matrices: int = 1
    swiglu: bool = False
    norm_eps: Optional[float] = None
    rope: tuple[bool, ...] = ()
    rope_base: float = 10000.0
    rope_scale: float = 1.0
    residual: bool = False
    cache: bool = False
    prefetch: int = 0  # inputs pf0.. that appended blocks ask L2 for (``l2_prefetch``)
    prefetch_mode: str = "l2"

    @property
    def input_names(self) -> list[str]:
        names = [f"{a}{g}" for g in range(self.n_matrices) for a in ("w", "s", "b")] + ["x"]
        names += ["gamma"] if self.norm_eps is not None else []
        names += ["rope_pos"] if any(self.rope) else []
        names += ["kc", "vc"] if self.cache else []
        names += ["res"] if self.residual else []
        return names + [f"pf{i}" for i in range(self.prefetch)]

    @property
    def output_names(self) -> list[str]:
        if self.cache:
            return ["y0"]  # k and v go to the cache
        return ["y"] if self.swiglu else [f"y{g}" for g in range(self.n_matrices)]

    @property
    def name(self) -> str:
        kind = "swiglu" if self.swiglu else f"split{self.n_matrices}"
        extra = [] if self.norm_eps is None else ["norm"]
        extra += ["rope" + "".join(str(int(f)) for f in self.rope)] if any(self.rope) else []
        extra += ["res"] if self.residual else []
        extra += ["cache"] if self.cache else []
        extra += [f"pf{self.prefetch}{self.prefetch_mode}"] if self.prefetch else []
        consts = abs(hash((self.norm_eps, self.rope_base, self.rope_scale))) if extra else 0
        return "_".join(["mlx_qlora_qmv_per_row_4bit", kind, *extra, str(consts)])

    def source(self, warp: str = "(blockIdx.x * blockDim.x + threadIdx.x) >> 5", mma: bool = False,
               stage: bool = False) -> str:
        """The kernel body; ``warp``: the expression of the warp's index (its first row is ``warp * R``).
        ``mma``: the tensor-core body, one block per ``MMA_ROWS`` rows (``warp`` unused). ``stage``: the
        CUDA-core body with its input rows staged in shared memory (``_STAGE``; blocks of ``_THREADS``)."""
        norm = self.norm_eps is not None
        if self.swiglu:
            select, epilogue = (_SELECT_SWIGLU_MMA if mma else _SELECT_SWIGLU), _EPILOGUE_SWIGLU
        else:
            select = _select_split(self.n_matrices, self.rope, mma)
            epilogue = _epilogue_split(self.n_matrices, self.rope, self.residual, self.cache)
        if mma:
            body = (_BODY_MMA.replace("MMA_CHUNKS", str(MMA_CHUNKS)).replace("MMA_WARPS", str(_MMA_WARPS))
                    .replace("@SELECT@", select)
                    .replace("@EPILOGUE@", epilogue)
                    .replace("@XPREP@", _MMA_XPREP_NORM if norm else "")
                    .replace("@NORM@", _MMA_NORM if norm else ""))
        else:
            body = _BODY
            for key, code in (_staged_input(norm) if stage else _PER_WARP_INPUT).items():
                body = body.replace(key, code)
            prologue = (_NORM_PROLOGUE_STAGED if stage else _NORM_PROLOGUE) if norm else ""
            body = (body.replace("@WARP@", warp).replace("@UNROLL@", str(_UNROLL))
                    .replace("@SELECT@", select).replace("@EPILOGUE@", epilogue)
                    .replace("@PROLOGUE@", prologue)
                    .replace("@XSCALE@", _NORM_XSCALE if norm and not stage else "")
                    .replace("@POSTREDUCE@", _NORM_POSTREDUCE if norm else ""))
        body = l2_prefetch.prefix(self.prefetch, self.prefetch_mode) + body
        if norm:
            body = body.replace("EPS", repr(float(self.norm_eps)) + "f")
        if any(self.rope):
            body = (body.replace("LOG2_BASE", repr(math.log2(self.rope_base)) + "f")
                    .replace("ROPE_SCALE", repr(float(self.rope_scale)) + "f"))
        return body

    def device_function(self, name: str) -> str:
        """The body as ``__device__`` function ``name`` of the warp index ``vw`` for a launch that loops
        over warps (``model/layer_kernel.py``): the launch's constants become template parameters (``TS``
        the dtype of the scales and offsets), and the inputs and the residual are read through L2, since
        other blocks of the same launch wrote them."""
        params = []
        for n in self.input_names:
            kind = "const uint32_t*" if n[0] == "w" else "const int32_t*" if n == "rope_pos" else (
                "const TS*" if n[0] in "sb" and n[1:].isdigit() else "const T*")
            params.append(f"{kind} {n}")
        params += [f"T* {n}" for n in self.output_names]
        body = (self.source(warp="vw").replace("load_x8<DT>(xb", "load_x8_cg<DT>(xb")
                .replace("load_res(res,", "load_f_cg<DT>(res,"))
        return (f"template <typename T, int DT, int M, int K, int ROWS, int R, int P, int N0, int N1, int N2, int HD, "
                f"typename TS>\n__device__ __forceinline__ void {name}(const int vw, {', '.join(params)}) {{\n"
                f"{body}\n}}\n")


@lru_cache(maxsize=None)
def _kernel(variant: Variant, mma: bool = False, stage: bool = False):
    return mx.fast.cuda_kernel(
        name=variant.name + (f"_mma{MMA_CHUNKS}w{_MMA_WARPS}" if mma else f"_u{_UNROLL}{'_staged' if stage else ''}"),
        input_names=variant.input_names,
        output_names=variant.output_names,
        source=variant.source(mma=mma, stage=stage),
        header=_HEADER + (l2_prefetch.HEADER if variant.prefetch else ""),
    )


def takes_mma(rows: int, in_features: int, out_rows: tuple[int, ...], variant: Variant, dtype: mx.Dtype,
              head_dim: int = 0) -> bool:
    """Whether a launch can use the tensor-core body: bfloat16 inputs (float32 ones would be rounded),
    K split into 8 warps of whole 32-input chunks, every matrix in whole tiles of ``MMA_ROWS`` rows
    (rotary pairs (p, p + HD/2) of 8 consecutive p), and the inputs and partial sums within the
    48 KB of static shared memory."""
    tiles = 2 if variant.swiglu else 1
    shared = rows * in_features * 2 + (_MMA_WARPS + 1) * tiles * MMA_ROWS * rows * 4 + (2 * _MMA_WARPS + 1) * rows * 4
    return (dtype == mx.bfloat16 and in_features % (32 * _MMA_WARPS) == 0
            and all(n % MMA_ROWS == 0 for n in out_rows) and shared <= _MMA_SHARED_BYTES
            and (not any(variant.rope) or head_dim % MMA_ROWS == 0))


def prefers_mma(n_rows: int) -> bool:
    """Whether the tensor-core body is the faster one (where ``takes_mma``) for a launch of ``n_rows``
    output rows (gate and up: rows of each): from ``MMA_MIN_ROWS`` (``benchmarks/RESULTS.md``: faster for
    gate/up, slower for o, down and q/k/v)."""
    return _MMA_ENABLED and n_rows >= MMA_MIN_ROWS


def rows_per_warp(out_rows: tuple[int, ...], even: bool = False) -> int:
    """Output rows one warp computes: more rows share each loaded input, fewer keep small layers busy.
    A warp never straddles two matrices, so R divides every matrix's rows; ``even`` (rotary pairs)
    excludes 1."""
    total = sum(out_rows)
    for r in (4, 2):
        if all(n % r == 0 for n in out_rows) and (total // r >= ROWS_PER_WARP_MIN_WARPS or (even and r == 2)):
            return r
    if even:
        raise ValueError(f"rotary outputs need an even number of rows per matrix, got {out_rows}")
    return 1


@lru_cache(maxsize=None)
def _launch_args(rows: int, in_features: int, out_rows: tuple[int, ...], variant: "Variant", dtype: mx.Dtype,
                 per_warp: int = 0, shapes: Optional[tuple] = None, head_dim: int = 0, capacity: int = 0,
                 prefetch_ranges: tuple[tuple[int, int], ...] = ()) -> dict:
    """The launch arguments of one shape, built once: decoding calls every layer once per token, and
    building them on each call cost more than the kernel itself. ``shapes``: the outputs' shapes (any
    shape with the elements of (rows, N) in row-major order), default (rows, N) each. ``capacity``: the
    slots of the cache a ``Variant.cache`` kernel writes to. ``per_warp``: 0 picks (the tensor-core body
    where ``takes_mma``), ``MMA_ROWS`` asks for the tensor-core body, 1, 2 or 4 for the CUDA-core body."""
    n_warp_rows = out_rows[0] if variant.swiglu else sum(out_rows)
    mma = takes_mma(rows, in_features, out_rows, variant, dtype, head_dim)
    if per_warp == MMA_ROWS and not mma:
        raise ValueError(f"the tensor-core body does not take {rows} x {in_features} inputs for rows {out_rows}")
    mma = mma and (per_warp == MMA_ROWS or (per_warp == 0 and prefers_mma(n_warp_rows)))
    per_warp = MMA_ROWS if mma else per_warp or rows_per_warp(out_rows, even=any(variant.rope))
    padded = tuple(out_rows) + (0,) * (3 - len(out_rows))
    block = 32 * _MMA_WARPS if mma else _THREADS
    threads = n_warp_rows // per_warp * (block if mma else 32)  # the tensor-core body: a block per R rows
    if shapes is None:
        shapes = ((rows, out_rows[0]),) if variant.swiglu else tuple((rows, n) for n in out_rows)
    template = [("T", dtype), ("DT", _DTYPE_CODES[dtype]), ("M", rows), ("K", in_features), ("ROWS", n_warp_rows),
                ("R", per_warp), ("P", 2 if variant.swiglu else 1), ("N0", padded[0]), ("N1", padded[1]),
                ("N2", padded[2])]
    if any(variant.rope) or variant.cache:
        template.append(("HD", head_dim))
    if variant.cache:
        template.append(("C", capacity))
    # with prefetch ranges, blocks appended to ask L2 for the next kernel's arrays (``l2_prefetch``)
    prefetch, blocks = l2_prefetch.launch((threads + block - 1) // block, prefetch_ranges)
    template += prefetch
    return dict(
        template=template,
        grid=(blocks * block, 1, 1),
        threadgroup=(block, 1, 1),
        output_shapes=list(shapes),
        output_dtypes=[dtype] * len(shapes),
    )


def _launch(x2: mx.array, weights: Sequence[tuple[mx.array, mx.array, mx.array]], variant: Optional[Variant] = None,
            per_warp: int = 0, shapes: Optional[tuple] = None, extra: Sequence[mx.array] = (),
            head_dim: int = 0, capacity: int = 0, prefetch=()) -> list[mx.array]:
    """x2 (M, K) and (packed, scales, biases) per matrix -> one (M, N) output per matrix, or with SwiGLU
    one (M, N) output. ``extra``: the variant's further inputs in ``Variant.input_names`` order.
    ``prefetch``: arrays or (array, begin, end) byte ranges that the launch's appended blocks ask L2 for."""
    variant = variant or Variant(n_matrices=len(weights))
    prefetch, pf_ranges = l2_prefetch.ranges(prefetch)
    if prefetch:
        variant = replace(variant, prefetch=len(prefetch), prefetch_mode=l2_prefetch.MODE)
    out_rows = tuple(w.shape[0] for w, _, _ in weights)
    kernel, args = _launch_plan(x2.shape[0], x2.shape[1], out_rows, variant, x2.dtype, per_warp, shapes, head_dim,
                                capacity, pf_ranges)
    inputs = [a for triple in weights for a in triple] + [x2, *extra] + prefetch
    return kernel(inputs=inputs, **args)


@lru_cache(maxsize=None)
def _launch_plan(rows: int, in_features: int, out_rows: tuple[int, ...], variant: Variant, dtype: mx.Dtype,
                 per_warp: int, shapes: Optional[tuple], head_dim: int, capacity: int,
                 prefetch_ranges: tuple[tuple[int, int], ...] = ()) -> tuple[Callable, dict]:
    """The kernel and launch arguments of one shape (see ``_launch_args``): one cache lookup per call on
    the decoding path."""
    args = _launch_args(rows, in_features, out_rows, variant, dtype, per_warp, shapes, head_dim, capacity,
                        prefetch_ranges)
    return _kernel(variant, uses_mma(args), stages(variant, args)), args


def uses_mma(args: dict) -> bool:
    """Whether launch arguments from ``_launch_args`` are the tensor-core body's."""
    return dict(args["template"])["R"] == MMA_ROWS


@lru_cache(maxsize=None)
def _qmv_fn(dequantize: Callable) -> Callable:
    @mx.custom_function
    def qmv_fn(x2, wq, scales, biases):
        return _launch(x2, [(wq, scales, biases)])[0]

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
        y = _launch(x2, [(wq, scales, biases)])[0]  # (M, N)
    else:
        y = _qmv_fn(dequantize)(x2, wq, scales, biases)
    return y.reshape(*lead, wq.shape[0])


def qmv_split(x: mx.array, weights: Sequence[tuple[mx.array, mx.array, mx.array]],
              shapes: Optional[Sequence[tuple[int, ...]]] = None) -> list[mx.array]:
    """x (..., K) times up to three per-row 4-bit weights (packed, scales, biases) in one launch: one
    output per weight, (..., N) or the given ``shapes`` (same elements in row-major order; with one input
    row per sequence, (B, 1, H * D) and (B, H, 1, D) are the same memory). Inference only."""
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"qmv_split takes 1 to 3 weights, got {len(weights)}")
    lead = x.shape[:-1]
    if shapes is None:
        shapes = [(*lead, w.shape[0]) for w, _, _ in weights]
    return _launch(x.reshape(-1, x.shape[-1]), weights, shapes=tuple(tuple(s) for s in shapes))


def qmv_swiglu(x: mx.array, gate: tuple[mx.array, mx.array, mx.array], up: tuple[mx.array, mx.array, mx.array]) -> mx.array:
    """``silu(x @ gate.T) * (x @ up.T)`` for x (..., K) in one launch -> (..., N), both products and the
    activation in float32 and rounded once. Inference only."""
    if gate[0].shape != up[0].shape:
        raise ValueError(f"gate and up weights differ in shape: {gate[0].shape} vs {up[0].shape}")
    lead = x.shape[:-1]
    return _launch(x.reshape(-1, x.shape[-1]), [gate, up], Variant(2, swiglu=True),
                   shapes=((*lead, gate[0].shape[0]),))[0]


def reference_swiglu(x: mx.array, gate: tuple[mx.array, mx.array, mx.array],
                     up: tuple[mx.array, mx.array, mx.array]) -> mx.array:
    """``qmv_swiglu``'s formula in MLX operations, in float32: x (M, K) -> (M, N)."""
    g = reference(x, *gate)
    return g * mx.sigmoid(g) * reference(x, *up)


# ---- the kernels of one decoder layer of batch decoding (``model/fused_decode.py``) -----------------------


def qkv_norm_rope(x: mx.array, gamma: mx.array, eps: float, weights: Sequence[tuple[mx.array, mx.array, mx.array]],
                  position: mx.array, head_dim: int, rope_base: float, rope_scale: float, q_shape: tuple[int, ...],
                  cache: tuple[mx.array, mx.array]) -> list[mx.array]:
    """q, k and v of ``rms_norm(x, gamma, eps)`` (x (M, K), M sequences of one token) in one launch, with
    rotary embeddings (Hugging Face's rotate-half pairs) on q and k at ``position`` (int32, 0-d); q comes
    out in ``q_shape`` (any shape of its elements in row-major order).

    ``cache``: the key and value buffers (M, n_kv_heads, C, head_dim) of a ``StaticKVCache``, row-major;
    k and v are written into them in place, at slot ``position % C``, and the buffers are returned in
    their place: ``[q, keys, values]``. The write is invisible to MLX's graph, so whatever reads the
    buffers must depend on q (attention does) and nothing may read the buffers' old contents afterwards
    (the cache's are dropped as it advances)."""
    variant = Variant(3, norm_eps=float(eps), rope=(True, True, False), rope_base=float(rope_base),
                      rope_scale=float(rope_scale), cache=True)
    q = _launch(x.reshape(-1, x.shape[-1]), weights, variant, shapes=(tuple(q_shape),),
                extra=[gamma, position.astype(mx.int32), *cache], head_dim=head_dim, capacity=cache[0].shape[2])
    return q + list(cache)


def swiglu_norm(x: mx.array, gamma: mx.array, eps: float, gate: tuple[mx.array, mx.array, mx.array],
                up: tuple[mx.array, mx.array, mx.array]) -> mx.array:
    """``silu(gate(n)) * up(n)`` with ``n = rms_norm(x, gamma, eps)``, in one launch: x (..., K) -> (..., N)."""
    lead = x.shape[:-1]
    variant = Variant(2, swiglu=True, norm_eps=float(eps))
    return _launch(x.reshape(-1, x.shape[-1]), [gate, up], variant, shapes=((*lead, gate[0].shape[0]),),
                   extra=[gamma])[0]


def matmul_residual(x: mx.array, weight: tuple[mx.array, mx.array, mx.array], residual: mx.array,
                    prefetch=()) -> mx.array:
    """``residual + x @ W.T`` in one launch (added in float32, rounded once): x (..., K) -> residual's shape.
    ``prefetch``: arrays or (array, begin, end) byte ranges that blocks appended to the launch ask L2 for
    (``l2_prefetch``)."""
    variant = Variant(1, residual=True)
    return _launch(x.reshape(-1, x.shape[-1]), [weight], variant, shapes=(tuple(residual.shape),),
                   extra=[residual.reshape(-1, residual.shape[-1])], prefetch=prefetch)[0]


def reference_rms_norm(x: mx.array, gamma: mx.array, eps: float) -> mx.array:
    """float32 RMSNorm: x (M, K) -> (M, K)."""
    xf = x.astype(mx.float32)
    return xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps) * gamma.astype(mx.float32)


def reference_qkv_norm_rope(x, gamma, eps, weights, position: int, head_dim: int, rope_base: float,
                            rope_scale: float) -> list[mx.array]:
    """``qkv_norm_rope``'s formula in MLX operations, float32: outputs (M, N_g) each."""
    n = reference_rms_norm(x, gamma, eps)
    outs = [reference(n, *w) for w in weights]
    for g in (0, 1):
        y = outs[g]
        heads = y.reshape(y.shape[0], -1, 1, head_dim)  # (M, heads, 1, hd)
        roped = mx.fast.rope(heads, head_dim, traditional=False, base=rope_base, scale=rope_scale, offset=position)
        outs[g] = roped.reshape(y.shape)
    return outs
