"""The compiled decoding step (``generate/decode_step.py``) over the static cache, and the pieces of the
CUDA decoding path that can be checked without a GPU: the attention kernel's formula and when the fused
projections are taken. The kernels themselves run on CUDA only (``benchmarks/qmv_probe.py --fused`` and
``benchmarks/attention_probe.py`` check them there against the same formulas)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx.utils import tree_flatten, tree_unflatten

from support import random_adapters, tiny_model
from mlx_qlora import settings
from mlx_qlora.config import LoRAConfig
from mlx_qlora.generate.decode_step import DecodeState, decoder_for
from mlx_qlora.model import KVCache, build_mask, load_model
from mlx_qlora.kernels.cuda import attention as attention_cuda
from mlx_qlora.model.static_cache import (EMPTY_SLOT, StaticKVCache, grown_capacity, slot_positions,
                                          static_capacity)
from mlx_qlora.quant import QuantizedLinear, matmul
from mlx_qlora.lora import apply_lora
from mlx_qlora.kernels.cuda import qmv as qmv_cuda


def _random_model(window, **overrides):
    return tiny_model(seed=1, vocab_size=96, intermediate_size=96, max_position_embeddings=512,
                      sliding_window=window, **overrides).eval()


def _eager_and_compiled_logits(model, prompt, steps):
    """Greedy decoding fed the same tokens two ways: KVCache built per step, and the compiled step."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    tokens = [int(mx.argmax(logits, axis=-1).item())]
    state = DecodeState.from_caches(cache, len(prompt) + steps)
    decoder = decoder_for(model)
    eager, compiled = [], []
    for _ in range(steps):
        t = mx.array([[tokens[-1]]])
        eager.append(model(t, cache=cache)[:, -1, :])
        compiled.append(decoder.step(state, t))
        tokens.append(int(mx.argmax(eager[-1], axis=-1).item()))
    return mx.stack(eager), mx.stack(compiled), state


@pytest.mark.parametrize("window,prompt_len,steps", [(None, 7, 20), (16, 5, 30), (16, 21, 12), (300, 9, 10)])
def test_compiled_step_equals_the_eager_step(window, prompt_len, steps):
    """Float32, 1e-5: no window; a window the ring wraps around (from a short and a long prompt); a window
    larger than the capacity (the buffer holds every position)."""
    model = _random_model(window)
    prompt = np.random.default_rng(prompt_len).integers(0, 96, size=prompt_len).tolist()
    eager, compiled, state = _eager_and_compiled_logits(model, prompt, steps)
    np.testing.assert_allclose(np.array(compiled), np.array(eager), rtol=1e-5, atol=1e-5)
    assert state.keys[0].shape[2] == static_capacity(prompt_len + steps, window)
    assert int(state.offset.item()) == prompt_len + steps


def test_compiled_step_on_the_quantized_checkpoint(tiny_hf_checkpoint):
    """The 4-bit model from a transformers checkpoint (window 16), prompt longer than the window."""
    model = load_model(tiny_hf_checkpoint)
    from mlx_qlora.model.modules import quantize_model

    quantize_model(model, bits=4)
    model.eval()
    prompt = np.random.default_rng(0).integers(3, 320, size=19).tolist()
    eager, compiled, _ = _eager_and_compiled_logits(model, prompt, 10)
    np.testing.assert_allclose(np.array(compiled), np.array(eager), rtol=1e-5, atol=1e-5)


def test_decoder_is_rebuilt_when_weights_change():
    model = _random_model(None)
    first = decoder_for(model)
    assert decoder_for(model) is first  # same weights: the traced graph is reused
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
    model.eval()
    second = decoder_for(model)
    assert second is not first
    # the adapters are part of the new graph: non-zero B changes the logits like the eager path
    model.update(tree_map_lora_b(model))
    prompt = [3, 4, 5]
    eager, compiled, _ = _eager_and_compiled_logits(model, prompt, 4)
    np.testing.assert_allclose(np.array(compiled), np.array(eager), rtol=1e-5, atol=1e-5)


