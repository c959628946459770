"""Quantize/dequantize round trips, MLX layout compatibility, QuantizedLinear, and a quantized tiny Mistral."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_qlora.quant import QuantizedLinear, dequantize, mlx_group_layout, quantize
from mlx_qlora.model.modules import quantize_model
from mlx_qlora.quant.quantize import unpack

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
LAYOUTS = [(bits, gs) for bits in (2, 4, 8) for gs in (None, 32, 64, 128)]


def _weights(out_features=48, in_features=256, seed=0) -> np.ndarray:
    """Rows of very different ranges, a few outliers, and one constant row."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    w *= np.exp(rng.uniform(-4, 2, size=(out_features, 1))).astype(np.float32)
    w[3, 17] = 40.0
    w[5] += 3.0  # a row far from zero: the bias, not the scale, carries it
    w[7] = -0.75  # constant: scale 0
    return w


def _expand(per_group: np.ndarray, in_features: int) -> np.ndarray:
    return np.repeat(per_group, in_features // per_group.shape[1], axis=1)


@pytest.mark.parametrize("bits,group_size", LAYOUTS)
def test_round_trip_within_half_a_step(bits, group_size):
    w = _weights()
    wq, scales, biases = quantize(mx.array(w), bits, group_size)
    restored = np.array(dequantize(wq, scales, biases, bits, group_size))
    n_groups = 1 if group_size is None else 256 // group_size
    assert wq.dtype == mx.uint32 and wq.shape == (48, 256 * bits // 32)
    assert scales.shape == biases.shape == (48, n_groups)

    step = _expand(np.array(scales), 256)
    group_max = _expand(np.abs(w).reshape(48, n_groups, -1).max(-1), 256)
    # Float32 slack: (w - b) / s, the rounding, s * q and + b are four float32 operations on values no
    # larger than the group's max |w| (times at most 2); 8 eps of that bounds them with room to spare and
    # is ~1e-6 of a step for every row here.
    error = np.abs(restored - w)
    assert np.all(error <= 0.5 * step + 8 * EPS32 * group_max)
    assert np.all(restored[7] == -0.75)  # a constant row comes back exactly
    # the bound is tight: some weight sits almost exactly half a step away
    assert (error / np.maximum(step, 1e-30)).max() > 0.45


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 64), (2, 32), (8, 128)])
def test_integers_match_a_float64_reference(bits, group_size):
    """The packed integers are round((w - min) / ((max - min) / levels)) computed independently in float64."""
    w = _weights(seed=1)
    wq, _, _ = quantize(mx.array(w), bits, group_size)
    q = np.array(unpack(wq, bits)).reshape(48, -1 if group_size is None else 256 // group_size, group_size or 256)
    g = w.astype(np.float64).reshape(q.shape)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = (hi - lo) / (2**bits - 1)
    t = np.divide(g - lo, scale, out=np.zeros_like(g), where=scale > 0)
    ref = np.clip(np.round(t), 0, 2**bits - 1)
    near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4  # float32 may round a near-tie the other way
    assert np.all((q == ref) | near_tie)
    assert near_tie.mean() < 1e-3


def test_packing_order_first_input_in_lowest_bits():
    # q[i] = i % 16 along the input axis: word 0 holds 0..7, word 1 holds 8..15, first in the lowest nibble.
    w = np.tile(np.arange(32, dtype=np.float32) % 16, (2, 1))
    w[:, 0] = 0.0
    w[:, 15] = 15.0
    wq, scales, biases = quantize(mx.array(w), 4)
    assert np.array(scales).ravel().tolist() == [1.0, 1.0] and np.array(biases).ravel().tolist() == [0.0, 0.0]
    expected = [sum(j << (4 * j) for j in range(8)), sum((8 + j) << (4 * j) for j in range(8))]
    assert np.array(wq)[0].tolist() == expected * 2


@pytest.mark.parametrize("bits,group_size", LAYOUTS)
def test_mlx_kernels_read_our_layout(bits, group_size):
    """mx.dequantize / mx.quantized_matmul on the expanded layout equal our dequantize."""
    w = _weights(out_features=64, seed=2)
    wq, scales, biases = quantize(mx.array(w), bits, group_size)
    ours = dequantize(wq, scales, biases, bits, group_size)
    s, b, mlx_size = mlx_group_layout(scales, biases, 256, group_size)
    assert mlx_size == (group_size or 64)  # per-row layers expand to group 64 (see MLX_GROUP_SIZES)
    assert mx.array_equal(mx.dequantize(wq, s, b, group_size=mlx_size, bits=bits), ours)
    x = mx.random.normal((3, 256), key=mx.random.key(0))
    qmm = np.array(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=mlx_size, bits=bits))
    ref = np.array(x).astype(np.float64) @ np.array(ours).astype(np.float64).T
    assert np.allclose(qmm, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_we_read_mlx_quantize_output(group_size):
    """The converse: words, scales and biases made by mx.quantize dequantize identically with our code."""
    w = mx.array(_weights(seed=3))
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=4)
    assert mx.array_equal(dequantize(wq, scales, biases, 4, group_size), mx.dequantize(wq, scales, biases, group_size, 4))


