"""GPTQ: quantize a weight column by column, moving each column's rounding error onto the columns not yet
quantized, weighted by how the layer's real inputs correlate (Frantar et al., 2022).

The output error of a layer on inputs ``X`` (n, in) is ``||X (W - Wq)^T||^2 = sum_rows e H e^T`` with
``H = X^T X``. Rounding column ``j`` leaves an error ``e_j`` that the remaining columns can partly cancel:
with ``U`` the upper Cholesky factor of ``H^-1``, the best correction of the columns after ``j`` is
``-e_j / U[j, j] * U[j, j+1:]``. Columns go in blocks of ``BLOCK``; within a block the update is applied
column by column, to the rest of the matrix once per block (the "lazy batch" of the paper).

The storage format is unchanged: scales and biases are chosen first (per row: from the whole original row;
per group: from the group's columns as the updates have left them, when its first column is reached), by
``rounding.choose_ranges``; GPTQ then chooses the integers. Per row, the scale and bias are refitted last
to the integers GPTQ chose (``refit_rows``: the least-squares fit on the same Hessian, two numbers per row).
Computed in numpy, float32 for the weights and float64 for the inverse and the refit.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .quantize import n_groups_for, pack
from .rounding import choose_ranges

BLOCK = 128  # columns per lazy batch; a multiple of every group size
DAMP = 0.01  # added to H's diagonal, times its mean: keeps the inverse well conditioned


def damped(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """``H + damp * mean(diag H) * I`` in float64, inputs that were always zero (a zero diagonal) given a
    diagonal of 1 first, so that it is positive definite; their weights then take no correction."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return h


