"""Per-row 4-bit dequantization as one CUDA kernel (training and prompt processing on NVIDIA GPUs).

Training dequantizes every frozen weight twice per step (forward, and again in the backward pass:
``dequant_matmul.py``), so the speed of ``w[n, k] = s[n] * q[n, k] + b[n]`` counts. MLX's
``mx.dequantize`` needs our one scale per row expanded to one per group of 64 (two more launches per
call) and ran a 14336x4096 layer in about 0.3 ms on an H100 (146 MB moved: about 0.5 TB/s). Here each
thread reads 16 bytes (32 weights) and writes them as 64 or 128 bytes with vector stores; values are
computed in float32 (``fmaf(s, q, b)``) and rounded once to the output dtype.

Opt-in (``MLX_QLORA_DEQUANT=ours``): on an H100 it dequantized 1.4-1.8x faster than MLX (1.16 TB/s on
14336x4096), but a training step changed by +3.3% without and -2.3% with checkpointing, within the
variation between runs (``benchmarks/RESULTS.md``). The CPU tests check what the kernel computes,
``dequantize`` in float32, against float64, and run its source through a CUDA emulation.
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

from ..device import on_cuda

_THREADS = 256
_DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}
_ENABLED = os.environ.get("MLX_QLORA_DEQUANT", "mlx") == "ours"

_HEADER = r"""
// 4-bit value -> exact float without an integer conversion: 2^23 + q has q in its low mantissa bits.
__device__ __forceinline__ float nibble(unsigned int word, int i) {
  return __uint_as_float(0x4b000000u | ((word >> (4 * i)) & 0xFu)) - 8388608.0f;
}

template <int DT>
__device__ __forceinline__ void store32(void* y, size_t t, const unsigned int* words, float s, float b);

template <>
__device__ __forceinline__ void store32<0>(void* y, size_t t, const unsigned int* words, float s, float b) {
  float4* out = reinterpret_cast<float4*>(y) + t * 8;  // 32 floats
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    out[2 * w] = make_float4(fmaf(s, nibble(words[w], 0), b), fmaf(s, nibble(words[w], 1), b),
                             fmaf(s, nibble(words[w], 2), b), fmaf(s, nibble(words[w], 3), b));
    out[2 * w + 1] = make_float4(fmaf(s, nibble(words[w], 4), b), fmaf(s, nibble(words[w], 5), b),
                                 fmaf(s, nibble(words[w], 6), b), fmaf(s, nibble(words[w], 7), b));
  }
}

// Two values rounded to a 16-bit float type, packed in one word (first value in the low half).
template <int DT>
__device__ __forceinline__ unsigned int pack2(float a, float b);

template <>
__device__ __forceinline__ unsigned int pack2<1>(float a, float b) {  // bfloat16
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&v);
}

template <>
__device__ __forceinline__ unsigned int pack2<2>(float a, float b) {  // float16
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned int*>(&v);
}

template <int DT>
__device__ __forceinline__ void store32(void* y, size_t t, const unsigned int* words, float s, float b) {
  uint4* out = reinterpret_cast<uint4*>(y) + t * 4;  // 32 16-bit values
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    unsigned int pairs[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      pairs[p] = pack2<DT>(fmaf(s, nibble(words[w], 2 * p), b), fmaf(s, nibble(words[w], 2 * p + 1), b));
    }
    out[w] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
}
"""

_SOURCE = r"""
  // w (N, K/8) uint32, first input in the lowest bits; scales, biases (N, 1); y (N, K).
  // Thread t: the 16-byte chunk t of w (row t / (K/32)), 32 outputs.
  constexpr int CHUNKS = K / 32;
  const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (size_t)N * CHUNKS) {
    return;
  }
  const int n = (int)(t / CHUNKS);
  const float s = static_cast<float>(scales[n]);
  const float b = static_cast<float>(biases[n]);
  const uint4 packed = reinterpret_cast<const uint4*>(w)[t];
  const unsigned int words[4] = {packed.x, packed.y, packed.z, packed.w};
  store32<DT>(y, t, words, s, b);
"""


def supports(wq: mx.array, bits: int, group_size, dtype: mx.Dtype) -> bool:
    """Per-row 4-bit, whole 32-input blocks, an output dtype the kernel writes, CUDA, enabled."""
    return (
        _ENABLED and bits == 4 and group_size is None and dtype in _DTYPE_CODES and wq.shape[1] % 4 == 0
        and on_cuda()
    )


@lru_cache(maxsize=None)
def _kernel():
    return mx.fast.cuda_kernel(
        name="mlx_qlora_dequantize_per_row_4bit",
        input_names=["w", "scales", "biases"],
        output_names=["y"],
        source=_SOURCE,
        header=_HEADER,
    )


@lru_cache(maxsize=None)
def _launch_args(out_features: int, in_features: int, dtype: mx.Dtype) -> dict:
    threads = out_features * (in_features // 32)
    return dict(
        template=[("DT", _DTYPE_CODES[dtype]), ("N", out_features), ("K", in_features)],
        grid=(((threads + _THREADS - 1) // _THREADS) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(out_features, in_features)],
        output_dtypes=[dtype],
    )


def dequantize(wq: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> mx.array:
    """wq (N, K/8) uint32, per-row scales/biases (N, 1) -> W (N, K) in ``dtype``; see ``supports``."""
    args = _launch_args(wq.shape[0], wq.shape[1] * 8, dtype)
    return _kernel()(inputs=[wq, scales, biases], **args)[0]
