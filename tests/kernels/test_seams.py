"""The seams where the fast paths plug in (``docs/ARCHITECTURE.md``): ``quant/matmul.py`` picks the path of a
4-bit matmul and fuses q/k/v and gate/up, ``quant/dequant.py`` picks the dequantization. Off CUDA the plain
paths run; with CUDA pretended (``on_cuda``) the kernels are replaced by the formulas they implement, so
that the wiring (which kernel, which arguments, which output shapes) is checked against the plain path."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qlora import settings
from mlx_qlora.kernels.cuda import dequant as dequant_cuda
from mlx_qlora.kernels.cuda import qmv as qmv_cuda
from mlx_qlora.quant import QuantizedLinear, matmul
from mlx_qlora.quant.dequant import dequantize_weight
from mlx_qlora.quant.quantize import dequantize


def _layer(out_f: int, in_f: int, seed: int, group_size=None) -> QuantizedLinear:
    mx.random.seed(seed)
    layer = QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), group_size=group_size)
    mx.eval(layer.parameters())
    return layer.eval()


def test_the_path_of_one_layer(monkeypatch):
    layer = _layer(48, 64, 0)
    # the CPU: quantized_matmul up to 4 rows, then dequantize + matmul
    assert [matmul.path(layer, rows, mx.float32) for rows in (1, 4, 5, 512)] == [
        "quantized_matmul", "quantized_matmul", "dense", "dense"]
    assert matmul.path(_layer(48, 72, 0), 1, mx.float32) == "dense"  # no MLX group size divides 72 inputs
    assert layer.takes_dense(mx.zeros((2, 3, 64))) and not layer.takes_dense(mx.zeros((1, 64)))
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    with settings.override(qmv_min_weights=0):  # our kernel for any layer size
        assert matmul.path(layer, 1, mx.bfloat16) == "qmv"
        assert matmul.path(layer, 9, mx.bfloat16) == "dense"  # more rows than the kernel takes
        assert matmul.path(_layer(48, 64, 0, group_size=32), 1, mx.bfloat16) == "quantized_matmul"  # grouped
        with settings.override(qmv=False):  # MLX_QLORA_QMV=mlx
            assert matmul.path(layer, 1, mx.bfloat16) == "quantized_matmul"
    assert matmul.path(layer, 1, mx.bfloat16) == "quantized_matmul"  # 3,072 weights: below qmv_min_weights


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_a_layer_call_equals_the_dequantized_matmul(rows):
    """Whatever the path (quantized_matmul up to 4 rows on the CPU, dense above), float32, 1e-5."""
    layer = _layer(40, 128, rows)
    x = mx.random.normal((rows, 128))
    want = np.array(x, dtype=np.float64) @ np.array(layer.dequantize(mx.float32), dtype=np.float64).T
    np.testing.assert_allclose(np.array(layer(x)), want, rtol=1e-5, atol=1e-5)


def _reference_split(x, weights, shapes=None):
    """``qmv_split`` by its formula, honouring ``shapes`` as the kernel does (row-major order)."""
    lead = x.shape[:-1]
    outs = [qmv_cuda.reference(x.reshape(-1, x.shape[-1]), *w).astype(x.dtype) for w in weights]
    shapes = shapes or [(*lead, w[0].shape[0]) for w in weights]
    return [o.reshape(s) for o, s in zip(outs, shapes)]


def _reference_swiglu(x, gate, up):
    y = qmv_cuda.reference_swiglu(x.reshape(-1, x.shape[-1]), gate, up).astype(x.dtype)
    return y.reshape(*x.shape[:-1], gate[0].shape[0])


@pytest.mark.parametrize("B,L", [(2, 1), (1, 4), (1, 9)])
def test_projections_into_heads_equal_the_layers_one_by_one(monkeypatch, B, L):
    """``project`` with and without the fused launch (replaced by its formula): the same q, k and v in the
    heads' layout (B, n, L, hd). One token per sequence: the launch writes that layout; 4 rows: split
    after the launch; 9 rows: too many for the kernel, one call per layer."""
    layers = [_layer(n, 64, 10 + i) for i, n in enumerate((64, 32, 32))]
    x = mx.random.normal((B, L, 64))
    heads = (4, 2, 2)
    plain = matmul.project(layers, x, heads)  # the CPU: never fused
    calls = []
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(qmv_cuda, "qmv_split", lambda *a, addends=None: calls.append(a[2:]) or _reference_split(*a))
    fused = matmul.project(layers, x, heads)
    assert len(calls) == (0 if B * L > 8 else 1)
    if calls:
        assert calls[0] == (([(B, 4, 1, 16), (B, 2, 1, 16), (B, 2, 1, 16)],) if L == 1 else ())
    for got, want, n in zip(fused, plain, heads):
        assert got.shape == want.shape == (B, n, L, 16)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    assert [y.shape for y in matmul.project(layers, x)] == [(B, L, 64), (B, L, 32), (B, L, 32)]  # no heads


def test_swiglu_equals_the_layers_one_by_one(monkeypatch):
    gate, up = _layer(96, 64, 1), _layer(96, 64, 2)
    x = mx.random.normal((1, 1, 64))
    plain = matmul.swiglu(gate, up, x)
    want = nn.silu(gate(x)) * up(x)
    assert mx.array_equal(plain, want)  # off CUDA: the plain formula itself
    calls = []
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(qmv_cuda, "qmv_swiglu", lambda *a, addends=None: calls.append(1) or _reference_swiglu(*a))
    fused = matmul.swiglu(gate, up, x)
    assert calls == [1] and fused.shape == (1, 1, 96)
    np.testing.assert_allclose(np.array(fused), np.array(want), rtol=1e-4, atol=1e-4)
    with settings.override(fused=False):  # MLX_QLORA_FUSED=0: one call per layer
        assert mx.array_equal(matmul.swiglu(gate, up, x), want) and calls == [1]


def test_full_precision_layers_take_the_plain_path():
    mx.random.seed(0)
    layers = [nn.Linear(64, n, bias=False) for n in (64, 32, 32)]
    x = mx.random.normal((1, 1, 64))
    q, k, v = matmul.project(layers, x, (4, 2, 2))
    assert mx.array_equal(q, layers[0](x).reshape(1, 1, 4, 16).transpose(0, 2, 1, 3))
    assert mx.array_equal(matmul.swiglu(layers[1], layers[2], x), nn.silu(layers[1](x)) * layers[2](x))


def test_the_dequantization_path(monkeypatch):
    layer = _layer(24, 64, 3)
    args = (layer.weight, layer.scales, layer.biases, 4, None)
    exact = dequantize(*args, dtype=mx.float32)
    assert mx.array_equal(dequantize_weight(*args, mx.float32), exact)  # the CPU: our formula
    assert mx.array_equal(dequantize_weight(*args, mx.bfloat16), exact.astype(mx.bfloat16))  # via float32
    calls = []
    monkeypatch.setattr(dequant_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(dequant_cuda, "dequantize", lambda wq, s, b, dtype: calls.append(dtype) or exact.astype(dtype))
    assert mx.array_equal(dequantize_weight(*args, mx.bfloat16), exact.astype(mx.bfloat16))
    assert calls == [mx.bfloat16]  # CUDA: our kernel
    with settings.override(dequant=False):  # MLX_QLORA_DEQUANT=mlx: not our kernel
        dequantize_weight(*args, mx.float32)
    grouped = _layer(24, 64, 3, group_size=32)
    dequantize_weight(grouped.weight, grouped.scales, grouped.biases, 4, 32, mx.bfloat16)
    assert calls == [mx.bfloat16]  # grouped weights: never our kernel


def test_the_expanded_layout_follows_the_group_size_setting():
    """``quantized_matmul`` reads per-row scales expanded to MLX's groups, cached per layer: 64 by default,
    another size under ``expand_group`` (MLX_QLORA_EXPAND_GROUP), and the same result."""
    layer = _layer(40, 256, 7)
    x = mx.random.normal((1, 256))
    assert layer.mlx_layout(mx.float32)[2] == 64 and layer.mlx_layout(mx.float32)[0].shape == (40, 4)
    want = layer(x)
    with settings.override(expand_group=128):
        scales, _, group = layer.mlx_layout(mx.float32)
        assert group == 128 and scales.shape == (40, 2)
        np.testing.assert_allclose(np.array(layer(x)), np.array(want), rtol=1e-5, atol=1e-5)
    assert layer.mlx_layout(mx.float32)[2] == 64
