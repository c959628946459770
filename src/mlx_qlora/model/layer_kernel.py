"""One decoder layer of batch decoding in one CUDA launch (compiled decoding on NVIDIA GPUs).

MLX's host work per operation is about 10 us on the GPU machine (``benchmarks/RESULTS.md``), and the
launches of ``model/fused_decode.py`` once cost more host time than the GPU needed for the layer's
weights. Here the steps run as phases of one launch:

1. input RMSNorm, q/k/v and rotary embeddings (``qmv_cuda`` device functions);
2. attention over the static cache, this position's key and value taken from phase 1 (split slots);
3. the combination of the splits;
4. o_proj plus the residual;
5. post-attention RMSNorm, gate, up and SwiGLU;
6. down_proj plus the residual;

separated by grid-wide barriers: every block adds one to a counter, the last one sets a release flag
the others poll. Such a barrier needs every block resident at once, so the grid is two blocks of 128
threads per multiprocessor (read from the CUDA driver; two such blocks always fit), and a wait that
lasts seconds traps instead of hanging. The counters and flags live in a small per-layer array that
the last block leaving puts back to zero. Data written by other blocks of the launch is read through
L2 (``__ldcg``).

The launch writes this position's key and value (``k_new``, ``v_new``); the cache's ``slice_update``
follows it, so a layer is three operations instead of about nine.

Opt-in (``MLX_QLORA_FUSED_DECODE=kernel``): on an H100 it is correct but slower than the launches of
``fused_decode`` (9.6 against 5.0 ms per token when they were seven; 3.1 ms now): with 8 warps per
multiprocessor the matrix-vector phases are latency-bound and each barrier costs about 12 us
(``benchmarks/layer_kernel_probe.py``, ``benchmarks/RESULTS.md``).

The CPU tests run the source through ``tests/cuda_emulation.h`` with every block a process of its own
(shared memory per block, global memory and the counters shared) against the layer's MLX operations.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from ..quant import qmv_cuda
from . import attention_cuda

THREADS = 128  # threads per block: the attention phase's block shape
BARRIERS = 5  # between the six phases; counter BARRIERS counts the blocks that have left
LINE = 32  # uint32 per counter or flag: one 128-byte line each
# Measurement knob (benchmarks/layer_kernel_probe.py): a bit mask of the phases that run (barriers always).
PHASES = int(os.environ.get("MLX_QLORA_LAYER_KERNEL_PHASES", "63"))
SLEEP_NS = int(os.environ.get("MLX_QLORA_LAYER_KERNEL_SLEEP_NS", "128"))  # between polls of a barrier
SPIN_LIMIT = 1 << 24  # polls of a barrier before the launch traps (seconds: blocks were not co-resident)

_HEADER = r"""
// Reads of data that other blocks of this launch wrote: through L2, never a stale L1 line.
template <int DT>
__device__ __forceinline__ float load_f_cg(const void* p, size_t i);

template <>
__device__ __forceinline__ float load_f_cg<0>(const void* p, size_t i) {
  return __ldcg(reinterpret_cast<const float*>(p) + i);
}

template <>
__device__ __forceinline__ float load_f_cg<1>(const void* p, size_t i) {
  return __uint_as_float((unsigned int)__ldcg(reinterpret_cast<const unsigned short*>(p) + i) << 16);
}

template <int DT>
__device__ __forceinline__ void load_x8_cg(const unsigned char* x, int k, float* o);

template <>
__device__ __forceinline__ void load_x8_cg<0>(const unsigned char* x, int k, float* o) {
  const float4* p = reinterpret_cast<const float4*>(x) + (k >> 2);
  unpack_x8(__ldcg(p), __ldcg(p + 1), o);
}

template <>
__device__ __forceinline__ void load_x8_cg<1>(const unsigned char* x, int k, float* o) {
  unpack_x8(__ldcg(reinterpret_cast<const uint4*>(x) + (k >> 3)), o);
}

