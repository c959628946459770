"""Few-row matmul with a per-row 4-bit weight, as one CUDA kernel (batch-1 decoding on NVIDIA GPUs).

For a row ``n`` with scale ``s`` and offset ``b``, ``W[n, k] = s * q[n, k] + b``, so

    y[m, n] = s * sum_k q[n, k] * x[m, k]  +  b * sum_k x[m, k]

and the kernel reads each packed row once, straight from memory: one warp per output row, each lane
loading 16 bytes (32 weights) at a time, the M <= ``MAX_ROWS`` input rows read alongside and both sums
accumulated in float32, then a warp reduction. No dequantized weight and no expanded scales exist.
``mx.quantized_matmul`` needs MLX's group layout (our one scale per row repeated for every group of 64),
which costs memory and ran far below the memory's speed on an H100 (``benchmarks/RESULTS.md``).

Only CUDA is covered: on Metal and on the CPU, ``QuantizedLinear`` keeps MLX's ``quantized_matmul``.
``reference`` is the same formula in portable MLX operations (the CPU tests check it against the
dequantized weight; the GPU benchmark checks the kernel against it).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ..device import on_cuda

MAX_ROWS = 8  # input rows handled by one launch (every warp keeps one accumulator per row)
_DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1}  # input dtypes the kernel reads (float16: not yet)
_THREADS = 256
ROWS_PER_WARP_MIN_WARPS = int(os.environ.get("MLX_QLORA_QMV_MIN_WARPS", "2048"))
# Layers smaller than this keep MLX's quantized_matmul: building a custom-kernel call costs ~13 us of
# Python/C++ time against ~3 us for MLX's op, which only the MLP-sized layers (4096 x 14336) win back
# (benchmarks/qmv_probe.py on an H100). Env knob MLX_QLORA_QMV_MIN for measurements.
MIN_WEIGHTS = int(os.environ.get("MLX_QLORA_QMV_MIN", str(1 << 25)))
# Benchmark knob: MLX_QLORA_QMV=mlx keeps MLX's quantized_matmul (expanded layout) even on CUDA.
_ENABLED = os.environ.get("MLX_QLORA_QMV", "ours") != "mlx"

_HEADER = r"""
// Eight consecutive inputs of row `x` starting at element k (a multiple of 8), as floats.
template <int DT>
__device__ __forceinline__ void load_x8(const unsigned char* x, int k, float* o);

template <>
__device__ __forceinline__ void load_x8<0>(const unsigned char* x, int k, float* o) {  // float32
  const float4* p = reinterpret_cast<const float4*>(x) + (k >> 2);
  float4 a = p[0];
  float4 b = p[1];
  o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
  o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}

template <>
__device__ __forceinline__ void load_x8<1>(const unsigned char* x, int k, float* o) {  // bfloat16
  uint4 v = *(reinterpret_cast<const uint4*>(x) + (k >> 3));
  unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(u[i] << 16);
    o[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
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
  const int n0 = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * R;
  if (n0 >= ROWS) {
    return;
  }
  constexpr int XBYTES = DT == 0 ? 4 : 2;
  constexpr int CHUNKS = K / 32;  // 16-byte chunks (32 weights) per weight row
  constexpr int RR = P * R;       // weight rows read by this warp
  const uint4* row_ptr[RR];
  @SELECT@
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  float acc[RR][M];
  float xsum[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    xsum[m] = 0.0f;
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      acc[r][m] = 0.0f;
    }
  }
#pragma unroll 2
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
        load_x8<DT>(xb + (size_t)m * K * XBYTES, k, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          xsum[m] += xv[i];
        }
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
      xsum[m] += __shfl_xor_sync(0xffffffffu, xsum[m], offset);
#pragma unroll
      for (int r = 0; r < RR; ++r) {
        acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], offset);
      }
    }
  }
  // Lane r writes row n0 + r (unrolled with a compare: indexing registers by lane would spill them).
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r == lane) {
      const int n = n0 + r;
      @EPILOGUE@
    }
  }
"""

# Up to three weight matrices of one input (G of them, N0 + N1 + N2 rows in all); matrix g writes its own
# output y<g> (M, N<g>). The code names only the inputs that exist, so it is written out for each G.
def _select_split(n_matrices: int) -> str:
    lines = ["  const unsigned int* base = w0;", "  int local = n0;"]
    for g in range(1, n_matrices):
        first = " + ".join(f"N{i}" for i in range(g))
        lines += [f"  if (n0 >= {first}) {{", f"    base = w{g};", f"    local = n0 - ({first});", "  }"]
    lines += ["#pragma unroll", "  for (int r = 0; r < R; ++r) {",
              "    row_ptr[r] = reinterpret_cast<const uint4*>(base) + (size_t)(local + r) * CHUNKS;", "  }"]
    return "\n".join(lines)


def _epilogue_split(n_matrices: int) -> str:
    lines = []
    for g in range(n_matrices):
        first = " + ".join(f"N{i}" for i in range(g)) or "0"
        last = " + ".join(f"N{i}" for i in range(g + 1))
        lines += [f"      if (n >= {first} && n < {last}) {{",
                  f"        const int local_n = n - ({first});",
                  f"        const float s = static_cast<float>(s{g}[local_n]), b = static_cast<float>(b{g}[local_n]);",
                  "#pragma unroll", "        for (int m = 0; m < M; ++m) {",
                  f"          y{g}[(size_t)m * N{g} + local_n] = "
                  "static_cast<T>(16.0f * s * (acc[r][m] - xsum[m]) + b * xsum[m]);",
                  "        }", "      }"]
    return "\n".join(lines)


# SwiGLU: gate rows (w0) and up rows (w1) of the same index in one warp; y (M, ROWS) = silu(gate) * up.
_SELECT_SWIGLU = r"""
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ptr[r] = reinterpret_cast<const uint4*>(w0) + (size_t)(n0 + r) * CHUNKS;
    row_ptr[R + r] = reinterpret_cast<const uint4*>(w1) + (size_t)(n0 + r) * CHUNKS;
  }
