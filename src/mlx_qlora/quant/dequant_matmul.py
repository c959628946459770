"""``x @ W.T`` for a 4-bit ``W`` that keeps no full-precision copy of ``W`` for the backward pass.

Differentiating a plain ``x @ dequantize(W).T`` makes MLX keep the dequantized weight from the forward
pass until the backward pass: for a 7B model that is 14 GB of bfloat16 held during every training step.
Here the vector-Jacobian product dequantizes ``W`` again instead (``dx = dy @ W``), trading one more
dequantization per layer (a memory-bound pass over 4-bit data) for that memory. The packed weight, its
scales and biases are frozen, so their cotangents are zeros that are never computed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx


@lru_cache(maxsize=None)
def dequantized_matmul_fn(dequantize: Callable, bits: int, group_size: Optional[int]) -> Callable:
    """A custom function ``f(x, wq, scales, biases) -> x @ W.T``.

    W = ``dequantize(wq, scales, biases, bits, group_size, dtype)``, a module-level pure function (it is
    part of the cache key).

    x (..., in); result (..., out) in x.dtype. ``dequantize`` is a pure function of arrays and a dtype.
    """

    @mx.custom_function
    def matmul(x, wq, scales, biases):
        # Tied to x: a recomputation of this layer (gradient checkpointing) then differs from the first
        # forward pass, and mx.compile cannot merge the two and keep the first W until the backward pass.
        w = dequantize(mx.depends(wq, x), scales, biases, bits, group_size, x.dtype)  # (out, in)
        return x @ w.T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, wq, scales, biases = primals
        # Tie the recomputation to the cotangent: it then cannot start before the backward pass reaches
        # this layer, and mx.compile cannot merge it with the forward pass's dequantization (which would
        # keep W alive again).
        wq_late = mx.depends(wq, cotangent)
        w = dequantize(wq_late, scales, biases, bits, group_size, cotangent.dtype)  # recomputed, not stored
        return (cotangent @ w).astype(x.dtype), mx.zeros_like(wq), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul
