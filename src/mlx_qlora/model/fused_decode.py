"""The decoder-layer seam: one decoder layer of compiled decoding on CUDA in six launches instead of about twenty.

With one token per sequence, a ``StaticKVCache`` and per-row 4-bit projections, bare or with LoRA
adapters attached in inference, a layer runs as:

1. ``qkv_norm_rope``: input RMSNorm, q/k/v and rotary embeddings on q and k, and k and v written into
   the cache's buffers in place at this position's slot (one kernel);
2. ``decode_attention`` over the static cache (two kernels, no mask);
3. ``matmul_residual``: o_proj plus the residual;
4. ``swiglu_norm``: post-attention RMSNorm, gate, up and SwiGLU;
5. ``matmul_residual``: down_proj plus the residual.

Adapters (any subset of the seven projections) stay on this path with no launch of their own
(``quant/low_rank.Terms``). Each update ``scale * (n @ A.T) @ B.T`` is split at its rank: the kernel that
reads the input n adds ``scale * h @ B.T`` to each output row's float32 sum in its epilogue (before the
rotation, the cache write, SwiGLU or the residual), and h = n @ A.T, the A-products, is written by the
launch before it, which multiplies each value it writes by that input's row of A.T and adds the products
into the layer's scratch with float atomics (``Variant.emit_cols``): attention's second pass writes
o_proj's, o_proj's launch gate/up's, the SwiGLU launch down_proj's, and down_proj's launch the next
layer's q/k/v's (``link``: the next layer finds them through ``_qkv_handoff`` when its input is this
layer's output). The first launch of each layer zeroes its scratch. Only the first layer's q/k/v
A-products, of the embeddings, are a launch of their own (``qmv.a_products``; not a matmul: a cuBLAS
matmul in MLX's CUDA graph made every graph of the token be instantiated again instead of updated, which
doubled the host's time per token). Where a kernel norms its input (q/k/v, gate/up), A is taken through
the RMSNorm's weight and the kernel applies its own 1/rms, so no normed copy of the input is made.
``settings.lora_scratch`` off: each launch's A-products are an ``a_products`` launch beside it. Arrays and
scratches are built once before tracing (``prepare``, ``link``).

``DecoderLayer.__call__`` asks ``applies`` and otherwise runs the layer operation by operation. The
norms, rotations and residual sums happen in float32 inside the kernels and are rounded once, so outputs
differ from the operation-by-operation path by bfloat16 rounding only. On by default
(``settings.fused_decode``): decoding was faster than layer by layer, and writing the cache in place
saved the two ``slice_update`` copies per layer that took a large share of the GPU's time
(``fused_decode_probe.py``, ``kernel_profile.py``).

Where ``l2_prefetch`` is on, launches also ask L2 for what the next kernel reads: attention's first pass
(its memory mostly idle) the o_proj arrays (``settings.prefetch_o``), o_proj's kernel the first
``settings.prefetch_gate_up_mb`` MB of gate's and of up's packed weights, which the first blocks of the
SwiGLU kernel read (gate/up faster, o and down unchanged: ``decode_sweep.py``).
The CPU tests check the kernels by emulation and this wiring with the kernels' formulas in their place.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .. import settings
from ..kernels.cuda import attention as attention_cuda
from ..kernels.cuda import qmv as qmv_cuda
from ..kernels.cuda.qmv_plan import MAX_ROWS
from ..quant.low_rank import Terms, fused_form
from ..quant.quantized_linear import QuantizedLinear
from .static_cache import StaticKVCache


def _projections(layer) -> list:
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]


def _forms(layer) -> list:
    """``low_rank.fused_form`` of the seven projections: (base, low_rank or None) each, None where not taken."""
    return [fused_form(p) for p in _projections(layer)]


def applies(layer, x: mx.array, cache, position_ids=None) -> bool:
    """Whether ``layer_step`` runs this call: ``settings.fused_decode`` on, one token per sequence over a
    ``StaticKVCache`` at the cache's own positions, every projection a bare per-row 4-bit layer in
    inference or a LoRA layer over one in inference (``fused_form``; biased layers, Qwen2's q/k/v, are not
    bare), no fused projections (Phi-3), plain or linearly scaled RoPE over the whole head without per-head
    q/k norms (Qwen3, Gemma 3), none of Gemma's other features (``gemma_like``), and shapes the
    kernels take."""
    if not (settings.current().fused_decode and isinstance(cache, StaticKVCache) and position_ids is None
            and x.ndim == 3 and x.shape[1] == 1):
        return False
    forms = _structure_forms(layer)
    if forms is None:
        return False
    a = layer.self_attn
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return (
        a._rope_inv_freq is None  # the kernel's rotary embeddings are plain RoPE: no llama3 frequencies
        and a.rotary_dims == a.head_dim and a.rope_attention_factor == 1.0  # nor partial or longrope
        and "q_norm" not in a  # nor a norm over each query / key head (Qwen3)
        and a.head_dim % 4 == 0 and all(n.dtype == x.dtype for n in norms)
        and qmv_cuda.supports(x, forms[0][0].in_features, 4, None)
        and qmv_cuda.supports(x, forms[6][0].in_features, 4, None)
        and attention_cuda.supports_shapes((x.shape[0], a.n_heads, 1, a.head_dim), cache.keys.shape,
                                           x.dtype, cache.keys.dtype)
    )


def _structure_forms(layer) -> Optional[list]:
    """``_forms`` where the layer's structure is one the kernels take: q/k/v and gate/up apart (not Phi-3's
    fused projections), no Gemma feature (``gemma_like``), every projection a per-row 4-bit layer in
    inference, bare or under LoRA; else None."""
    if "qkv_proj" in layer.self_attn or gemma_like(layer):
        return None
    forms = _forms(layer)
    if not all(form is not None and type(form[0]) is QuantizedLinear for form in forms):
        return None
    return forms


def gemma_like(layer) -> bool:
    """Whether ``layer`` has a feature the kernels do not compute (Gemma 2/3): ``1 + weight`` norms, norms
    after attention and around the MLP, per-head query/key norms, GeGLU or soft-capped scores. (The
    attention scale and each layer's RoPE base are the kernels' arguments: those they take.)"""
    a = layer.self_attn
    return bool(
        layer.input_layernorm.offset or getattr(layer, "sandwich_norms", False) or "q_norm" in a
        or getattr(layer.mlp, "geglu", False) or a.softcap is not None
    )


def _first_mb(weight: mx.array, mb: float) -> tuple[mx.array, int, int]:
    """The first ``mb`` MB of ``weight`` in whole 128-byte lines, as an ``l2_prefetch`` byte range (clipped
    to the array there)."""
    return weight, 0, int(mb * (1 << 20)) // 128 * 128


def layer_step(layer, x: mx.array, cache: StaticKVCache) -> mx.array:
    """x (B, 1, hidden) -> the layer's output (B, 1, hidden); stores this position's keys and values."""
    s = settings.current()
    a = layer.self_attn
    B = x.shape[0]
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    (qkv, o_proj, gate_proj, up_proj, down_proj), low = _bases_and_updates(layer)
    terms = _terms(layer, low, x.dtype)
    next_qkv = _next_qkv(layer, x.dtype) if s.lora_scratch else None  # the next layer's q/k/v terms
    scratch = _scratch(layer, terms + [next_qkv]) if s.lora_scratch else None
    qkv_lr, o_lr, gate_up_lr, down_lr = terms
    lr = _Feed(terms + [next_qkv], scratch)
    handed = layer.__dict__.pop("_qkv_handoff", None)  # what the layer before wrote for this one's q/k/v
    if qkv_lr is not None and handed is not None and handed[0] is x and handed[3] is qkv_lr:
        qkv_low_rank = {"low_rank": (handed[1], qkv_lr.terms), "low_rank_offset": handed[2]}
    else:
        qkv_low_rank = {"low_rank": _low_rank(qkv_lr, x)}
    position = cache.offset  # of this token
    # q (B, H, 1, hd); this position's k and v written into the cache's buffers (B, Hkv, C, hd) in place;
    # the layer's scratch zeroed for the launches below
    q, keys, values = qmv_cuda.qkv_norm_rope(
        x, norm1.weight, norm1.eps, [p.parts for p in qkv], position, a.head_dim,
        a.rope_theta, a.rope_scale, (B, a.n_heads, 1, a.head_dim), cache=(cache.keys, cache.values),
        zero=None if scratch is None else scratch[0], **qkv_low_rank)
    cache.keys, cache.values = keys, values
    attn = attention_cuda.decode_attention(q, keys, values, position, a.scale,  # (B, 1, H * hd)
                                           prefetch=o_proj.parts if s.prefetch_o else (), emit=lr.emit(1))
    gate_up = [_first_mb(w, s.prefetch_gate_up_mb) for w in (gate_proj.weight, up_proj.weight)]
    h = qmv_cuda.matmul_residual(attn, o_proj.parts, x, prefetch=gate_up, emit=lr.emit(2),
                                 **lr.read(1, attn))  # (B, 1, hidden)
    act = qmv_cuda.swiglu_norm(h, norm2.weight, norm2.eps, gate_proj.parts, up_proj.parts, emit=lr.emit(3),
                               **lr.read(2, h))
    for_next = lr.emit(4)  # the next layer's q/k/v A-products, where this launch writes them
    out = qmv_cuda.matmul_residual(act, down_proj.parts, h, emit=for_next, **lr.read(3, act))
    if for_next is not None:
        layer.__dict__["_next_layer"].__dict__["_qkv_handoff"] = (out, scratch[0], scratch[1][4], next_qkv)
    return out


def _bases_and_updates(layer) -> tuple[tuple, list]:
    """The bases ((q, k, v), o, gate, up, down) and the seven low-rank updates (None where not adapted)."""
    forms = _forms(layer)
    bases = [base for base, _ in forms]
    return (bases[0:3], *bases[3:]), [low_rank for _, low_rank in forms]


GROUPS = (slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 7))  # projections of one input: q/k/v, o, gate/up, down


def _gammas(layer) -> tuple:
    """The RMSNorm weight each group's kernel applies to its input (None: o_proj's and down_proj's)."""
    return (layer.input_layernorm.weight, None, layer.post_attention_layernorm.weight, None)


