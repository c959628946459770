"""The one LoRA scale and delta formula against PEFT's LoraLayer: ``scaling`` for r / alpha with and without
rsLoRA (exact), ``get_delta_weight`` and a merged layer's weight (float32, 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.config import LoRAConfig, lora_scale
from mlx_qlora.lora import LoRALinear, lora_delta, merge_weight

IN, OUT = 24, 10


def _peft_layer(rank: int, alpha: float, use_rslora: bool):
    import torch
    from peft.tuners.lora import Linear, LoraConfig

    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora)
    return Linear(torch.nn.Linear(IN, OUT, bias=False), "default", config=config, r=rank, lora_alpha=alpha)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (3, 7.0), (8, 16.0), (16, 32.0), (5, 2.5), (64, 8.0)])
def test_scale_equals_peft_scaling(rank, alpha, use_rslora):
    expected = _peft_layer(rank, alpha, use_rslora).scaling["default"]
    assert lora_scale(alpha, rank, use_rslora) == expected
    assert LoRAConfig(rank=rank, alpha=alpha, use_rslora=use_rslora).scale == expected
    assert LoRALinear(nn.Linear(IN, OUT), rank=rank, alpha=alpha, use_rslora=use_rslora).scale == expected


@pytest.mark.parametrize("use_rslora", [False, True])
def test_delta_and_merged_weight_equal_peft(use_rslora):
    import torch

    rank, alpha = 4, 6.0
    peft_layer = _peft_layer(rank, alpha, use_rslora)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((rank, IN)).astype(np.float32)
    b = rng.standard_normal((OUT, rank)).astype(np.float32)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
        peft_layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    w = peft_layer.base_layer.weight.detach().numpy().copy()
    scale = lora_scale(alpha, rank, use_rslora)

    reference_delta = peft_layer.get_delta_weight("default").detach().numpy()
    np.testing.assert_allclose(np.array(lora_delta(mx.array(a), mx.array(b), scale)), reference_delta, atol=1e-6)

    peft_layer.merge()
    merged = peft_layer.base_layer.weight.detach().numpy()
    np.testing.assert_allclose(np.array(merge_weight(mx.array(w), mx.array(a), mx.array(b), scale)), merged, atol=1e-6)

    ours = LoRALinear(nn.Linear(IN, OUT, bias=False), rank=rank, alpha=alpha, use_rslora=use_rslora)
    ours.base.weight, ours.lora_A, ours.lora_B = mx.array(w), mx.array(a), mx.array(b)
    np.testing.assert_allclose(np.array(ours.fuse().weight), merged, atol=1e-6)
