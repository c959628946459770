"""How a row's (or group's) scale and bias are chosen: plain min/max, or a search that lowers the error.

The storage format is the same either way (``quantize.py``: ``w ~= scale * q + bias``, ``q`` in
``0..2**bits - 1``); only the numbers stored change, so loading, training and the kernels are untouched.

``nearest`` takes the group's minimum and maximum: every weight within half a step, but one large weight
stretches the step of the whole row.

``search`` (the idea of llama.cpp's k-quants, ``make_qkx2_quants``) tries ``n_steps + 1`` narrower and
wider ranges around the min/max one. For each it rounds the group, then fits the scale and bias that
minimise the *weighted* squared error for those integers (two-parameter least squares), keeps the
candidate of lowest error and refits it ``REFINE_STEPS`` times (codes, then range). The weights
(``importance``) are k-quants' ``rms + |w|`` for groups and ``(mean(|w|) + |w|)**2`` for whole rows: large
weights count more, so the range is not simply clipped at the outliers; plain MSE clipping made
SmolLM2-135M worse (``docs/quantization.md``). The min/max candidate is always among those tried and the final choice is
made on the stored (rounded) scale and bias, so the weighted error of every group is never above
``nearest``'s.

For whole rows the search can also weigh each input column (``column_weights``): a projection that reads
an RMSNorm's output (q/k/v, gate/up) sees column j scaled by the norm's weight gamma_j, so an error there
counts more where |gamma_j| is large. ``column_importance`` multiplies the weights by ``|gamma_j| **
COLUMN_POWER`` (``convert.py`` passes the checkpoint's norms). Measured on SmolLM2-135M
(``docs/quantization.md``), per-row searched: perplexity +107.7% without, +95.2% with the square root,
+104.9% / +102.3% / +114.3% / +131.0% with powers 0.25 / 0.75 / 1 / 2, on the documentation text; on
other held-out text (Dolly records) +139.2% without, +137.1% with (KL 0.941 -> 0.930). Groups of 64 did
not gain (+27.9% -> +29.2%), so groups are searched without it.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

ROUNDINGS = ("nearest", "search")
SEARCH_STEPS = 20  # candidate ranges besides min/max (k-quants: 20)
SEARCH_RMIN = -1.0  # the candidates' inverse scales are (levels + RMIN + DELTA * i) / (max - min)
SEARCH_DELTA = 0.1
REFINE_STEPS = 2  # least-squares refits of the best candidate
COLUMN_POWER = 0.5  # per-row search: columns weighed by |gamma| ** COLUMN_POWER (the input norm's weight)


def importance(groups: mx.array, per_row: bool = True) -> mx.array:
    """The search's per-weight weights for groups (..., group) float32: ``(mean(|w|) + |w|)**2`` for whole
    rows, k-quants' ``rms(group) + |w|`` for groups.

    Measured on SmolLM2-135M (``docs/quantization.md``), perplexity change against the full model. Per
    row (min/max: +134%): plain MSE +175%, ``rms + |w|`` +162%, ``mean + |w|`` +122%, its square +108%, its
    cube +123%, its fourth power +129%. Group 64 (min/max: +33%): ``rms + |w|`` +27%, the per-row square
    +34%. A long row has more outliers to weigh than a group of 64."""
    magnitude = mx.abs(groups)
    if not per_row:
        return mx.sqrt(mx.mean(groups * groups, axis=-1, keepdims=True)) + magnitude
    floor_plus = mx.mean(magnitude, axis=-1, keepdims=True) + magnitude
    return floor_plus * floor_plus


def minmax_ranges(groups: mx.array, bits: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """``nearest``'s scales and biases (..., 1) in ``dtype`` for groups (..., group) float32."""
    lo = groups.min(axis=-1, keepdims=True)
    hi = groups.max(axis=-1, keepdims=True)
    return ((hi - lo) / (2**bits - 1)).astype(dtype), lo.astype(dtype)


