"""``QuantizedLinear`` with a linear bias (Qwen2's q/k/v): the bias kept un-quantized and added after the
matmul on every path, and the fused CUDA paths refusing the layer (they read only the 4-bit parts)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.quant import matmul
from mlx_qlora.quant.quantized_linear import QuantizedLinear


def _layer(bias=True, seed=0):
    mx.random.seed(seed)
    linear = nn.Linear(64, 48, bias=bias)
    if bias:
        linear.bias = mx.random.normal((48,))
    return linear, QuantizedLinear.from_linear(linear, bits=4)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_bias_is_added_on_every_path(rows):
    """1 and 3 rows take ``mx.quantized_matmul`` on the CPU, 40 dequantize + matmul: all equal
    ``x @ dequantize(W).T + b`` to float32 rounding."""
    linear, layer = _layer()
    layer.eval()
    x = mx.random.normal((rows, 64))
    expected = np.array(x) @ np.array(layer.dequantize(mx.float32)).T + np.array(linear.bias)
    np.testing.assert_allclose(np.array(layer(x)), expected, atol=1e-4, rtol=0)
    assert layer.bias.dtype == mx.float32 and "bias" in dict(layer.parameters())


def test_bias_is_frozen_and_round_trips_by_name():
    _, layer = _layer()
    assert "bias" not in dict(layer.trainable_parameters())
    layer.unfreeze()
    assert "bias" not in dict(layer.trainable_parameters())
    empty = QuantizedLinear(64, 48, bias=True)
    empty.load_weights(list(layer.parameters().items()))
    x = mx.random.normal((5, 64))
    np.testing.assert_array_equal(np.array(empty(x)), np.array(layer(x)))


def test_fused_paths_refuse_a_biased_layer(monkeypatch):
    """With CUDA stood in for, bare layers fuse (q/k/v in one launch) and biased ones do not."""
    from mlx_qlora.kernels.cuda import qmv as qmv_cuda

    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    x = mx.zeros((1, 1, 64), dtype=mx.bfloat16)
    bare = [_layer(bias=False, seed=s)[1] for s in range(3)]
    biased = [_layer(bias=True, seed=s)[1] for s in range(3)]
    for layer in bare + biased:
        layer.eval()
    assert matmul.fuses(bare, x)
    assert not matmul.fuses(biased, x)
    assert not biased[0].runs_bare_per_row_4bit and bare[0].runs_bare_per_row_4bit
