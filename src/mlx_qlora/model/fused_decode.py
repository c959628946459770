"""One decoder layer of compiled decoding on CUDA in six launches instead of about twenty.

With one token per sequence, a ``StaticKVCache`` and bare per-row 4-bit projections, a layer runs as:

1. ``qkv_norm_rope``: input RMSNorm, q/k/v and rotary embeddings on q and k, and k and v written into
   the cache's buffers in place at this position's slot (one kernel);
2. ``decode_attention`` over the static cache (two kernels, no mask);
3. ``matmul_residual``: o_proj plus the residual;
4. ``swiglu_norm``: post-attention RMSNorm, gate, up and SwiGLU;
5. ``matmul_residual``: down_proj plus the residual.

The norms, rotations and residual sums happen in float32 inside the kernels and are rounded once, so
outputs differ from the operation-by-operation path by bfloat16 rounding only (largest logit difference
0.039 at logits up to 2.6 on Mistral-7B shapes). On by default: on an H100 decoding ran at 1.96-2.36x
mlx-lm's tokens/s in four runs (325.8 against 145.8 in the latest; ``benchmarks/RESULTS.md``). Writing
the cache in place instead of two ``slice_update`` per layer took a token from 5.0 to 3.1 ms: those
copies were a quarter of the GPU's time (``benchmarks/kernel_profile.py``).
The CPU tests check the kernels by emulation and this wiring with the kernels' formulas in their place.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..kernels.cuda import attention as attention_cuda
from ..kernels.cuda import qmv as qmv_cuda
from ..quant.quantized_linear import QuantizedLinear
from .static_cache import StaticKVCache

# MLX_QLORA_FUSED_DECODE: "0" off (layer by layer in MLX operations), "1" six launches per layer.
_ENABLED = os.environ.get("MLX_QLORA_FUSED_DECODE", "1") != "0"
# Where ``l2_prefetch`` is on, what the launches ask L2 for: attention's first pass (memory mostly idle)
# the o_proj arrays (PREFETCH_O), o_proj's kernel (reading them from L2) the first PREFETCH_GATE_UP_MB of
# gate's and of up's packed weights, which the first blocks of the SwiGLU kernel read. On an H100 gate/up
# took 0.07 ms per token of Mistral-7B less in every lease (0.861-0.890 against 0.933-0.962) with o and
# down unchanged (8 MB, 16 MB: o slower by more than gate/up gained; benchmarks/RESULTS.md).
PREFETCH_O = os.environ.get("MLX_QLORA_PREFETCH_O", "1") == "1"
PREFETCH_GATE_UP_MB = float(os.environ.get("MLX_QLORA_PREFETCH_GATE_UP_MB", "4"))


def _projections(layer) -> list:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def applies(layer, x: mx.array, cache) -> bool:
    """Opted in, one token per sequence over a ``StaticKVCache``, every projection a bare per-row 4-bit
    layer in inference, and shapes the kernels take."""
    if not (_ENABLED and isinstance(cache, StaticKVCache) and x.ndim == 3 and x.shape[1] == 1):
        return False
    if not all(type(p) is QuantizedLinear and p.runs_bare_per_row_4bit for p in _projections(layer)):
        return False
    a = layer.self_attn
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return (
        a.head_dim % 4 == 0 and all(n.dtype == x.dtype for n in norms)
        and qmv_cuda.supports(x, a.q_proj.in_features, 4, None)
        and qmv_cuda.supports(x, layer.mlp.down_proj.in_features, 4, None)
        and attention_cuda.supports_shapes((x.shape[0], a.n_heads, 1, a.head_dim), cache.keys.shape,
                                           x.dtype, cache.keys.dtype)
    )


def _first_mb(weight: mx.array, mb: float) -> tuple[mx.array, int, int]:
    """The first ``mb`` MB of ``weight`` in whole 128-byte lines, as an ``l2_prefetch`` byte range (clipped
    to the array there)."""
    return weight, 0, int(mb * (1 << 20)) // 128 * 128


def layer_step(layer, x: mx.array, cache: StaticKVCache) -> mx.array:
    """x (B, 1, hidden) -> the layer's output (B, 1, hidden); stores this position's keys and values."""
    a, m = layer.self_attn, layer.mlp
    B = x.shape[0]
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    position = cache.offset  # of this token
    # q (B, H, 1, hd); this position's k and v written into the cache's buffers (B, Hkv, C, hd) in place
    q, keys, values = qmv_cuda.qkv_norm_rope(
        x, norm1.weight, norm1.eps, [a.q_proj.parts, a.k_proj.parts, a.v_proj.parts], position, a.head_dim,
        a.rope_theta, a.rope_scale, (B, a.n_heads, 1, a.head_dim), cache=(cache.keys, cache.values))
    cache.keys, cache.values = keys, values
    attn = attention_cuda.decode_attention(q, keys, values, position, a.scale,
                                           prefetch=a.o_proj.parts if PREFETCH_O else ())  # (B, 1, H * hd)
    gate_up = [_first_mb(w, PREFETCH_GATE_UP_MB) for w in (m.gate_proj.weight, m.up_proj.weight)]
    h = qmv_cuda.matmul_residual(attn, a.o_proj.parts, x, prefetch=gate_up)  # (B, 1, hidden)
    act = qmv_cuda.swiglu_norm(h, norm2.weight, norm2.eps, m.gate_proj.parts, m.up_proj.parts)
    return qmv_cuda.matmul_residual(act, m.down_proj.parts, h)
