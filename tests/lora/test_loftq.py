"""LoftQ initialisation (``lora/loftq.py``): closer to the full weight than the default start, the same
alternation as PEFT's ``loftq_init`` (its own low-rank step, in torch), and the scale convention."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)

import mlx.core as mx

from mlx_qlora.lora.loftq import loftq_quantize, scaled_factors
from mlx_qlora.quant import dequantize, quantize


def _weight(out_features=48, in_features=96, seed=0) -> np.ndarray:
    """A low-rank part plus noise and a few outliers, as trained weights have."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_features, 4)) @ rng.standard_normal((4, in_features)) * 0.3
    w += rng.standard_normal((out_features, in_features)) * 0.1
    w[rng.integers(0, out_features, 6), rng.integers(0, in_features, 6)] += 2.0
    return w.astype(np.float32)


@pytest.mark.parametrize("group_size,rounding", [(None, "nearest"), (None, "search"), (32, "nearest")])
def test_loftq_starts_closer_than_the_default_init(group_size, rounding):
    w = _weight()
    plain = np.array(dequantize(*quantize(mx.array(w), 4, group_size, dtype=mx.float32, rounding=rounding), 4,
                                group_size, dtype=mx.float32))
    triple, a, b = loftq_quantize(mx.array(w), 8, 4, group_size, mx.float32, rounding, iters=5)
    start = np.array(dequantize(*triple, 4, group_size, dtype=mx.float32)) + b @ a
    # the default init (B = 0) starts at the plain quantized weight
    assert np.linalg.norm(w - start) < 0.8 * np.linalg.norm(w - plain)
    assert a.shape == (8, 96) and b.shape == (48, 8)


def test_matches_peft_alternation_in_torch():
    """PEFT's loop (``peft.utils.loftq_utils.loftq_init``) written out in torch with PEFT's own
    ``_low_rank_decomposition`` and our quantizer in place of bitsandbytes' NF4."""
    torch = pytest.importorskip("torch")
    from peft.utils.loftq_utils import _low_rank_decomposition

    w = _weight(seed=1)
    rank, iters = 4, 3

    def quantizer(t):
        triple = quantize(mx.array(t.numpy()), 4, None, dtype=mx.float32)
        return torch.from_numpy(np.array(dequantize(*triple, 4, None, dtype=mx.float32)))

    weight = torch.from_numpy(w)
    res = weight.clone()
    for i in range(iters):
        dequantized = quantizer(res)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=rank)
        L, R = out["L"], out["R"]
        if i + 1 == iters:
            break
        res = weight - L @ R

    triple, a, b = loftq_quantize(mx.array(w), rank, 4, None, mx.float32, "nearest", iters=iters)
    # the residuals differ by float32 rounding (B @ A in float64 here, float32 in torch): the same codes but
    # for rare ties, so the restored weights agree to well within a step
    np.testing.assert_allclose(np.array(dequantize(*triple, 4, None, dtype=mx.float32)), dequantized.numpy(),
                               atol=1e-5)
    # singular vectors are defined up to sign: compare the products, and the factors up to one sign per rank
    np.testing.assert_allclose(b @ a, (L @ R).numpy(), atol=1e-4)
    signs = np.sign(np.sum(a * R.numpy(), axis=1, keepdims=True))
    np.testing.assert_allclose(a * signs, R.numpy(), atol=1e-4)
    np.testing.assert_allclose(b * signs.T, L.numpy(), atol=1e-4)


def test_scaled_factors_keep_the_update():
    rng = np.random.default_rng(2)
    a, b = mx.array(rng.standard_normal((4, 16)).astype(np.float32)), mx.array(rng.standard_normal((8, 4)).astype(np.float32))
    for scale in (2.0, 0.5, 32 / np.sqrt(16)):
        a2, b2 = scaled_factors(a, b, 1.0, scale)
        np.testing.assert_allclose(np.array(scale * (b2 @ a2)), np.array(b @ a), rtol=1e-5, atol=1e-6)


def test_calibrated_factors_are_the_best_rank_r_fit_on_the_inputs():
    """``calibrated_factors`` against the Eckart-Young bound of the weighted problem: with H = X^T X (full
    rank, no damping) the error ``||(E - B A) X^T||^2`` is the sum of the squared singular values of
    ``E L`` past r, no larger than the plain SVD's factors give on the same inputs; H = I gives the plain
    factors (``low_rank``)."""
    from mlx_qlora.lora.loftq import calibrated_factors, low_rank

    rng = np.random.default_rng(0)
    out, inp, r = 24, 16, 3
    error = rng.standard_normal((out, inp))
    x = rng.standard_normal((200, inp)) * np.linspace(0.1, 3.0, inp)  # (tokens, in): uneven columns
    h = x.T @ x
    b, a = calibrated_factors(error, h, r, damp=0.0)
    weighted = lambda m: np.linalg.norm(m @ x.T) ** 2  # noqa: E731
    s = np.linalg.svd(error @ np.linalg.cholesky(h), compute_uv=False)
    assert weighted(error - b @ a) == pytest.approx(np.sum(s[r:] ** 2), rel=1e-4)
    pb, pa = low_rank(error, r)
    assert weighted(error - b @ a) < weighted(error - pb @ pa)
    ib, ia = calibrated_factors(error, np.eye(inp), r, damp=0.0)
    np.testing.assert_allclose(ib @ ia, pb @ pa, atol=1e-5)
