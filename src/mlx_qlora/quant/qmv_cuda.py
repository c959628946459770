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
from typing import Callable, Optional

import mlx.core as mx

from ..device import on_cuda

MAX_ROWS = 8  # input rows handled by one launch (every warp keeps one accumulator per row)
_DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1}  # input dtypes the kernel reads (float16: not yet)
_THREADS = 256
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

_SOURCE = r"""
  // w (N, K/8) uint32, 8 weights per word, first input in the lowest bits; scales, biases (N, 1);
  // x (M, K); y (M, N). One warp per output row.
  const int lane = threadIdx.x & 31;
  const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (n >= N) {
    return;
  }
  constexpr int XBYTES = DT == 0 ? 4 : 2;
  const uint4* row = reinterpret_cast<const uint4*>(w) + (size_t)n * (K / 32);
  const unsigned char* xb = reinterpret_cast<const unsigned char*>(x);
  float acc[M];
  float xsum[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] = 0.0f;
    xsum[m] = 0.0f;
  }
  for (int j = lane; j < K / 32; j += 32) {
    uint4 packed = row[j];
    unsigned int words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int k = j * 32 + t * 8;
      float q[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        q[i] = (float)((words[t] >> (4 * i)) & 0xFu);
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[8];
        load_x8<DT>(xb + (size_t)m * K * XBYTES, k, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          acc[m] = fmaf(q[i], xv[i], acc[m]);
          xsum[m] += xv[i];
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
      xsum[m] += __shfl_xor_sync(0xffffffffu, xsum[m], offset);
    }
  }
  if (lane == 0) {
    const float s = static_cast<float>(scales[n]);
    const float b = static_cast<float>(biases[n]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      y[(size_t)m * N + n] = static_cast<T>(s * acc[m] + b * xsum[m]);
    }
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
def _kernel():
    return mx.fast.cuda_kernel(
        name="mlx_qlora_qmv_per_row_4bit",
        input_names=["w", "scales", "biases", "x"],
        output_names=["y"],
        source=_SOURCE,
        header=_HEADER,
    )


@lru_cache(maxsize=None)
def _launch_args(rows: int, in_features: int, out_features: int, dtype: mx.Dtype) -> dict:
    """The launch arguments of one shape, built once: decoding calls every layer once per token, and
    building them (and the custom-function wrapper) on each call cost more than the kernel itself."""
    threads = out_features * 32
    return dict(
        template=[("T", dtype), ("DT", _DTYPE_CODES[dtype]), ("M", rows), ("K", in_features), ("N", out_features)],
        grid=(((threads + _THREADS - 1) // _THREADS) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(rows, out_features)],
        output_dtypes=[dtype],
    )


def _launch(x2: mx.array, wq: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """x2 (M, K) -> (M, N) in x2.dtype."""
    args = _launch_args(x2.shape[0], x2.shape[1], wq.shape[0], x2.dtype)
    return _kernel()(inputs=[wq, scales, biases, x2], **args)[0]


@lru_cache(maxsize=None)
def _qmv_fn(dequantize: Callable) -> Callable:
    @mx.custom_function
    def qmv_fn(x2, wq, scales, biases):
        return _launch(x2, wq, scales, biases)

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
        y = _launch(x2, wq, scales, biases)  # (M, N)
    else:
        y = _qmv_fn(dequantize)(x2, wq, scales, biases)
    return y.reshape(*lead, wq.shape[0])