def tree_map_lora_b(model):
    from mlx.utils import tree_flatten, tree_unflatten

    return tree_unflatten([(k, mx.full(v.shape, 0.05)) for k, v in tree_flatten(model.parameters())
                           if k.endswith("lora_B")])


def test_slot_positions_and_capacity():
    # capacity 4: after writing position 5, slots hold 4, 5, 2, 3
    assert slot_positions(mx.array(5), 4).tolist() == [4, 5, 2, 3]
    assert slot_positions(mx.array(1), 4).tolist() == [0, 1, EMPTY_SLOT, EMPTY_SLOT]
    assert static_capacity(300, None) == 512 and static_capacity(300, 4096) == 512
    assert static_capacity(5000, 4096) == 4096 and static_capacity(10, 16) == 16


def test_a_conversation_doubles_its_capacity_instead_of_rounding_each_turn():
    """Turns of about 320 positions each: 512, 1024, 1024, 2048 slots (three graphs for four turns, where
    rounding each turn up to 256 gives four); a window caps the doubling; no previous turn: rounding."""
    capacities, previous = [], 0
    for needed in (320, 640, 960, 1280):
        previous = grown_capacity(needed, None, previous)
        capacities.append(previous)
    assert capacities == [512, 1024, 1024, 2048]
    assert [static_capacity(n, None) for n in (320, 640, 960, 1280)] == [512, 768, 1024, 1280]
    assert grown_capacity(3000, 4096, 2048) == 4096 and grown_capacity(9000, 4096, 4096) == 4096
    assert grown_capacity(3000, 3000, 2048) == 3000 and grown_capacity(100, None, 0) == 256


def test_static_cache_refuses_a_capacity_that_loses_positions():
    cache = KVCache(None)
    cache.update(mx.zeros((1, 2, 10, 8)), mx.zeros((1, 2, 10, 8)))
    with pytest.raises(ValueError, match="smaller than the 10 cached positions"):
        StaticKVCache.from_cache(cache, 8)
    windowed = KVCache(8)
    windowed.update(mx.zeros((1, 2, 10, 8)), mx.zeros((1, 2, 10, 8)))
    with pytest.raises(ValueError, match="must equal the window 8"):
        StaticKVCache.from_cache(windowed, 4)


@pytest.mark.parametrize("offset", [0, 5, 15, 16, 40])
def test_attention_kernel_formula_equals_masked_attention(offset):
    """``attention_cuda.reference`` (attend to the filled slots) = MLX attention with the mask that
    ``build_mask`` makes from the slots' positions, for a capacity-16 ring before and after it wraps."""
    mx.random.seed(offset)
    B, H, HKV, C, D = 2, 4, 2, 16, 32
    q = mx.random.normal((B, H, 1, D))
    keys, values = mx.random.normal((B, HKV, C, D)), mx.random.normal((B, HKV, C, D))
    positions = slot_positions(mx.array(offset), C)
    mask = build_mask(mx.array([offset]), positions, window=C)
    want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=D**-0.5, mask=mask)
    want = want.transpose(0, 2, 1, 3).reshape(B, 1, H * D)
    got = attention_cuda.reference(q, keys, values, offset, D**-0.5)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_attention_kernel_shapes(monkeypatch):
    """The shapes the attention passes of the fused decoder layer take."""

    def supports(q, k):
        return attention_cuda.supports_shapes(q.shape, k.shape, q.dtype, k.dtype)

    monkeypatch.setattr(attention_cuda, "on_cuda", lambda: True)
    q, k = mx.zeros((1, 32, 1, 128), dtype=mx.bfloat16), mx.zeros((1, 8, 768, 128), dtype=mx.bfloat16)
    assert supports(q, k)
    assert not supports(mx.zeros((1, 32, 2, 128), dtype=mx.bfloat16), k)  # two queries
    assert supports(q, mx.zeros((1, 8, 16384, 128), dtype=mx.bfloat16))  # any capacity
    assert not supports(q, mx.zeros((1, 1, 768, 128), dtype=mx.bfloat16))  # 32 heads per group
    assert not supports(mx.zeros((1, 32, 1, 80), dtype=mx.bfloat16), k[..., :80])  # head dim
    assert not supports(mx.zeros((1, 8, 1, 256), dtype=mx.bfloat16), mx.zeros((1, 8, 768, 256), dtype=mx.bfloat16))
    assert not supports(q, k.astype(mx.float32))  # keys in another dtype
    monkeypatch.setattr(attention_cuda, "on_cuda", lambda: False)
    assert not supports(q, k)


