"""The range search (``rounding.py``) and GPTQ (``gptq.py``): invariants against plain min/max rounding and a
float64 reference of GPTQ's update."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)

import mlx.core as mx

from mlx_qlora.quant import dequantize, quantize
from mlx_qlora.quant.gptq import damped, gptq_quantize, refit_rows
from mlx_qlora.quant.quantize import unpack
from mlx_qlora.quant.rounding import importance


def _weights(out_features=64, in_features=256, seed=0) -> np.ndarray:
    """Rows of different ranges with a few outliers (what stretches a min/max range), one constant row."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    w *= np.exp(rng.uniform(-3, 1, size=(out_features, 1))).astype(np.float32)
    w[rng.integers(0, out_features, 12), rng.integers(0, in_features, 12)] *= 8.0
    w[5] = -0.5
    return w


def _group_errors(w, wq, scales, biases, bits, group_size):
    """The search's objective, importance-weighted squared error, per group (out, n_groups)."""
    out_features, in_features = w.shape
    groups = mx.array(w).reshape(out_features, -1, group_size or in_features)
    restored = dequantize(wq, scales, biases, bits, group_size, dtype=mx.float32).reshape(groups.shape)
    diff = restored - groups
    return np.array(mx.sum(importance(groups, per_row=group_size is None) * diff * diff, axis=-1))


@pytest.mark.parametrize("bits,group_size,dtype", [(4, None, mx.float16), (4, 64, mx.float16),
                                                   (4, 32, mx.float32), (2, None, mx.bfloat16)])
def test_search_never_worse_than_nearest_per_group(bits, group_size, dtype):
    w = _weights()
    near = quantize(mx.array(w), bits, group_size, dtype=dtype)
    searched = quantize(mx.array(w), bits, group_size, dtype=dtype, rounding="search")
    e_near = _group_errors(w, *near, bits, group_size)
    e_search = _group_errors(w, *searched, bits, group_size)
    # the choice is made on exactly these stored values; 1e-6 relative covers float32 summation order
    assert np.all(e_search <= e_near * (1 + 1e-6) + 1e-30)
    assert e_search.sum() < 0.95 * e_near.sum()  # and a real improvement overall
    assert np.array_equal(np.array(dequantize(*searched, bits, group_size, dtype=mx.float32))[5], np.full(256, -0.5, np.float32))


def test_column_weights_steer_the_per_row_search():
    """Per row with a norm's weights: the search's objective (importance x |gamma|**0.5 per column) is never
    above min/max's for any row, and the columns with a large gamma end with a lower squared error than
    the same search without column weights gives them (the search traded error towards the others)."""
    from mlx_qlora.quant.rounding import column_importance

    w = _weights()
    rng = np.random.default_rng(3)
    gamma = np.where(rng.random(256) < 0.1, 8.0, 0.2).astype(np.float32)
    col = column_importance(mx.array(gamma))
    assert col.shape == (256,) and abs(float(mx.mean(col)) - 1) < 1e-6
    groups = mx.array(w).reshape(64, 1, 256)
    weights = importance(groups, per_row=True) * col.reshape(1, 1, -1)
    near = quantize(mx.array(w), 4, None, dtype=mx.float16)
    steered = quantize(mx.array(w), 4, None, dtype=mx.float16, rounding="search", column_weights=mx.array(gamma))
    plain = quantize(mx.array(w), 4, None, dtype=mx.float16, rounding="search")

    def errors(triple):
        d = np.array(dequantize(*triple, 4, None, dtype=mx.float32)) - w  # (64, 256)
        return np.array(mx.sum(weights.reshape(64, 256) * mx.array(d * d), axis=-1)), d

    (e_near, _), (e_steered, d_steered), (_, d_plain) = errors(near), errors(steered), errors(plain)
    assert np.all(e_steered <= e_near * (1 + 1e-6) + 1e-30)
    heavy = gamma > 1
    assert (d_steered[:, heavy] ** 2).sum() < (d_plain[:, heavy] ** 2).sum()
    grouped = quantize(mx.array(w), 4, 64, dtype=mx.float16, rounding="search", column_weights=mx.array(gamma))
    assert all(mx.array_equal(a, b) for a, b in zip(grouped, quantize(mx.array(w), 4, 64, dtype=mx.float16,
                                                                       rounding="search")))  # groups: not used


def test_search_codes_are_nearest_for_the_stored_range():
    """The stored integers are the nearest ones for the stored scale and bias (what loading assumes)."""
    w = _weights(seed=2)
    wq, scales, biases = quantize(mx.array(w), 4, 64, dtype=mx.float32, rounding="search")
    q = np.array(unpack(wq, 4)).reshape(64, 4, 64).astype(np.float64)
    s, b = np.array(scales)[..., None].astype(np.float64), np.array(biases)[..., None].astype(np.float64)
    g = w.reshape(64, 4, 64).astype(np.float64)
    t = np.divide(g - b, s, out=np.zeros_like(g), where=s > 0)
    ref = np.clip(np.round(t), 0, 15)
    near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4
    assert np.all((q == ref) | near_tie)


def test_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding"):
        quantize(mx.zeros((4, 32)), 4, None, rounding="magic")


