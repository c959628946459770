"""LoftQ initialisation (Li et al., 2023): quantize the weight and start the adapters at the best rank-r
correction of the quantization error, alternating so that the two fit each other.

    residual = W
    repeat iters times:
        Q = dequantize(quantize(residual))            # our 4-bit format, any rounding
        U, S, V^T = svd(W - Q);  B = U_r sqrt(S_r);  A = sqrt(S_r) V_r^T
        residual = W - B @ A

so ``Q + B @ A`` approaches ``W``. This is PEFT's ``loftq_init`` (``peft.utils.loftq_utils``) with our format
in place of NF4: the same order of steps, the same split of ``sqrt(S)`` between the factors, the same
return (the ``Q`` of the last iteration and the factors fitted to it). PEFT stores ``A`` and ``B`` as they
are, so its start is ``Q + scale * B @ A``, exact only at ``scale = alpha / r = 1``; ``scaled_factors``
divides both factors by ``sqrt(scale)`` so that any alpha and rsLoRA start at ``Q + B @ A``.

The conversion (``convert_weights.py --loftq-rank``) computes the factors, since only it has ``W``, stores
``Q`` as the model's weights and the factors as a PEFT adapter folder ``loftq/`` (alpha = r, scale 1)
inside the model folder; ``finetune.py --lora-init loftq`` starts from them.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import numpy as np

from ..quant.gptq import damped
from ..quant.quantize import dequantize, quantize

LOFTQ_DIR = "loftq"  # the adapter folder inside a converted model folder
LOFTQ_ITERS = 5


def low_rank(residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``_low_rank_decomposition``: ``(B, A)`` with ``B = U_r sqrt(S_r)`` (out, r) and ``A = sqrt(S_r)
    V_r^T`` (r, in), the best rank-``rank`` approximation ``B @ A`` of ``residual`` (out, in)."""
    u, s, vt = np.linalg.svd(residual.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


def calibrated_factors(error: np.ndarray, hessian: np.ndarray, rank: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` (out, r) and (r, in): the rank-``rank`` ``B @ A`` nearest ``error`` (out, in) on the inputs
    whose ``X^T X`` is ``hessian`` (in, in), i.e. minimising ``||(error - B @ A) X^T||`` (CLoQ's closed form).

    With ``H + damp * mean(diag H) * I = L L^T`` (damped as GPTQ damps it, so that L is invertible), the
    minimum is the truncated SVD of ``error @ L``: ``U_r S_r V_r^T``, then ``B = U_r sqrt(S_r)`` and
    ``A = sqrt(S_r) V_r^T L^-1``. ``hessian = I`` (no damping) gives ``low_rank``'s factors."""
    lower = np.linalg.cholesky(damped(hessian, damp))  # (in, in), H + damping = L L^T
    b, weighted_a = low_rank(error.astype(np.float64) @ lower, rank)  # weighted_a = sqrt(S_r) V_r^T
    a = np.linalg.solve(lower.T, weighted_a.astype(np.float64).T).T  # sqrt(S_r) V_r^T L^-1
    return b, a.astype(np.float32)


def loftq_quantize(
    w: mx.array,
    rank: int,
    bits: int = 4,
    group_size: Optional[int] = None,
    dtype: Optional[mx.Dtype] = None,
    rounding: str = "nearest",
    iters: int = LOFTQ_ITERS,
    column_weights: Optional[mx.array] = None,
) -> tuple[tuple[mx.array, mx.array, mx.array], np.ndarray, np.ndarray]:
    """LoftQ's alternation on ``w`` (out, in): returns ``((wq, scales, biases), A (r, in), B (out, r))`` with
    ``dequantize(wq, ...) + B @ A ~= w`` (float32 factors, unscaled). ``column_weights``: as ``quantize``'s
    (the input norm's weight, for a per-row search)."""
    if iters < 1:
        raise ValueError(f"iters: must be >= 1, got {iters}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank: must be between 1 and {min(w.shape)}, got {rank}")
    weight = np.array(w.astype(mx.float32))
    residual = weight
    for i in range(iters):
        triple = quantize(mx.array(residual), bits, group_size, dtype=dtype or w.dtype, rounding=rounding,
                          column_weights=column_weights)
        restored = np.array(dequantize(*triple, bits, group_size, dtype=mx.float32))
        b, a = low_rank(weight - restored, rank)
        if i + 1 < iters:
            residual = weight - b @ a
    return triple, a, b


def scaled_factors(a: mx.array, b: mx.array, stored_scale: float, scale: float) -> tuple[mx.array, mx.array]:
    """Factors stored for ``stored_scale * B @ A`` rescaled for an adapter of scale ``scale``: both are
    multiplied by ``sqrt(stored_scale / scale)``, so ``scale * B' @ A'`` is the stored update."""
    factor = math.sqrt(stored_scale / scale)
    return a * factor, b * factor


def init_from_loftq(model, model_dir) -> int:
    """Set every adapter of ``model`` (after ``apply_lora``) to the LoftQ factors in ``model_dir/loftq``,
    rescaled to the adapter's scale; returns the number of adapters set.

    ``UserError`` (one line) when the folder has no factors, their rank is not the adapters', or an
    adapter has none (the conversion writes all seven projections of every layer)."""
    from pathlib import Path

    from ..errors import UserError
    from .adapters import load_adapters
    from .layer import LoRALinear

    folder = Path(model_dir) / LOFTQ_DIR
    if not folder.is_dir():
        raise UserError(f"{folder}: no LoftQ factors: convert the model with convert_weights.py --loftq-rank R to "
                        "use --lora-init loftq")
    params, config = load_adapters(folder)
    stored_scale = config.scale
    n = 0
    for path, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        if module.rank != config.rank:
            raise UserError(f"{folder}: the LoftQ factors have rank {config.rank}; pass --lora-rank {config.rank}")
        if path + ".lora_A" not in params:
            raise UserError(f"{folder}: no LoftQ factors for {path}")
        a, b = scaled_factors(params[path + ".lora_A"].astype(mx.float32), params[path + ".lora_B"].astype(mx.float32),
                              stored_scale, module.scale)
        module.lora_A, module.lora_B = a, b
        n += 1
    return n