def test_fused_projections_are_taken_only_for_bare_4bit_layers_in_inference(monkeypatch):
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    layers = [QuantizedLinear.from_linear(nn.Linear(64, n, bias=False)) for n in (64, 32, 32)]
    x = mx.zeros((1, 1, 64))
    for layer in layers:
        layer.eval()
    assert matmul.fuses(layers, x)
    assert not matmul.fuses(layers, mx.zeros((1, 9, 64)))  # prompt rows: dequantize + matmul
    with settings.override(fused=False):  # MLX_QLORA_FUSED=0
        assert not matmul.fuses(layers, x)
    layers[1].train()
    assert not matmul.fuses(layers, x)  # training keeps the differentiable path
    layers[1].eval()
    grouped = QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), group_size=32)
    assert not matmul.fuses([layers[0], grouped], x)
    assert not matmul.fuses([layers[0], nn.Linear(64, 32, bias=False)], x)  # full precision
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: False)
    assert not matmul.fuses(layers, x)


def test_fused_projections_take_lora_layers_in_inference(monkeypatch):
    """q/k/v and gate/up in one launch each with LoRA layers among them: same decisions as the decoder layer's."""
    x = mx.zeros((1, 1, 64))

    def takes(layer):
        a, m = layer.self_attn, layer.mlp
        return matmul.fuses([a.q_proj, a.k_proj, a.v_proj], x) and matmul.fuses([m.gate_proj, m.up_proj], x)

    _check_adapter_decisions(monkeypatch, takes)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "up_proj"), ("k_proj", "gate_proj")])
def test_fused_projections_with_adapters_equal_the_lora_layers(monkeypatch, targets):
    """``project`` and ``swiglu`` over LoRA layers (the kernels replaced by their formulas, addends included)
    equal the LoRA layers' own calls; the adapters change the outputs."""
    from mlx_qlora.model.modules import quantize_model

    model = _random_model(None)
    quantize_model(model, bits=4)
    params, config = random_adapters(model.args, rank=4, targets=targets, std=0.3)
    apply_lora(model, config)
    model.update(tree_unflatten(list(params.items())))
    model.eval()
    a, m = model.layers[0].self_attn, model.layers[0].mlp
    x = mx.random.normal((2, 1, 64))
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(qmv_cuda, "qmv_split", lambda x, weights, shapes=None, addends=None: [
        (qmv_cuda.reference(x.reshape(-1, x.shape[-1]), *w) + (0 if add is None else add[0] * add[1])).reshape(s)
        for w, s, add in zip(weights, shapes or [(*x.shape[:-1], w[0].shape[0]) for w in weights],
                             addends or [None] * len(weights))])
    monkeypatch.setattr(qmv_cuda, "qmv_swiglu", lambda x, gate, up, addends=None: qmv_cuda.reference_swiglu(
        x.reshape(-1, x.shape[-1]), gate, up, addends).reshape(*x.shape[:-1], gate[0].shape[0]))
    with settings.override(fused=True):
        assert matmul.fuses([a.q_proj, a.k_proj, a.v_proj], x)
        got = matmul.project([a.q_proj, a.k_proj, a.v_proj], x) + [matmul.swiglu(m.gate_proj, m.up_proj, x)]
    monkeypatch.undo()
    want = [p(x) for p in (a.q_proj, a.k_proj, a.v_proj)] + [nn.silu(m.gate_proj(x)) * m.up_proj(x)]
    bare = [p.base(x) if hasattr(p, "base") else p(x) for p in (a.q_proj, a.k_proj, a.v_proj)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-4)
    assert any(float(mx.abs(w - b).max()) > 1e-2 for w, b in zip(want, bare))