def codes(groups: mx.array, scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """The integers nearest to ``(w - bias) / scale`` in 0..2**bits-1, float32 (..., group).

    A scale of 0 (a constant group) gives 0 everywhere: the bias alone restores it."""
    s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
    divisor = mx.where(s32 > 0, s32, mx.ones_like(s32))
    return mx.clip(mx.round((groups - b32) / divisor), 0, 2**bits - 1)


def weighted_error(groups: mx.array, weights: mx.array, scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """``sum(weights * (scale * q + bias - w)**2)`` per group (..., 1), with ``q`` the nearest codes."""
    q = codes(groups, scales, biases, bits)
    diff = scales.astype(mx.float32) * q + biases.astype(mx.float32) - groups
    return mx.sum(weights * diff * diff, axis=-1, keepdims=True)


def _least_squares(q, groups, weights, sum_w, sum_x):
    """The scale and bias minimising ``sum(weights * (s * q + b - w)**2)`` for fixed codes ``q``."""
    wq = weights * q
    sum_q = mx.sum(wq, axis=-1, keepdims=True)
    sum_qq = mx.sum(wq * q, axis=-1, keepdims=True)
    sum_qx = mx.sum(wq * groups, axis=-1, keepdims=True)
    det = sum_w * sum_qq - sum_q * sum_q
    ok = det > 0
    scale = mx.where(ok, (sum_w * sum_qx - sum_q * sum_x) / mx.where(ok, det, 1.0), 0.0)
    bias = (sum_x - scale * sum_q) / sum_w
    return scale, bias


def search_ranges(
    groups: mx.array, bits: int, dtype: mx.Dtype, weights: Optional[mx.array] = None, n_steps: int = SEARCH_STEPS,
    per_row: bool = True,
) -> tuple[mx.array, mx.array]:
    """``search``'s scales and biases (..., 1) in ``dtype`` for groups (..., group) float32.

    ``weights`` (..., group) default to ``importance(groups, per_row)``. The result's weighted error is never above
    that of ``minmax_ranges`` (the min/max candidate is kept where nothing beats it)."""
    levels = 2**bits - 1
    weights = importance(groups, per_row) if weights is None else weights
    sum_w = mx.sum(weights, axis=-1, keepdims=True)
    sum_x = mx.sum(weights * groups, axis=-1, keepdims=True)
    lo = groups.min(axis=-1, keepdims=True)
    hi = groups.max(axis=-1, keepdims=True)
    span = mx.where(hi > lo, hi - lo, 1.0)

    best = minmax_ranges(groups, bits, dtype)
    best = (*best, weighted_error(groups, weights, *best, bits))

    def keep_better(q: mx.array, best: tuple) -> tuple:
        """The least-squares range of codes ``q``, where it beats ``best`` (scale, bias, error)."""
        scale, bias = _least_squares(q, groups, weights, sum_w, sum_x)
        scale, bias = scale.astype(dtype), bias.astype(dtype)
        # the stored values decide: the codes are rounded again against them
        err = weighted_error(groups, weights, scale, bias, bits)
        better = (err < best[2]) & (scale > 0)
        best = tuple(mx.where(better, new, old) for new, old in zip((scale, bias, err), best))
        mx.eval(best)  # bounds the graph (and the temporaries) to one candidate
        return best

    for step in range(n_steps + 1):
        inverse = (levels + SEARCH_RMIN + SEARCH_DELTA * step) / span
        best = keep_better(mx.clip(mx.round((groups - lo) * inverse), 0, levels), best)
    for _ in range(REFINE_STEPS):  # alternate: the best range's codes, then their least-squares range
        best = keep_better(codes(groups, best[0], best[1], bits), best)
    return best[0], best[1]


def column_importance(gamma: mx.array) -> mx.array:
    """Per-column factors (in,) float32 of the per-row search's weights for a projection reading a norm of
    weight ``gamma`` (in,) (its effective values, ``offset + w``): ``|gamma| ** COLUMN_POWER`` over their
    mean (a zero gamma weighs nothing)."""
    col = mx.abs(gamma.astype(mx.float32)) ** COLUMN_POWER
    mean = mx.mean(col)
    return mx.where(mean > 0, col / mx.where(mean > 0, mean, 1.0), mx.ones_like(col))


def choose_ranges(
    groups: mx.array, bits: int, dtype: mx.Dtype, rounding: str = "nearest", per_row: bool = True,
    column_weights: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array]:
    """Scales and biases (..., 1) in ``dtype`` for groups (..., group) float32 by the method ``rounding``;
    ``per_row``: each group is a whole row (the search weighs its weights differently). ``column_weights``
    (in,): the input norm's weight of a per-row search (``column_importance``); ignored otherwise."""
    if rounding == "nearest":
        return minmax_ranges(groups, bits, dtype)
    if rounding == "search":
        weights = None
        if per_row and column_weights is not None:
            weights = importance(groups, True) * column_importance(column_weights).reshape(1, 1, -1)
        return search_ranges(groups, bits, dtype, weights=weights, per_row=per_row)
    raise ValueError(f"rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
