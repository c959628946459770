"""One-token attention over a ``StaticKVCache`` as one CUDA kernel (compiled decoding on NVIDIA GPUs).

A static cache holds empty slots, so ``mx.fast.scaled_dot_product_attention`` needs an array mask, and
with an array mask MLX's CUDA backend composes attention from several operations (matmuls, softmax,
select) in every layer. Decoding is bound by the host's work per operation (``benchmarks/RESULTS.md``),
so this kernel does the whole attention of one query per head in one launch, and reads the number of
filled slots from the cache's offset on the device: with position ``p`` just written, slots
``0 .. p`` are filled while ``p`` < capacity, and all of them once the ring has wrapped (the capacity is
then the sliding window, so every slot is inside it). No mask exists.

One block per (sequence, head): each warp scores whole slots (q . k, lanes over the head dimension),
eight slots at a time so that their loads are in flight together, the block takes the softmax in
float32 in shared memory, then threads over the head dimension sum the values, again eight slots at a
time. Grouped-query heads read their key/value head ``h // (H / HKV)``.

``reference`` is the same computation in MLX operations (CPU tests check it against attention with the
mask of ``build_mask``; the GPU probe checks the kernel against it). Metal and the CPU keep MLX's
attention with the mask.
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

from ..device import on_cuda

_THREADS = 256
MAX_CAPACITY = 8192  # scores of every slot live in shared memory (4 bytes each)
# Off unless MLX_QLORA_DECODE_ATTENTION=ours: on an H100 the first form of this kernel (one slot per warp
# at a time) took more GPU time than it saved host time (decoding 5.9 against 4.6 ms per token with
# MLX's masked attention; benchmarks/RESULTS.md); the present form, eight slots per warp in flight, has
# not been measured on a GPU yet.
_ENABLED = os.environ.get("MLX_QLORA_DECODE_ATTENTION", "mlx") == "ours"

_SOURCE = r"""
  // q (B, H, 1, D); k, v (B, HKV, C, D); offset: the position just written; out (B, 1, H * D).
  constexpr int WARPS = THREADS / 32;
  constexpr int UNROLL = 8;  // slots whose loads are issued together
  constexpr int PER_LANE = D / 32;
  __shared__ float scores[C];
  __shared__ float reduce[WARPS];
  __shared__ float partial[THREADS];
  const int bh = blockIdx.x;
  const int b = bh / H;
  const int h = bh % H;
  const int hk = h / (H / HKV);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int pos = offset[0];
  const int n_valid = pos >= C ? C : pos + 1;
  const float scale = SCALE;

  float qv[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    qv[i] = static_cast<float>(q[(size_t)bh * D + lane + 32 * i]) * scale;
  }
  const T* kh = k + ((size_t)b * HKV + hk) * C * D;
  const T* vh = v + ((size_t)b * HKV + hk) * C * D;

  // 1. scores: each warp takes UNROLL slots at a time (their loads in flight together); the maximum
  float m = -INFINITY;
  for (int s0 = warp * UNROLL; s0 < n_valid; s0 += WARPS * UNROLL) {
    float dots[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      dots[u] = 0.0f;
      if (s0 + u < n_valid) {
        const T* row = kh + (size_t)(s0 + u) * D;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
          dots[u] = fmaf(qv[i], static_cast<float>(row[lane + 32 * i]), dots[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        dots[u] += __shfl_xor_sync(0xffffffffu, dots[u], o);
      }
      if (s0 + u < n_valid) {
        if (lane == 0) {
          scores[s0 + u] = dots[u];
        }
        m = fmaxf(m, dots[u]);
      }
    }
  }
  if (lane == 0) {
    reduce[warp] = m;
  }
  __syncthreads();
  m = reduce[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) {
    m = fmaxf(m, reduce[w]);
  }
  __syncthreads();

  // 2. exp(score - max) in place, and the sum
  float sum = 0.0f;
  for (int s = tid; s < n_valid; s += THREADS) {
    const float e = __expf(scores[s] - m);
    scores[s] = e;
    sum += e;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, o);
  }
  if (lane == 0) {
    reduce[warp] = sum;
  }
  __syncthreads();
  sum = 0.0f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    sum += reduce[w];
  }

  // 3. weighted values: THREADS / D groups of threads split the slots, one head dimension per thread
  constexpr int GROUPS = THREADS / D;
  const int d = tid % D;
  const int group = tid / D;
  float acc = 0.0f;
  if (group < GROUPS) {
    float part[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      part[u] = 0.0f;
    }
    for (int s0 = group * UNROLL; s0 < n_valid; s0 += GROUPS * UNROLL) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        if (s0 + u < n_valid) {
          part[u] = fmaf(scores[s0 + u], static_cast<float>(vh[(size_t)(s0 + u) * D + d]), part[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      acc += part[u];
    }
  }
  partial[tid] = acc;
  __syncthreads();
  if (group == 0) {
    float total = 0.0f;
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) {
      total += partial[g * D + d];
    }
    out[(size_t)bh * D + d] = static_cast<T>(total / sum);
  }
"""


def supports(q: mx.array, keys: mx.array) -> bool:
    """Whether ``decode_attention`` takes this call: CUDA, one query per sequence, a head dimension that is
    a multiple of 32 up to 256, whole key heads per query head, and a capacity whose scores fit."""
    B, H, L, D = q.shape
    C = keys.shape[2]
    return (
        _ENABLED and L == 1 and D % 32 == 0 and D <= _THREADS and H % keys.shape[1] == 0 and C <= MAX_CAPACITY
        and q.dtype in (mx.float32, mx.bfloat16, mx.float16) and keys.dtype == q.dtype and on_cuda()
    )


@lru_cache(maxsize=None)
def _kernel(scale: float):
    # The scale is a compile-time constant of the kernel (one per model).
    source = _SOURCE.replace("SCALE", repr(float(scale)) + "f")
    return mx.fast.cuda_kernel(
        name=f"mlx_qlora_decode_attention_{abs(hash(scale))}",
        input_names=["q", "k", "v", "offset"],
        output_names=["out"],
        source=source,
    )


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, offset: mx.array, scale: float) -> mx.array:
    """q (B, H, 1, D), keys/values (B, HKV, C, D) with position ``offset`` just written -> (B, 1, H * D)."""
    B, H, _, D = q.shape
    HKV, C = keys.shape[1], keys.shape[2]
    return _kernel(float(scale))(
        inputs=[q, keys, values, offset.astype(mx.int32)],  # offset: a 0-d array, read as offset[0]
        template=[("T", q.dtype), ("H", H), ("HKV", HKV), ("D", D), ("C", C), ("THREADS", _THREADS)],
        grid=(B * H * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(B, 1, H * D)],
        output_dtypes=[q.dtype],
    )[0]


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