def test_fused_decode_layer_wiring_with_reference_kernels(monkeypatch):
    """``model/fused_decode.py`` with each CUDA kernel replaced by the formula it implements (the kernels
    themselves are checked in tests/kernels/test_emulated.py): the logits of every step equal the
    operation-by-operation path (float32, per-row 4-bit projections, a window the ring wraps around)."""
    model, state, tokens, eager = _quantized_model_and_eager_steps(steps=12)
    fused = _fused_steps_with_reference_kernels(monkeypatch, model, state, tokens)
    np.testing.assert_allclose(np.array(fused), np.array(eager), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets,layers,scratch", [
    (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None, True),
    (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None, False),
    (("k_proj", "o_proj", "gate_proj"), [1], True), (("q_proj", "up_proj", "down_proj"), [0], True)])
def test_fused_decode_layer_with_adapters_equals_the_layer_by_layer_path(monkeypatch, targets, layers, scratch):
    """LoRA attached at run time stays on the fused path: with adapters on all seven projections, or on a
    subset of them in one layer (the other layer bare), every layer of every step takes ``layer_step`` (the
    kernels replaced by their formulas, low-rank terms included: read from the layer's scratch where the
    launch before wrote them, or with ``lora_scratch`` off from a matmul beside each launch) and its logits
    equal the operation-by-operation LoRA layers' within the bare path's tolerance; the adapters move the
    logits far more than that."""
    from mlx_qlora.model import fused_decode

    model, state, tokens, eager = _quantized_model_and_eager_steps(steps=8, adapters=(targets, layers))
    taken = []
    terms, scratches = fused_decode._terms, fused_decode._scratch
    monkeypatch.setattr(fused_decode, "_terms", lambda layer, low, dtype: taken.append(
        [t is p for t, p in zip(terms(layer, low, dtype), layer.__dict__["_decode_terms"])]) or terms(layer, low, dtype))
    monkeypatch.setattr(fused_decode, "_scratch", lambda layer, t: taken.append(
        [scratches(layer, t) is layer.__dict__["_decode_scratch"]]) or scratches(layer, t))
    with settings.override(lora_scratch=scratch):
        fused = _fused_steps_with_reference_kernels(monkeypatch, model, state, tokens)
    np.testing.assert_allclose(np.array(fused), np.array(eager), rtol=1e-4, atol=1e-4)
    # the compiled decoder's terms and scratch, built by fused_decode.prepare and link before tracing, were
    # the ones used (none built per token)
    assert taken and all(all(layer_taken) for layer_taken in taken)
    # A-products as launches of their own: with the scratch only the first layer's q/k/v's (every other
    # layer's are written by the launch before, the layer before's down_proj, bare or not); without it,
    # every adapted group's of every adapted layer
    adapted = {0: ("q_proj", "k_proj", "v_proj"), 1: ("o_proj",), 2: ("gate_proj", "up_proj"), 3: ("down_proj",)}
    groups = sum(any(t in targets for t in names) for names in adapted.values())
    layers_adapted = model.args.num_hidden_layers if layers is None else len(layers)
    first_qkv = any(t in targets for t in adapted[0]) and (layers is None or 0 in layers)
    assert products_per_step[-1] == (int(first_qkv) if scratch else groups * layers_adapted)
    from mlx_qlora.lora import LoRALinear

    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.scale = 0.0  # the same model without its updates
    assert float(mx.abs(_teacher_forced_logits(model, tokens) - eager).max()) > 1e-2


products_per_step = []  # launches of ``a_products`` per step of the last ``_fused_steps_with_reference_kernels``