// Every block waits here until all blocks of the launch have arrived (they are all resident). Barrier i
// has a counter and a release flag on lines of their own: the last block to arrive sets the flag, the
// others poll it (SLEEP_NS between polls), so polls do not queue behind the arrivals' atomics.
__device__ __forceinline__ void grid_barrier(uint32_t* bar, int i) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    uint32_t* count = bar + LINE * (2 * i);
    uint32_t* flag = bar + LINE * (2 * i + 1);
    if (atomicAdd(count, 1u) == gridDim.x - 1) {
      atomicExch(flag, 1u);
    } else {
      volatile uint32_t* released = flag;
      unsigned long long polls = 0;
      while (*released == 0u) {
        if (SLEEP_NS > 0) {
          __nanosleep(SLEEP_NS);
        }
        if (++polls == SPIN_LIMIT) {
          __trap();
        }
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// The last block to leave puts the counters and flags back to zero for the next launch.
__device__ __forceinline__ void grid_exit(uint32_t* bar, int n) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(bar + LINE * (2 * n), 1u) == gridDim.x - 1) {
      for (int i = 0; i <= 2 * n; ++i) {
        atomicExch(bar + LINE * i, 0u);
      }
      __threadfence();
    }
  }
}
"""

_BODY = r"""
  constexpr int WPB = THREADS / 32;
  uint32_t* bar = const_cast<uint32_t*>(counters);
  T* q = reinterpret_cast<T*>(work + OFF_Q);                  // (M, NQ)
  float* part_acc = reinterpret_cast<float*>(work + OFF_ACC);  // (M, H, S, HD)
  float* part_ml = reinterpret_cast<float*>(work + OFF_ML);    // (M, H, S, 2)
  T* attn = reinterpret_cast<T*>(work + OFF_ATTN);            // (M, NQ)
  T* h = reinterpret_cast<T*>(work + OFF_H);                  // (M, HID)
  T* act = reinterpret_cast<T*>(work + OFF_ACT);              // (M, INTER)
  const int warp0 = blockIdx.x * WPB + (threadIdx.x >> 5);
  const int warps = gridDim.x * WPB;

  for (int vw = warp0; (PHASES & 1) && vw < (NQ + 2 * NKV) / R1; vw += warps) {
    qkv_fn<T, DT, M, HID, NQ + 2 * NKV, R1, 1, NQ, NKV, NKV, HD, TS>(
        vw, q_w, q_s, q_b, k_w, k_s, k_b, v_w, v_s, v_b, x, gamma1, offset, q, k_new, v_new);
  }
  grid_barrier(bar, 0);
  for (int vb = blockIdx.x; (PHASES & 2) && vb < M * HKV * S; vb += gridDim.x) {
    attention_partial<T, DT, H, HKV, HD, C, S, THREADS>(vb, q, keys, values, k_new, v_new, offset, part_acc, part_ml);
    __syncthreads();  // the next range reuses the shared memory
  }
  grid_barrier(bar, 1);
  for (int vb = blockIdx.x; (PHASES & 4) && vb < M * H; vb += gridDim.x) {
    attention_combine<T, H, HD, S>(vb, part_acc, part_ml, attn);
  }
  grid_barrier(bar, 2);
  for (int vw = warp0; (PHASES & 8) && vw < HID / R2; vw += warps) {
    residual_fn<T, DT, M, NQ, HID, R2, 1, HID, 0, 0, HD, TS>(vw, o_w, o_s, o_b, attn, x, h);
  }
  grid_barrier(bar, 3);
  for (int vw = warp0; (PHASES & 16) && vw < INTER / R3; vw += warps) {
    swiglu_fn<T, DT, M, HID, INTER, R3, 2, INTER, INTER, 0, HD, TS>(vw, g_w, g_s, g_b, u_w, u_s, u_b, h, gamma2, act);
  }
  grid_barrier(bar, 4);
  for (int vw = warp0; (PHASES & 32) && vw < HID / R4; vw += warps) {
    residual_fn<T, DT, M, INTER, HID, R4, 1, HID, 0, 0, HD, TS>(vw, d_w, d_s, d_b, act, h, out);
  }
  grid_exit(bar, BARRIERS);