def prepare(layer, dtype: mx.Dtype) -> None:
    """Build and cast the layer's low-rank terms for ``dtype`` now (evaluated), outside a traced graph;
    ``layer_step`` takes them while the layer still holds those adapter arrays and norm weights
    (``Terms.holds``) and builds them inline otherwise. Nothing for a layer without adapters or off the
    fused path. (Its scratch, which depends on the next layer's terms too, is ``link``'s.)"""
    forms = _structure_forms(layer)
    if forms is None:
        return
    low = [low_rank for _, low_rank in forms]
    terms = [Terms.build(low[g], dtype, gamma) for g, gamma in zip(GROUPS, _gammas(layer))]
    mx.eval([a for t in terms if t is not None for a in t.arrays])
    layer.__dict__["_decode_terms"] = terms  # not parameters: outside the module's tree


def _terms(layer, low: list, dtype: mx.Dtype) -> list[Optional[Terms]]:
    """The low-rank terms of q/k/v, o, gate/up and down (None where none is adapted): ``prepare``'s while
    they hold the current adapters and norm weights, else built here."""
    prepared = layer.__dict__.get("_decode_terms") or [None] * len(GROUPS)
    return [have if have is not None and have.holds(low[g], dtype, gamma) else Terms.build(low[g], dtype, gamma)
            for have, g, gamma in zip(prepared, GROUPS, _gammas(layer))]


