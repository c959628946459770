"""Per-row 4-bit dequantization as one CUDA kernel (training and prompt processing on NVIDIA GPUs).

Training dequantizes every frozen weight twice per step (forward, and again in the backward pass:
``dequant_matmul.py``), so the speed of ``w[n, k] = s[n] * q[n, k] + b[n]`` counts. MLX's
``mx.dequantize`` needs our one scale per row expanded to one per group of 64 (two more launches per
call). Here each thread reads four 32-bit words (8 weights each) and writes each as one 16-byte store
(bfloat16, float16) or two (float32); a warp's loads and stores are contiguous. Values are computed in
float32 (``fmaf(s, q, b)``) and rounded once to the output dtype.

On an H100 it dequantized a 14336x4096 layer in 84 us against MLX's 162 us (1.75 TB/s counting the
4-bit reads and the bfloat16 writes: the writes alone run at about the half of a device copy that is
writing), and a 1 x 2048 training step of Mistral-7B shapes went from 11,560 to 12,500-12,900 tokens/s
(``benchmarks/RESULTS.md``). It is the default on CUDA; ``MLX_QLORA_DEQUANT=mlx`` takes MLX's
``mx.dequantize`` instead. The CPU tests check what the kernel computes, ``dequantize`` in float32,
against float64, and run its source through a CUDA emulation.
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

from ...device import on_cuda

_THREADS = 256
_PER_THREAD = 4  # 32-bit words (8 weights each) per thread
_DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}
_ENABLED = os.environ.get("MLX_QLORA_DEQUANT", "ours") != "mlx"

_HEADER = r"""
// 4-bit value -> exact float without an integer conversion: 2^23 + q has q in its low mantissa bits.
__device__ __forceinline__ float nibble(unsigned int word, int i) {
  return __uint_as_float(0x4b000000u | ((word >> (4 * i)) & 0xFu)) - 8388608.0f;
}

template <int DT>
__device__ __forceinline__ void store8(void* y, size_t i, unsigned int word, float s, float b);

template <>
__device__ __forceinline__ void store8<0>(void* y, size_t i, unsigned int word, float s, float b) {
  float4* out = reinterpret_cast<float4*>(y) + i * 2;  // 8 floats
  out[0] = make_float4(fmaf(s, nibble(word, 0), b), fmaf(s, nibble(word, 1), b),
                       fmaf(s, nibble(word, 2), b), fmaf(s, nibble(word, 3), b));
  out[1] = make_float4(fmaf(s, nibble(word, 4), b), fmaf(s, nibble(word, 5), b),
                       fmaf(s, nibble(word, 6), b), fmaf(s, nibble(word, 7), b));
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
__device__ __forceinline__ void store8(void* y, size_t i, unsigned int word, float s, float b) {
  unsigned int pairs[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    pairs[p] = pack2<DT>(fmaf(s, nibble(word, 2 * p), b), fmaf(s, nibble(word, 2 * p + 1), b));
  }
  reinterpret_cast<uint4*>(y)[i] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);  // 8 16-bit values
}
"""

_SOURCE = r"""
  // w (N, K/8) uint32, first input in the lowest bits; scales, biases (N, 1); y (N, K).
  // Block b reads the PER * blockDim.x words from b * PER * blockDim.x on, in PER passes of one word per
  // thread: each pass a warp reads 128 contiguous bytes and writes its 256 outputs contiguously.
  constexpr int WORDS = K / 8;  // words per row
  const size_t total = (size_t)N * WORDS;
  const size_t first = (size_t)blockIdx.x * PER * blockDim.x + threadIdx.x;
  unsigned int words[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {  // every load issued before the first store
    const size_t i = first + (size_t)j * blockDim.x;
    words[j] = i < total ? w[i] : 0u;
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const size_t i = first + (size_t)j * blockDim.x;
    if (i < total) {
      const int n = (int)(i / WORDS);
      store8<DT>(y, i, words[j], static_cast<float>(scales[n]), static_cast<float>(biases[n]));
    }
  }
"""


def supports(wq: mx.array, bits: int, group_size, dtype: mx.Dtype) -> bool:
    """Per-row 4-bit, an output dtype the kernel writes, CUDA, not turned off (``MLX_QLORA_DEQUANT=mlx``)."""
    return _ENABLED and bits == 4 and group_size is None and dtype in _DTYPE_CODES and on_cuda()


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
    per_block = _THREADS * _PER_THREAD  # words
    blocks = (out_features * (in_features // 8) + per_block - 1) // per_block
    return dict(
        template=[("DT", _DTYPE_CODES[dtype]), ("N", out_features), ("K", in_features), ("PER", _PER_THREAD)],
        grid=(blocks * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(out_features, in_features)],
        output_dtypes=[dtype],
    )


def dequantize(wq: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> mx.array:
    """wq (N, K/8) uint32, per-row scales/biases (N, 1) -> W (N, K) in ``dtype``; see ``supports``."""
    args = _launch_args(wq.shape[0], wq.shape[1] * 8, dtype)
    return _kernel()(inputs=[wq, scales, biases], **args)[0]