def inverse_cholesky(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``damped(H)^-1`` (``U^T U = H^-1``), float64."""
    h = damped(hessian, damp)
    lower = np.linalg.cholesky(h)  # h = L L^T
    eye = np.eye(len(h))
    lower_inv = np.linalg.solve(lower, eye)  # L^-1
    h_inv = lower_inv.T @ lower_inv  # (L L^T)^-1
    return np.linalg.cholesky(h_inv).T  # upper U with U^T U = h_inv


def _ranges(columns: np.ndarray, bits: int, dtype: mx.Dtype, rounding: str, per_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales and biases (out, 1) as float32 values of ``dtype`` for ``columns`` (out, group)."""
    scales, biases = choose_ranges(mx.array(columns[:, None, :]), bits, dtype, rounding, per_row)  # (out, 1, 1)
    return (np.array(scales.astype(mx.float32)).reshape(-1, 1), np.array(biases.astype(mx.float32)).reshape(-1, 1))


def refit_rows(w: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray, hessian: np.ndarray,
               dtype: mx.Dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the scale ``s`` and bias ``b`` minimising ``(w - s q - b)^T H (w - s q - b)``, the output
    error on the inputs of ``H`` once the codes ``q`` are fixed: a 2x2 least-squares system per row.

    GPTQ chose its codes for ranges picked before any error was moved; the codes, once chosen, are fitted
    better by other ranges. ``w``, ``q`` (out, in) in the columns' order, ``scale``, ``bias`` (out, 1) the
    ranges the codes were made with, ``hessian`` the damped ``H`` (in, in). Returns (out, 1) float32 arrays
    holding values of ``dtype``; a row keeps its old range where the new one, rounded to ``dtype``, is not
    lower in error (a row of equal codes has no 2x2 solution), so no row gets worse."""
    w64, q64 = w.astype(np.float64), q.astype(np.float64)
    qh = q64 @ hessian  # (out, in)
    h1 = hessian.sum(axis=1)  # H 1, (in,)
    qhq, qh1, qhw = np.einsum("oi,oi->o", qh, q64), q64 @ h1, np.einsum("oi,oi->o", qh, w64)
    ones, wh1 = h1.sum(), w64 @ h1
    det = qhq * ones - qh1 * qh1
    solvable = det > 1e-9 * qhq * ones
    safe = np.where(solvable, det, 1.0)
    new_scale = (qhw * ones - qh1 * wh1) / safe
    new_bias = (qhq * wh1 - qh1 * qhw) / safe

    def stored(values: np.ndarray) -> np.ndarray:
        return np.array(mx.array(values.astype(np.float32)).astype(dtype).astype(mx.float32), dtype=np.float64)

    def error(s: np.ndarray, b: np.ndarray) -> np.ndarray:  # the quadratic form less w^T H w, expanded (out,)
        return -2 * s * qhw - 2 * b * wh1 + s * s * qhq + 2 * s * b * qh1 + b * b * ones

    new_scale, new_bias = stored(new_scale), stored(new_bias)
    old_scale, old_bias = scale[:, 0].astype(np.float64), bias[:, 0].astype(np.float64)
    better = solvable & (new_scale > 0) & (error(new_scale, new_bias) < error(old_scale, old_bias))
    return (np.where(better, new_scale, old_scale).astype(np.float32)[:, None],
            np.where(better, new_bias, old_bias).astype(np.float32)[:, None])


def gptq_quantize(
    w: mx.array,
    hessian: np.ndarray,
    bits: int = 4,
    group_size: Optional[int] = None,
    dtype: Optional[mx.Dtype] = None,
    rounding: str = "search",
    damp: float = DAMP,
    act_order: bool = True,
    refit: bool = True,
) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize ``w`` (out, in) for inputs whose ``X^T X`` is ``hessian`` (in, in).

    Returns ``quantize``'s triple: ``wq`` uint32 (out, in * bits / 32), ``scales``, ``biases`` (out,
    n_groups) in ``dtype`` (default: ``w``'s). ``rounding`` chooses the ranges (``rounding.py``). ``act_order``
    (per row only): the columns are taken from the largest ``H`` diagonal (the inputs of most energy) down, so
    that the columns that matter most are rounded first and the later ones absorb their error; the integers
    go back to the columns' own order, so the format does not change. ``refit`` (per row only): the scale and
    bias are refitted to the chosen codes (``refit_rows``)."""
    out_features, in_features = w.shape
    n_groups = n_groups_for(in_features, bits, group_size)
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian: expected shape {(in_features, in_features)}, got {hessian.shape}")
    dtype = dtype or w.dtype
    levels = 2**bits - 1
    group = group_size or in_features
    weight = np.array(w.astype(mx.float32), dtype=np.float32)  # (out, in), updated in place
    weight[:, np.diag(hessian) == 0] = 0.0
    original = weight.copy() if refit and group_size is None else None  # the loop updates weight in place
    order, ordered = None, hessian
    if act_order and group_size is None:
        order = np.argsort(-np.diag(hessian), kind="stable")
        weight, ordered = weight[:, order], hessian[order][:, order]
    upper = inverse_cholesky(ordered, damp).astype(np.float32)
    del ordered

    q = np.zeros((out_features, in_features), dtype=np.float32)
    scales = np.zeros((out_features, n_groups), dtype=np.float32)
    biases = np.zeros((out_features, n_groups), dtype=np.float32)
    if group_size is None:
        scale, bias = _ranges(weight, bits, dtype, rounding, per_row=True)
    for start in range(0, in_features, BLOCK):
        stop = min(start + BLOCK, in_features)
        block = weight[:, start:stop].copy()  # (out, b)
        errors = np.zeros_like(block)
        u = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if group_size is not None and column % group == 0:
                scale, bias = _ranges(block[:, i : i + group], bits, dtype, rounding, per_row=False)
                scales[:, column // group], biases[:, column // group] = scale[:, 0], bias[:, 0]
            divisor = np.where(scale > 0, scale, 1.0)[:, 0]
            code = np.clip(np.round((block[:, i] - bias[:, 0]) / divisor), 0, levels)
            q[:, column] = code
            error = (block[:, i] - (scale[:, 0] * code + bias[:, 0])) / u[i, i]  # (out,)
            block[:, i:] -= np.outer(error, u[i, i:])
            errors[:, i] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]
    if order is not None:
        q = q[:, np.argsort(order)]
    del upper  # (in, in): freed before the refit's own in x in arrays
    if group_size is None:
        if refit:
            scale, bias = refit_rows(original, q, scale, bias, damped(hessian, damp), dtype)
        scales[:, 0], biases[:, 0] = scale[:, 0], bias[:, 0]
    return (pack(mx.array(q), bits), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype))