def _correlated_inputs(n=512, in_features=128, seed=0) -> np.ndarray:
    """Inputs with correlated channels and a few large ones, as real activations have."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((in_features, in_features)) / np.sqrt(in_features)
    x = rng.standard_normal((n, in_features)) @ (np.eye(in_features) + 2.0 * mix)
    x[:, :4] *= 6.0
    return x.astype(np.float32)


@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_output_error_not_above_search(group_size):
    x = _correlated_inputs()
    w = _weights(out_features=48, in_features=128, seed=3)
    hessian = x.T.astype(np.float64) @ x
    ref = x @ w.T

    def output_error(triple):
        restored = np.array(dequantize(*triple, 4, group_size, dtype=mx.float32))
        return np.linalg.norm(x @ restored.T - ref) / np.linalg.norm(ref)

    searched = output_error(quantize(mx.array(w), 4, group_size, dtype=mx.float32, rounding="search"))
    gptq = output_error(gptq_quantize(mx.array(w), hessian, 4, group_size, dtype=mx.float32, rounding="search"))
    assert gptq < 0.8 * searched
    if group_size is None:  # act order (the default per row) against the columns' order
        in_order = output_error(gptq_quantize(mx.array(w), hessian, 4, None, dtype=mx.float32, rounding="search",
                                              act_order=False))
        assert gptq < in_order, (gptq, in_order)


def _obq_reference(w, hessian, scale, bias, levels=15, damp=0.01):
    """GPTQ's result by the original formulation (OBS, one column at a time, in order), float64: after
    rounding column j, the later columns move by ``-err * Hinv[j, later] / Hinv[j, j]`` and column j is
    removed from the inverse Hessian by a rank-one update. No Cholesky factor, no blocks."""
    w = w.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    h_inv = np.linalg.inv(h)
    q = np.zeros_like(w)
    for j in range(w.shape[1]):
        code = np.clip(np.round((w[:, j] - bias) / scale), 0, levels)
        q[:, j] = code
        err = (w[:, j] - (scale * code + bias)) / h_inv[j, j]
        w[:, j + 1:] -= np.outer(err, h_inv[j, j + 1:])
        h_inv -= np.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    return q


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_obs_reference_on_a_tiny_matrix(act_order):
    """In the columns' order, or (act order) from the largest Hessian diagonal down: the reference then runs
    on the permuted matrix and its codes are put back in the columns' order."""
    x = _correlated_inputs(n=64, in_features=16, seed=1)
    x[:, 12:] *= 8.0  # the most energetic inputs last: act order visits them first
    w = _weights(out_features=6, in_features=16, seed=4)
    w[5] = np.linspace(-1, 1, 16)  # no constant row here: its codes are arbitrary
    hessian = x.T.astype(np.float64) @ x
    wq, scales, biases = gptq_quantize(mx.array(w), hessian, 4, None, dtype=mx.float32, rounding="nearest",
                                       act_order=act_order, refit=False)
    q = np.array(unpack(wq, 4)).astype(np.float64)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(16)
    assert not act_order or not np.array_equal(order, np.arange(16))  # a real permutation
    ref = _obq_reference(w[:, order], hessian[order][:, order], np.array(scales)[:, 0].astype(np.float64),
                         np.array(biases)[:, 0].astype(np.float64))[:, np.argsort(order)]
    # float32 against float64 may round a code that sits on a tie the other way: allow 1 in 100
    assert (q != ref).mean() <= 0.01
    assert np.abs(q - ref).max() <= 1


def test_refit_rows_is_the_least_squares_fit_on_the_inputs():
    """The 2x2 normal equations against numpy's least squares on the inputs themselves: per row,
    ``min ||X w - s X q - b X 1||``."""
    x = _correlated_inputs(n=256, in_features=32, seed=2).astype(np.float64)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 32))
    q = np.clip(np.round((w + 3) / 0.4) + rng.integers(-1, 2, size=w.shape), 0, 15)  # codes of w, perturbed
    start = np.full((8, 1), 1e-3, dtype=np.float32)  # a poor range: every row's refit is better
    scale, bias = refit_rows(w, q, start, start, x.T @ x, mx.float32)
    for row in range(8):
        design = np.stack([x @ q[row], x.sum(axis=1)], axis=1)  # (n, 2): X q, X 1
        (s, b), *_ = np.linalg.lstsq(design, x @ w[row], rcond=None)
        np.testing.assert_allclose([scale[row, 0], bias[row, 0]], [s, b], rtol=1e-5, atol=1e-6)


def test_gptq_refit_lowers_every_rows_output_error():
    """Refitting never raises a row's error on GPTQ's (damped) objective, and lowers the total."""
    x = _correlated_inputs()
    w = _weights(out_features=48, in_features=128, seed=3)
    hessian = x.T.astype(np.float64) @ x
    h = damped(hessian)

    def row_errors(triple):
        e = np.array(dequantize(*triple, 4, None, dtype=mx.float32)).astype(np.float64) - w
        return np.einsum("oi,ij,oj->o", e, h, e)

    plain = row_errors(gptq_quantize(mx.array(w), hessian, 4, None, dtype=mx.float16, refit=False))
    refitted = row_errors(gptq_quantize(mx.array(w), hessian, 4, None, dtype=mx.float16))
    assert np.all(refitted <= plain * (1 + 1e-9))
    assert refitted.sum() < 0.99 * plain.sum()