def _fused_steps_with_reference_kernels(monkeypatch, model, state, tokens) -> mx.array:
    """``_traced_steps`` with the fused decoder layer on and its kernels replaced by their formulas; checks
    that every layer of every step took the fused path."""

    # The layer's low-rank scratch as the kernels use it: the first launch zeroes it, a launch with ``emit`` adds
    # its output (as written) @ ea at an offset, a later launch reads its terms' h there. Here the scratch's
    # contents are kept by (array, offset), since the references cannot write into an array in place.
    written = {}

    def zero(scratch):
        for key in [k for k in written if k[0] is scratch]:
            del written[key]

    def emit(y, target):
        if target is not None:
            ea, scratch, offset = target
            rows = y.reshape(-1, ea.shape[0])
            written[(scratch, offset)] = written.get((scratch, offset), 0) + rows @ ea.astype(mx.float32)

    def h_of(low_rank, offset):  # a launch's h: the matmul's (no scratch) or what was written at the offset
        if low_rank is None or low_rank[0].ndim > 1:
            return low_rank
        return [v for k, v in written.items() if k[0] is low_rank[0] and k[1] == offset][0], low_rank[1]

    def normed_terms(x, eps, low_rank, offset=0):  # terms of a launch that norms its input: times its 1/rms
        return qmv_cuda.low_rank_addends(h_of(low_rank, offset),
                                         qmv_cuda.reference_inv_rms(x.reshape(-1, x.shape[-1]), eps))

    def qkv(x, gamma, eps, weights, position, head_dim, base, scale, q_shape, cache, low_rank=None,
            low_rank_offset=0, zero_=None):
        terms = normed_terms(x, eps, low_rank, low_rank_offset)  # read before the zeroing: another layer's
        if zero_ is not None:
            zero(zero_)
        # the kernel writes k and v into the cache's buffers in place; here: a slice_update at its slot
        q, k, v = [o.astype(x.dtype) for o in qmv_cuda.reference_qkv_norm_rope(
            x.reshape(-1, x.shape[-1]), gamma, eps, weights, int(position.item()), head_dim, base, scale,
            terms)]
        slot = (position % cache[0].shape[2]).reshape(1)
        kv_shape = (x.shape[0], -1, 1, head_dim)  # (B, Hkv, 1, hd)
        return [q.reshape(q_shape)] + [mx.slice_update(c, n.reshape(kv_shape), slot, axes=(2,))
                                       for c, n in zip(cache, (k, v))]

    def swiglu(x, gamma, eps, gate, up, low_rank=None, low_rank_offset=0, emit=None):
        normed = qmv_cuda.reference_rms_norm(x.reshape(-1, x.shape[-1]), gamma, eps)
        y = qmv_cuda.reference_swiglu(normed, gate, up, normed_terms(x, eps, low_rank, low_rank_offset)).reshape(
            *x.shape[:-1], gate[0].shape[0]).astype(x.dtype)
        emit_(y, emit)
        return y

    def residual(x, weight, res, prefetch=(), low_rank=None, low_rank_offset=0, emit=None):
        y = qmv_cuda.reference(x.reshape(-1, x.shape[-1]), *weight) + res.reshape(-1, res.shape[-1])
        for factor, update in qmv_cuda.low_rank_addends(h_of(low_rank, low_rank_offset)) or []:
            y = y + factor * update
        y = y.reshape(res.shape).astype(res.dtype)
        emit_(y, emit)
        return y

    def attention(q, k, v, pos, scale, prefetch=(), emit=None):
        out = attention_cuda.reference(q, k, v, int(pos.item()), scale).astype(q.dtype)
        emit_(out, emit)
        return out

    emit_ = emit

    calls = []
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "supports_shapes", lambda *a: True)  # head dim 16 here
    monkeypatch.setattr(qmv_cuda, "qkv_norm_rope",
                        lambda *a, cache, low_rank=None, low_rank_offset=0, zero=None: calls.append("qkv") or qkv(
                            *a, cache, low_rank, low_rank_offset, zero))
    monkeypatch.setattr(qmv_cuda, "swiglu_norm", swiglu)
    monkeypatch.setattr(qmv_cuda, "matmul_residual", residual)
    monkeypatch.setattr(attention_cuda, "decode_attention", attention)
    monkeypatch.setattr(qmv_cuda, "a_products", lambda x, a: calls.append("a_products") or (
        x.reshape(-1, x.shape[-1]).astype(mx.float32) @ a.astype(mx.float32).T))
    with settings.override(fused_decode=True):
        fused = _traced_steps(model, state, tokens)
    monkeypatch.undo()
    steps = len(tokens) - 1
    assert calls.count("qkv") == steps * model.args.num_hidden_layers  # every layer of every step: fused
    products_per_step.append(calls.count("a_products") / steps)
    return fused