"""

INPUT_NAMES = ["x", "gamma1", "q_w", "q_s", "q_b", "k_w", "k_s", "k_b", "v_w", "v_s", "v_b", "keys", "values",
               "offset", "o_w", "o_s", "o_b", "gamma2", "g_w", "g_s", "g_b", "u_w", "u_s", "u_b", "d_w", "d_s",
               "d_b", "counters"]
OUTPUT_NAMES = ["out", "k_new", "v_new", "work"]


@dataclass(frozen=True)
class LayerConstants:
    """What one compiled layer kernel is specialised for (its source and launch)."""

    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps1: float
    eps2: float
    rope_base: float
    rope_scale: float
    scale: float
    sleep_ns: int = SLEEP_NS

    def source(self) -> str:
        return _BODY.replace("BARRIERS", str(BARRIERS))

    def header(self, spin_limit: int = SPIN_LIMIT) -> str:
        qkv = qmv_cuda.Variant(3, norm_eps=self.eps1, rope=(True, True, False), rope_base=self.rope_base,
                               rope_scale=self.rope_scale)
        swiglu = qmv_cuda.Variant(2, swiglu=True, norm_eps=self.eps2)
        residual = qmv_cuda.Variant(1, residual=True)
        return "\n".join([
            qmv_cuda._HEADER, _HEADER.replace("SPIN_LIMIT", f"{spin_limit}ull").replace("SLEEP_NS", str(self.sleep_ns))
            .replace("LINE", str(LINE)),
            qkv.device_function("qkv_fn"), swiglu.device_function("swiglu_fn"),
            residual.device_function("residual_fn"), attention_cuda.device_functions(self.scale),
        ])

    @property
    def name(self) -> str:
        return f"mlx_qlora_decoder_layer_{abs(hash(self))}"


@lru_cache(maxsize=None)
def _kernel(constants: LayerConstants):
    return mx.fast.cuda_kernel(name=constants.name, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                               source=constants.source(), header=constants.header())


def _rows_per_warp(rows: int, warps: int, head_dim: int = 0) -> int:
    """Rows per warp that leave the busiest warp the fewest rows (ties: more rows share each loaded input).
    Rotary outputs (``head_dim``) need an even count that divides the head."""
    best, best_rows = 0, None
    for r in (4, 2, 1):
        if rows % r or (head_dim and (r == 1 or head_dim % r)):
            continue
        busiest = -(-(rows // r) // warps) * r
        if best_rows is None or busiest < best_rows:
            best, best_rows = r, busiest
    if not best:
        raise ValueError(f"no rows per warp divides {rows} rows (head dim {head_dim})")
    return best


def _align(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def launch_args(c: LayerConstants, batch: int, capacity: int, dtype: mx.Dtype, scale_dtype: mx.Dtype,
                blocks: int) -> dict:
    """Template constants, grid and outputs of one layer launch."""
    warps = blocks * THREADS // 32
    nq, nkv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    S = attention_cuda.splits(capacity)
    size = dtype.size
    layout = {}
    at = 0
    for name, nbytes in (("OFF_Q", batch * nq * size), ("OFF_ACC", batch * c.n_heads * S * c.head_dim * 4),
                         ("OFF_ML", batch * c.n_heads * S * 2 * 4), ("OFF_ATTN", batch * nq * size),
                         ("OFF_H", batch * c.hidden * size), ("OFF_ACT", batch * c.intermediate * size)):
        layout[name] = at
        at += _align(nbytes)
    template = [("T", dtype), ("DT", qmv_cuda._DTYPE_CODES[dtype]), ("TS", scale_dtype), ("M", batch),
                ("HID", c.hidden), ("NQ", nq), ("NKV", nkv), ("HD", c.head_dim), ("H", c.n_heads),
                ("HKV", c.n_kv_heads), ("C", capacity), ("S", S), ("INTER", c.intermediate),
                ("R1", _rows_per_warp(nq + 2 * nkv, warps, c.head_dim)), ("R2", _rows_per_warp(c.hidden, warps)),
                ("R3", _rows_per_warp(c.intermediate, warps)), ("R4", _rows_per_warp(c.hidden, warps)),
                ("THREADS", THREADS), ("PHASES", PHASES), *layout.items()]
    return dict(
        template=template,
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch, 1, c.hidden), (batch, c.n_kv_heads, 1, c.head_dim),
                       (batch, c.n_kv_heads, 1, c.head_dim), (at,)],
        output_dtypes=[dtype, dtype, dtype, mx.uint8],
    )


@lru_cache(maxsize=None)
def multiprocessors() -> Optional[int]:
    """Streaming multiprocessors of CUDA device 0, from the driver library; None where it cannot be read."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        device, count = ctypes.c_int(), ctypes.c_int()
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(device), 0):
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(count), 16, device):  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
            return None
        return count.value or None
    except (OSError, AttributeError):
        return None


