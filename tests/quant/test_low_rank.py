"""``quant/low_rank.py``: a LoRA layer as the fused kernels take it (a bare per-row 4-bit base and its
update beside the launch), against the LoRA layer's own call."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_qlora.lora import LoRALinear
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.quant.low_rank import fused_form, low_rank_addend, plus_low_rank


def _lora(out_f=48, in_f=64, group_size=None, seed=0) -> LoRALinear:
    mx.random.seed(seed)
    layer = LoRALinear.from_base(QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False),
                                                             group_size=group_size), rank=4, alpha=12.0)
    layer.lora_B = 0.1 * mx.random.normal(layer.lora_B.shape)  # a trained, non-zero update
    return layer.eval()


def test_base_plus_the_update_is_the_lora_layer():
    """``base(x) + F * addend`` and ``plus_low_rank(residual, x)`` + base equal ``residual + layer(x)``
    (float32, 1e-5), with F the layer's scale."""
    layer = _lora()
    base, low_rank = fused_form(layer)
    assert base is layer.base and low_rank[2] == layer.scale == 3.0
    x, residual = mx.random.normal((3, 1, 64)), mx.random.normal((3, 1, 48))
    factor, addend = low_rank_addend(x, low_rank)
    assert addend.shape == (3, 48)
    want = layer(x)
    np.testing.assert_allclose(np.array(base(x) + factor * addend.reshape(3, 1, 48)), np.array(want), atol=1e-5)
    np.testing.assert_allclose(np.array(plus_low_rank(residual, x, low_rank) + base(x)), np.array(residual + want),
                               atol=1e-5)
    assert float(mx.abs(want - base(x)).max()) > 1e-2  # the update is not negligible


def test_which_layers_have_a_fused_form():
    layer = _lora()
    assert fused_form(layer.base) == (layer.base, None)  # a bare per-row 4-bit layer
    assert low_rank_addend(mx.zeros((1, 64)), None) is None
    residual = mx.ones((1, 48))
    assert plus_low_rank(residual, mx.zeros((1, 64)), None) is residual
    layer.train()
    assert fused_form(layer) is None  # training: dropout and gradients
    assert fused_form(_lora(group_size=32)) is None  # 4-bit with groups
    full = LoRALinear.from_base(nn.Linear(64, 48, bias=False), rank=4).eval()
    assert fused_form(full) is None and fused_form(nn.Linear(64, 48)) is None  # full precision