def _low_rank(terms: Optional[Terms], x: mx.array):
    """A launch's ``low_rank`` argument: the terms' A-products of ``x`` (a launch of their own, not a matmul:
    ``qmv.a_products``) and their B's; None without adapters."""
    return None if terms is None else (qmv_cuda.a_products(x, terms.a), terms.terms)


Scratch = tuple[mx.array, tuple]  # the layer's float32 scratch, and per group the offset of its A-products (or None)


def _scratch_layout(terms: list[Optional[Terms]]) -> tuple[int, tuple]:
    """Floats of the scratch and the offsets of o's, gate/up's, down's and the next layer's q/k/v's
    A-products in it ((MAX_ROWS, R) each, for every batch the kernels take; this layer's q/k/v's are in the
    layer before's scratch, or come from ``a_products`` of the layer's input: None)."""
    offsets, size = [None], 0
    for t in terms[1:]:
        offsets.append(None if t is None else size)
        size += 0 if t is None else MAX_ROWS * t.cols
    return size, tuple(offsets)


def _next_qkv(layer, dtype: mx.Dtype) -> Optional[Terms]:
    """The q/k/v terms of the layer after this one (``link``) where it decodes through these kernels with
    adapters on q, k or v; else None."""
    after = layer.__dict__.get("_next_layer")
    forms = None if after is None else _structure_forms(after)
    if forms is None:
        return None
    return _terms(after, [low_rank for _, low_rank in forms], dtype)[0]