def blocks() -> Optional[int]:
    """Blocks of one launch: ``MLX_QLORA_LAYER_KERNEL_BLOCKS`` or two per multiprocessor; None: unknown."""
    forced = int(os.environ.get("MLX_QLORA_LAYER_KERNEL_BLOCKS", "0"))
    if forced > 0:
        return forced
    sms = multiprocessors()
    return 2 * sms if sms else None


def constants_of(layer) -> LayerConstants:
    a, m = layer.self_attn, layer.mlp
    return LayerConstants(
        hidden=a.q_proj.in_features, intermediate=m.gate_proj.out_features, n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, eps1=float(layer.input_layernorm.eps),
        eps2=float(layer.post_attention_layernorm.eps), rope_base=float(a.rope_theta),
        rope_scale=float(a.rope_scale), scale=float(a.scale), sleep_ns=SLEEP_NS)


def counters(layer) -> mx.array:
    """The layer's barrier counters (zero between launches), made once per layer."""
    c = layer.__dict__.get("_barrier_counters")
    if c is None:
        c = mx.zeros((LINE * (2 * BARRIERS + 1),), dtype=mx.uint32)
        mx.eval(c)
        layer.__dict__["_barrier_counters"] = c
    return c


def inputs(layer, x: mx.array, keys: mx.array, values: mx.array, offset: mx.array) -> list[mx.array]:
    """The launch's inputs in ``INPUT_NAMES`` order: x (B, 1, hidden), the cache before this position."""
    a, m = layer.self_attn, layer.mlp
    return [x.reshape(x.shape[0], -1), layer.input_layernorm.weight, *a.q_proj.parts, *a.k_proj.parts,
            *a.v_proj.parts, keys, values, offset.astype(mx.int32).reshape(1), *a.o_proj.parts,
            layer.post_attention_layernorm.weight, *m.gate_proj.parts, *m.up_proj.parts, *m.down_proj.parts,
            counters(layer)]


def applies(layer, projections) -> bool:
    """Prepared (``counters`` made before tracing), the grid size known, one dtype for every scale and
    offset of the layer's ``projections``. The caller (``fused_decode.applies``) has checked the rest."""
    if "_barrier_counters" not in layer.__dict__ or not blocks():
        return False
    dtype = projections[0].scales.dtype
    return all(p.scales.dtype == dtype and p.biases.dtype == dtype for p in projections)


def layer_step(layer, x: mx.array, cache) -> mx.array:
    """x (B, 1, hidden) -> the layer's output (B, 1, hidden); stores this position's keys and values."""
    c = constants_of(layer)
    args = launch_args(c, x.shape[0], cache.capacity, x.dtype, layer.self_attn.q_proj.scales.dtype, blocks())
    out, k_new, v_new, _ = _kernel(c)(inputs=inputs(layer, x, cache.keys, cache.values, cache.offset), **args)
    cache.update(k_new, v_new)
    return out