def test_fused_decode_layer_hands_each_launch_what_it_prefetches(monkeypatch):
    """Attention's first pass gets o_proj's arrays, o_proj's launch the first ``prefetch_gate_up_mb`` of gate's
    and up's packed weights (as byte ranges), down's launch nothing (the kernels replaced by recorders);
    ``prefetch_o`` off: attention's first pass gets nothing."""
    from mlx_qlora.model import fused_decode
    from mlx_qlora.model.static_cache import StaticKVCache

    model, state, tokens, _ = _quantized_model_and_eager_steps(steps=1)
    layer = model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    x = mx.zeros((1, 1, a.q_proj.in_features))
    seen = []

    def qkv(*args, cache, low_rank=None, zero=None):
        return [mx.zeros((1, a.n_heads, 1, a.head_dim)), *cache]

    def attention(q, k, v, pos, scale, prefetch=(), emit=None):
        seen.append(list(prefetch))
        return mx.zeros((1, 1, a.n_heads * a.head_dim))

    def residual(x, weight, res, prefetch=(), low_rank=None, low_rank_offset=0, emit=None):
        seen.append(list(prefetch))
        return res

    monkeypatch.setattr(qmv_cuda, "qkv_norm_rope", qkv)
    monkeypatch.setattr(attention_cuda, "decode_attention", attention)
    monkeypatch.setattr(qmv_cuda, "matmul_residual", residual)
    monkeypatch.setattr(qmv_cuda, "swiglu_norm",
                        lambda h, *args, low_rank=None, low_rank_offset=0, emit=None: mx.zeros(
                            (1, 1, m.gate_proj.out_features)))
    with settings.override(prefetch_gate_up_mb=1 / 1024):  # 1 KB of each
        fused_decode.layer_step(layer, x, StaticKVCache(state.keys[0], state.values[0], state.offset))
    attention_pf, o_pf, down_pf = seen
    assert len(attention_pf) == 3 and all(got is want for got, want in zip(attention_pf, a.o_proj.parts))
    assert [(w is want, b, e) for (w, b, e), want in zip(o_pf, (m.gate_proj.weight, m.up_proj.weight))] == [
        (True, 0, 1024), (True, 0, 1024)]
    assert down_pf == []
    assert m.gate_proj.weight.nbytes > 1024  # the range is a part of the weight
    seen.clear()
    with settings.override(prefetch_o=False):  # MLX_QLORA_PREFETCH_O=0
        fused_decode.layer_step(layer, x, StaticKVCache(state.keys[0], state.values[0], state.offset))
    assert seen[0] == []


def _quantized_model_and_eager_steps(steps: int, adapters=None):
    """A 4-bit model with non-default rotary settings, distinct norms and a window of 16, its static decode
    state after a 9-token prompt, and the operation-by-operation logits of ``steps`` greedy steps.
    ``adapters``: (targets, layers) of random LoRA adapters (rank 4, both matrices non-zero) attached."""
    from mlx_qlora.model.modules import quantize_model

    model = _random_model(16, rope_theta=500.0, rope_scaling_factor=2.0)  # non-default rotary settings
    quantize_model(model, bits=4)
    for layer in model.layers:  # norms that differ, so that mixing them up shows
        layer.input_layernorm.weight = 1.0 + 0.3 * mx.random.normal((64,))
        layer.post_attention_layernorm.weight = 1.0 + 0.3 * mx.random.normal((64,))
    if adapters is not None:
        targets, layers = adapters
        params, config = random_adapters(model.args, rank=4, targets=targets, std=0.3)
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets, layers=layers))
        wanted = {k for k, _ in tree_flatten(model.trainable_parameters())}
        model.update(tree_unflatten([(k, v) for k, v in params.items() if k in wanted]))
    model.eval()
    prompt = _PROMPT
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    state = DecodeState.from_caches(cache, len(prompt) + steps)
    tokens, eager = [int(mx.argmax(logits, axis=-1).item())], []
    for _ in range(steps):
        eager.append(model(mx.array([[tokens[-1]]]), cache=cache)[:, -1, :])
        tokens.append(int(mx.argmax(eager[-1], axis=-1).item()))
    return model, state, tokens, mx.stack(eager)


