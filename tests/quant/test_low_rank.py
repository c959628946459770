"""``quant/low_rank.py``: a LoRA layer as the fused kernels take it (a bare per-row 4-bit base and its
update beside the launch), against the LoRA layer's own call."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_qlora.lora import LoRALinear
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.model.layers import RMSNorm
from mlx_qlora.quant.low_rank import Stacked, Terms, fused_form


def _lora(out_f=48, in_f=64, group_size=None, seed=0) -> LoRALinear:
    mx.random.seed(seed)
    layer = LoRALinear.from_base(QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False),
                                                             group_size=group_size), rank=4, alpha=12.0)
    layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape)  # a trained, non-zero update
    return layer.eval()


def test_base_plus_the_update_is_the_lora_layer():
    """``base(x) + F * addend`` and ``plus(residual, x)`` + base equal ``residual + layer(x)`` (float32, 1e-5),
    with F the layer's scale."""
    layer = _lora()
    base, low_rank = fused_form(layer)
    assert base is layer.base and low_rank[2] == layer.scale == 3.0
    x, residual = mx.random.normal((3, 1, 64)), mx.random.normal((3, 1, 48))
    stack = Stacked([low_rank], mx.float32)
    (factor, addend), = stack.addends(x)
    assert addend.shape == (3, 48) and factor == 3.0
    want = layer(x)
    np.testing.assert_allclose(np.array(base(x) + factor * addend.reshape(3, 1, 48)), np.array(want), atol=1e-5)
    np.testing.assert_allclose(np.array(stack.plus(residual, x) + base(x)), np.array(residual + want), atol=1e-5)
    assert float(mx.abs(want - base(x)).max()) > 1e-2  # the update is not negligible


def test_stacked_updates_equal_each_projections_update():
    """Three projections of one input, the middle one not adapted, ranks 4 and 2 and different scales: one
    stacked pair of matmuls gives each adapted projection ``scale * (x @ A.T) @ B.T`` (the formula, 1e-5)
    and None for the other; A is (in, 4 + 2), B block-diagonal (6, 48 + 40) with zeros off its blocks."""
    mx.random.seed(1)
    q = (mx.random.normal((4, 64)), mx.random.normal((48, 4)), 3.0)
    v = (mx.random.normal((2, 64)), mx.random.normal((40, 2)), 0.5)
    stack = Stacked([q, None, v], mx.float32)
    assert stack.a_t.shape == (64, 6) and stack.b_t.shape == (6, 88)
    assert float(mx.abs(stack.b_t[:4, 48:]).max()) == 0 and float(mx.abs(stack.b_t[4:, :48]).max()) == 0
    x = mx.random.normal((2, 1, 64))
    got = stack.addends(x)
    assert got[1] is None
    for (factor, addend), (a, b, scale) in zip((got[0], got[2]), (q, v)):
        assert factor == scale
        want = (x.reshape(2, 64) @ a.T) @ b.T
        np.testing.assert_allclose(np.array(addend), np.array(want), rtol=1e-5, atol=1e-4)
    assert Stacked.build([None, None], mx.float32) is None


def test_a_stack_holds_only_the_arrays_it_was_built_from():
    """``holds``: the same adapter objects, scales and dtype; a replaced array (as an optimizer step
    replaces it), another scale or dtype, or another set of adapted projections is not held."""
    a, b = mx.ones((2, 8)), mx.ones((6, 2))
    stack = Stacked([(a, b, 2.0), None], mx.float16)
    assert stack.holds([(a, b, 2.0), None], mx.float16)
    assert not stack.holds([(a, mx.ones((6, 2)), 2.0), None], mx.float16)
    assert not stack.holds([(a, b, 1.0), None], mx.float16)
    assert not stack.holds([(a, b, 2.0), None], mx.float32)
    assert not stack.holds([(a, b, 2.0), (a, b, 2.0)], mx.float16)
    assert stack.a_t.dtype == stack.b_t.dtype == mx.float16