def test_float16_scales_bound():
    """Rounded float16 scales/biases add at most 2^-11 of |lo| + 15 s to the half-step bound."""
    w = _weights(seed=4)
    wq, scales, biases = quantize(mx.array(w), 4, None, dtype=mx.float16)
    assert scales.dtype == biases.dtype == mx.float16
    restored = np.array(dequantize(wq, scales, biases, 4, None, dtype=mx.float32))
    s16 = np.array(scales.astype(mx.float32))
    lo = w.min(1, keepdims=True)
    bound = 0.5 * s16 + 2.0**-11 * (np.abs(lo) + 15 * s16) + 8 * EPS32 * np.abs(w).max(1, keepdims=True)
    assert np.all(np.abs(restored - w) <= bound)


def test_invalid_layouts_raise():
    w = mx.zeros((4, 96))
    with pytest.raises(ValueError, match="bits"):
        quantize(w, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize(w, group_size=48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(w, group_size=64)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(mx.zeros((4, 20)))
    assert mlx_group_layout(mx.zeros((4, 1)), mx.zeros((4, 1)), 40) is None  # 40 inputs: no MLX group size


def test_quantized_linear_forward_paths_and_freezing():
    mx.random.seed(0)
    linear = nn.Linear(256, 96, bias=False)
    layer = QuantizedLinear.from_linear(linear)
    w = np.array(layer.dequantize()).astype(np.float64)
    assert layer.trainable_parameters() == {}
    layer.unfreeze()
    assert layer.trainable_parameters() == {}

    x_many = mx.random.normal((2, 7, 256))  # 14 rows: dequantize + matmul
    x_one = mx.random.normal((1, 1, 256))  # 1 row: quantized_matmul
    for x in (x_many, x_one):
        y = np.array(layer(x))
        ref = np.array(x).astype(np.float64) @ w.T
        assert y.shape == ref.shape and y.dtype == np.float32
        assert np.allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # error against the full-precision layer is the quantization error, bounded per row by
    # sum_i |x_i| * s_row / 2 (each weight is within half a step)
    full = np.array(linear(x_many)).astype(np.float64)
    half_steps = 0.5 * np.array(layer.scales)[:, 0]
    bound = np.abs(np.array(x_many)).sum(-1, keepdims=True) * half_steps
    assert np.all(np.abs(np.array(layer(x_many)) - full) <= bound * (1 + 1e-4))

    y16 = layer(x_many.astype(mx.float16))
    assert y16.dtype == mx.float16
    assert "bits=4, per-row" in repr(layer) and "group_size=64" in repr(QuantizedLinear(128, 8, group_size=64))


def test_quantized_linear_loads_by_name():
    """An empty layer made from shapes only is filled by name, as a checkpoint loader does."""
    w = mx.array(_weights(out_features=16, in_features=128, seed=5))
    wq, scales, biases = quantize(w, 4, 32, dtype=mx.float16)
    layer = QuantizedLinear(128, 16, bits=4, group_size=32, dtype=mx.float16)
    shapes = {k: v.shape for k, v in tree_flatten(layer.parameters())}
    assert shapes == {"weight": (16, 16), "scales": (16, 4), "biases": (16, 4)}
    layer.load_weights([("weight", wq), ("scales", scales), ("biases", biases)])
    assert mx.array_equal(layer.dequantize(), dequantize(wq, scales, biases, 4, 32))


def _tiny_logits(model, ids):
    return np.array(model(mx.array(ids)).astype(mx.float32)).astype(np.float64)


def test_quantized_tiny_mistral_logits(tiny_hf_checkpoint):
    """A quantized tiny Mistral runs its dequantized weights exactly (against transformers) and stays close
    to the full-precision model.

    Bound: rounding Gaussian weights to 15 steps over a row's range (about 5 standard deviations for
    64-160 weights) leaves an RMS error near 5 / 15 / sqrt(12) ~ 0.1 of the weights' scale, so each
    projection's output is about 10% off; measured relative logits errors are 0.12 per-row and 0.09 with
    group 32. The test allows 0.2 per-row and requires group 32 to be at least as good.
    """
    import torch
    import transformers

    from mlx_qlora.model import load_model

    ids = np.random.default_rng(0).integers(0, 320, size=(2, 24))
    full = load_model(tiny_hf_checkpoint)
    ref = _tiny_logits(full, ids)
    errors = {}
    for group_size in (None, 32):
        model = quantize_model(load_model(tiny_hf_checkpoint), bits=4, group_size=group_size)
        assert sum(isinstance(m, QuantizedLinear) for _, m in model.named_modules()) == 2 * 7
        logits = _tiny_logits(model, ids)
        errors[group_size] = np.linalg.norm(logits - ref) / np.linalg.norm(ref)

        # the same numbers in transformers: load the dequantized weights into the reference model
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint, torch_dtype=torch.float32)
        hf.config._attn_implementation = "eager"
        state = hf.state_dict()
        for path, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                state[f"{path}.weight"] = torch.from_numpy(np.array(module.dequantize(mx.float32)))
        hf.load_state_dict(state)
        with torch.no_grad():
            hf_logits = hf(torch.from_numpy(ids)).logits.double().numpy()
        assert np.abs(logits - hf_logits).max() <= 1e-4 * np.abs(hf_logits).max()
    assert errors[None] < 0.2
    assert errors[32] <= errors[None]