def link(layers, dtype: mx.Dtype) -> None:
    """After ``prepare`` of every layer: tell each layer the one after it, whose q/k/v A-products its last
    launch writes into its scratch, and lay the scratch out for that (evaluated now, outside a traced graph)."""
    for i, layer in enumerate(layers):
        layer.__dict__["_next_layer"] = layers[i + 1] if i + 1 < len(layers) else None
        layer.__dict__.pop("_qkv_handoff", None)
    for layer in layers:
        terms = layer.__dict__.get("_decode_terms")
        if terms is None:
            continue
        size, offsets = _scratch_layout(terms + [_next_qkv(layer, dtype)])
        scratch = (mx.zeros((size,), mx.float32), offsets) if size else None
        if scratch is not None:
            mx.eval(scratch[0])
        layer.__dict__["_decode_scratch"] = scratch


def _scratch(layer, terms: list[Optional[Terms]]) -> Optional[Scratch]:
    """The layer's low-rank scratch (``settings.lora_scratch``): ``link``'s where it fits these terms, else a
    new one (zeroed by the layer's first launch either way); None where no launch of the layer writes
    A-products for another."""
    size, offsets = _scratch_layout(terms)
    if size == 0:
        return None
    have = layer.__dict__.get("_decode_scratch")
    if have is not None and have[0].size == size and have[1] == offsets:
        return have
    return mx.zeros((size,), mx.float32), offsets


class _Feed:
    """Where each launch's low-rank terms come from: with a scratch, the launch before writes the A-products
    of its output there (``emit``: the next group's A.T, the scratch, the offset) and the launch reads them
    (``read``); without one, ``a_products`` of the launch's input beside it. Groups: 0 q/k/v, 1 o, 2
    gate/up, 3 down, 4 the next layer's q/k/v."""

    def __init__(self, terms: list[Optional[Terms]], scratch: Optional[Scratch]):
        self.terms, self.scratch = terms, scratch

    def emit(self, group: int) -> Optional[tuple]:
        t = self.terms[group]
        if self.scratch is None or t is None:
            return None
        return t.a_t, self.scratch[0], self.scratch[1][group]

    def read(self, group: int, x: mx.array) -> dict:
        t = self.terms[group]
        if t is None:
            return {}
        if self.scratch is None:
            return {"low_rank": _low_rank(t, x)}
        return {"low_rank": (self.scratch[0], t.terms), "low_rank_offset": self.scratch[1][group]}
