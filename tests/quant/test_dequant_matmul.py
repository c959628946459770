"""The memory-saving dequantize-matmul (custom VJP) against plain autodiff of ``x @ dequantize(W).T``."""

import numpy as np

import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.quant import QuantizedLinear, dequantize


def test_values_and_input_gradients_equal_the_plain_path():
    mx.random.seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(96, 40, bias=False), bits=4)
    x = mx.random.normal((3, 7, 96))
    g = mx.random.normal((3, 7, 40))
    w = dequantize(layer.weight, layer.scales, layer.biases, 4, None)

    def ours(x):
        return (layer(x) * g).sum()

    def plain(x):
        return ((x @ w.T) * g).sum()

    np.testing.assert_allclose(np.array(layer(x)), np.array(x @ w.T), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(mx.grad(ours)(x)), np.array(mx.grad(plain)(x)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(mx.grad(ours)(x)), np.array(g @ w), rtol=0, atol=1e-5)  # the formula