_PROMPT = [5, 7, 11, 13, 17, 19, 23, 29, 31]


def _teacher_forced_logits(model, tokens) -> mx.array:
    """Operation-by-operation logits after ``_PROMPT`` fed ``tokens[:-1]`` one at a time."""
    cache = model.make_cache()
    model(mx.array([_PROMPT]), cache=cache)
    return mx.stack([model(mx.array([[t]]), cache=cache)[:, -1, :] for t in tokens[:-1]])


def _traced_steps(model, state, tokens) -> mx.array:
    """The compiled decoder's function, run without ``mx.compile`` (the stand-in kernels read values)."""
    from mlx_qlora.generate.decode_step import CompiledDecoder

    decoder = CompiledDecoder(model)
    out = []
    for t in tokens[:-1]:
        logits, state.keys, state.values = decoder._forward(mx.array([[t]]), state.offset, state.keys, state.values)
        state.offset = state.offset + 1
        out.append(logits)
    return mx.stack(out)


def test_fused_decode_is_default_and_needs_bare_4bit_layers(monkeypatch):
    from mlx_qlora.model import fused_decode
    from mlx_qlora.model.modules import quantize_model

    model = _random_model(None)
    quantize_model(model, bits=4)
    model.eval()
    layer = model.layers[0]
    cache = StaticKVCache(mx.zeros((1, 2, 256, 16)), mx.zeros((1, 2, 256, 16)), mx.array(3))
    x = mx.zeros((1, 1, 64))
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "supports_shapes", lambda *a: True)
    with settings.override(fused_decode=False):
        assert not fused_decode.applies(layer, x, cache)  # off with MLX_QLORA_FUSED_DECODE=0
    monkeypatch.undo()
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "on_cuda", lambda: True)
    assert settings.KernelSettings().fused_decode  # on by default
    with settings.override(fused_decode=True):  # whatever this process's environment says
        assert fused_decode.applies(layer, x, cache) is False  # head dim 16: the attention kernel needs 32
        monkeypatch.setattr(attention_cuda, "supports_shapes", lambda *a: True)
        assert fused_decode.applies(layer, x, cache)
        assert not fused_decode.applies(layer, mx.zeros((1, 2, 64)), cache)  # two tokens
        assert not fused_decode.applies(layer, x, KVCache(None))  # growing cache
        assert not fused_decode.applies(layer, x, None)  # no cache
        assert not fused_decode.applies(layer, x, cache, position_ids=mx.array([[3]]))  # positions of its own
    _check_adapter_decisions(monkeypatch, lambda layer: fused_decode.applies(layer, x, cache))


def _check_adapter_decisions(monkeypatch, takes):
    """``takes(layer)``: whether a decoder layer's fused path is taken. LoRA over per-row 4-bit bases in
    inference (dropout configured or not: not applied) is; in training, over 4-bit bases with groups or
    over full-precision layers it is not."""
    from mlx_qlora.model.modules import quantize_model

    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "supports_shapes", lambda *a: True)
    with settings.override(fused_decode=True, fused=True):
        model = _random_model(None)
        quantize_model(model, bits=4)
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0, dropout=0.1, targets=("q_proj", "up_proj", "down_proj")))
        model.eval()
        assert takes(model.layers[0])  # a subset of the projections adapted, dropout off in inference
        model.train()
        assert not takes(model.layers[0])  # training: dropout in effect, gradients wanted
        model.eval()
        q = model.layers[0].self_attn.q_proj
        q.dropout.train()  # dropout that would be applied
        assert not takes(model.layers[0])
        q.dropout.eval()
        assert takes(model.layers[0])
        grouped = _random_model(None)
        quantize_model(grouped, bits=4, group_size=32)
        full = _random_model(None)
        for other in (grouped, full):
            apply_lora(other, LoRAConfig(rank=2, alpha=4.0))
            other.eval()
            assert not takes(other.layers[0])