"""

_EPILOGUE_SWIGLU = r"""
      const float sg = static_cast<float>(s0[n]), bg = static_cast<float>(b0[n]);
      const float su = static_cast<float>(s1[n]), bu = static_cast<float>(b1[n]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float g = 16.0f * sg * (acc[r][m] - xsum[m]) + bg * xsum[m];
        const float u = 16.0f * su * (acc[R + r][m] - xsum[m]) + bu * xsum[m];
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
    rows = x.size // max(x.shape[-1], 1)
    return (
        bits == 4 and group_size is None and x.dtype in _DTYPE_CODES and 1 <= rows <= MAX_ROWS
        and in_features % 32 == 0 and (out_features is None or out_features * in_features >= MIN_WEIGHTS)
        and _ENABLED and on_cuda()
    )


@lru_cache(maxsize=None)
def _kernel(n_matrices: int, swiglu: bool):
    """The kernel for ``n_matrices`` weights (one output each), or gate and up with SwiGLU (one output)."""
    names = []
    for g in range(n_matrices):
        names += [f"w{g}", f"s{g}", f"b{g}"]
    if swiglu:
        select, epilogue = _SELECT_SWIGLU, _EPILOGUE_SWIGLU
    else:
        select, epilogue = _select_split(n_matrices), _epilogue_split(n_matrices)
    kind = "swiglu" if swiglu else f"split{n_matrices}"
    return mx.fast.cuda_kernel(
        name=f"mlx_qlora_qmv_per_row_4bit_{kind}",
        input_names=names + ["x"],
        output_names=["y"] if swiglu else [f"y{g}" for g in range(n_matrices)],
        source=_BODY.replace("@SELECT@", select).replace("@EPILOGUE@", epilogue),
        header=_HEADER,
    )


def rows_per_warp(out_rows: tuple[int, ...]) -> int:
    """Output rows one warp computes: more rows share each loaded input, fewer keep small layers busy.
    A warp never straddles two matrices, so R divides every matrix's rows."""
    total = sum(out_rows)
    for r in (4, 2):
        if all(n % r == 0 for n in out_rows) and total // r >= ROWS_PER_WARP_MIN_WARPS:
            return r
    return 1


@lru_cache(maxsize=None)
def _launch_args(rows: int, in_features: int, out_rows: tuple[int, ...], swiglu: bool, dtype: mx.Dtype,
                 per_warp: int = 0, shapes: Optional[tuple] = None) -> dict:
    """The launch arguments of one shape, built once: decoding calls every layer once per token, and
    building them on each call cost more than the kernel itself. ``shapes``: the outputs' shapes (any
    shape with the elements of (rows, N) in row-major order), default (rows, N) each."""
    per_warp = per_warp or rows_per_warp(out_rows)
    n_warp_rows = out_rows[0] if swiglu else sum(out_rows)
    padded = tuple(out_rows) + (0,) * (3 - len(out_rows))
    threads = n_warp_rows // per_warp * 32
    if shapes is None:
        shapes = ((rows, out_rows[0]),) if swiglu else tuple((rows, n) for n in out_rows)
    return dict(
        template=[("T", dtype), ("DT", _DTYPE_CODES[dtype]), ("M", rows), ("K", in_features),
                  ("ROWS", n_warp_rows), ("R", per_warp), ("P", 2 if swiglu else 1), ("N0", padded[0]),
                  ("N1", padded[1]), ("N2", padded[2])],
        grid=(((threads + _THREADS - 1) // _THREADS) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=list(shapes),
        output_dtypes=[dtype] * len(shapes),
    )


def _launch(x2: mx.array, weights: Sequence[tuple[mx.array, mx.array, mx.array]], swiglu: bool = False,
            per_warp: int = 0, shapes: Optional[tuple] = None) -> list[mx.array]:
    """x2 (M, K) and (packed, scales, biases) per matrix -> one (M, N) output per matrix, or with SwiGLU
    one (M, N) output."""
    out_rows = tuple(w.shape[0] for w, _, _ in weights)
    args = _launch_args(x2.shape[0], x2.shape[1], out_rows, swiglu, x2.dtype, per_warp, shapes)
    inputs = [a for triple in weights for a in triple] + [x2]
    return _kernel(len(weights), swiglu)(inputs=inputs, **args)


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
    return _launch(x.reshape(-1, x.shape[-1]), [gate, up], swiglu=True, shapes=((*lead, gate[0].shape[0]),))[0]


def reference_swiglu(x: mx.array, gate: tuple[mx.array, mx.array, mx.array],
                     up: tuple[mx.array, mx.array, mx.array]) -> mx.array:
    """``qmv_swiglu``'s formula in MLX operations, in float32: x (M, K) -> (M, N)."""
    g = reference(x, *gate)
    return g * mx.sigmoid(g) * reference(x, *up)