def test_prepared_decoding_is_the_layer_until_its_adapters_change():
    """``LoRALinear.prepare_decoding``: the layer's output is unchanged (1e-5) and comes from the prepared
    stack; once lora_B is replaced the stale stack is not used and the output follows the new B."""
    layer = _lora()
    x = mx.random.normal((1, 1, 64))
    before = layer(x)
    layer.prepare_decoding(mx.float32)
    assert layer.decoding_stack(mx.float32) is layer.__dict__["_decoding"]
    np.testing.assert_allclose(np.array(layer(x)), np.array(before), atol=1e-5)
    layer.lora_B = 2 * layer.lora_B
    assert layer.decoding_stack(mx.float32) is not layer.__dict__["_decoding"]
    want = layer.base(x) + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T
    np.testing.assert_allclose(np.array(layer(x)), np.array(want), atol=1e-5)
    assert float(mx.abs(layer(x) - before).max()) > 1e-2


def test_which_layers_have_a_fused_form():
    layer = _lora()
    assert fused_form(layer.base) == (layer.base, None)  # a bare per-row 4-bit layer
    layer.train()
    assert fused_form(layer) is None  # training: dropout and gradients
    assert fused_form(_lora(group_size=32)) is None  # 4-bit with groups
    full = LoRALinear.from_base(nn.Linear(64, 48, bias=False), rank=4).eval()
    assert fused_form(full) is None and fused_form(nn.Linear(64, 48)) is None  # full precision


def test_terms_through_the_norm_weight_are_each_projections_update_of_the_normed_input():
    """``Terms`` of three projections of one normed input (the middle one not adapted, ranks 4 and 2): the
    A-products of the raw input, h = x @ (A * gamma).T, with each B times the row's 1/rms (what the kernel
    applies), are ``scale * (norm(x) @ A.T) @ B.T`` of the RMSNorm module's output (float32, 1e-4); without
    gamma, A is the adapters' own."""
    mx.random.seed(2)
    q = (mx.random.normal((4, 64)), mx.random.normal((48, 4)), 3.0)
    v = (mx.random.normal((2, 64)), mx.random.normal((40, 2)), 0.5)
    norm = RMSNorm(64, eps=1e-5)
    norm.weight = 1.0 + 0.2 * mx.random.normal((64,))
    x = 3.0 * mx.random.normal((2, 1, 64))
    terms = Terms([q, None, v], mx.float32, norm.weight)
    h, per = x.reshape(2, 64) @ terms.a.T, terms.terms  # what ``qmv.a_products`` (or the launch before) computes
    assert mx.array_equal(terms.a_t, terms.a.T)
    assert h.shape == (2, 6) and per[1] is None and [t[1] for t in (per[0], per[2])] == [0, 4]
    inv_rms = mx.rsqrt(mx.mean(x.reshape(2, 64) ** 2, axis=-1, keepdims=True) + 1e-5)  # (2, 1)
    n = norm(x).reshape(2, 64)
    for (factor, first, b), (a, b_want, scale) in zip((per[0], per[2]), (q, v)):
        assert factor == scale and b is not None and b.shape == b_want.shape
        got = factor * inv_rms * (h[:, first:first + a.shape[0]] @ b.T)
        want = scale * (n @ a.T) @ b_want.T
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    plain = Terms([q, None, v], mx.float32).a  # (R, in)
    np.testing.assert_allclose(np.array(plain[:4]), np.array(q[0]), rtol=0, atol=0)
    assert Terms.build([None, None], mx.float32) is None


def test_terms_hold_only_the_arrays_and_norm_weight_they_were_built_from():
    """``Terms.holds``: the same adapter objects, scales, dtype and norm weight; another norm weight (or none)
    is not held."""
    a, b, gamma = mx.ones((2, 8)), mx.ones((6, 2)), mx.ones((8,))
    terms = Terms([(a, b, 2.0)], mx.bfloat16, gamma)
    assert terms.holds([(a, b, 2.0)], mx.bfloat16, gamma)
    assert not terms.holds([(a, b, 2.0)], mx.bfloat16, mx.ones((8,)))
    assert not terms.holds([(a, b, 2.0)], mx.bfloat16)
    assert not terms.holds([(a, mx.ones((6, 2)), 2.0)], mx.bfloat16, gamma)
    assert not terms.holds([(a, b, 2.0)], mx.float32, gamma)
    assert all(arr.dtype == mx.bfloat16 for arr in terms.arrays)
