"""A LoRA layer's forward and backward pass with the adapter's sum inside the base matmul.

``y = x @ W.T + scale * (x @ A.T) @ B.T`` written as MLX's operations makes three full-size passes beyond
the two matmuls: the adapter's (rows, out) product, its scaling and the sum with the base's output, and
as many again in the backward pass (the scaled cotangent and the sum of the base's and the adapter's
input gradients). Here the sums ride in the matmuls' epilogue instead (``mx.addmm``: cuBLAS adds ``C``
while it writes the product) and ``scale`` is folded into ``B``:

    forward:   y  = addmm((x @ A.T) @ (scale B).T, x, W.T)
    backward:  g  = dy @ (scale B)                               (rows, r)
               dx = addmm(g @ A, dy, W)
               dA = g.T @ x,   dB = scale * dy.T @ (x @ A.T)

For a 4-bit base, ``W`` is dequantized in the forward pass and again in the backward pass, never kept
(as in ``dequant_matmul.py``), each time tied to the pass's own input so that ``mx.compile`` cannot merge
the two. The backward pass forms ``x @ A.T`` (rows, r) again; inside ``mx.compile`` that is merged with the
forward pass's copy, which is then kept (it is small). The base is frozen: its cotangents are zeros that
nothing evaluates. Gradients come back in the adapters' own dtype.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx


@lru_cache(maxsize=None)
def lora_matmul_fn(dequantize: Optional[Callable], bits: int, group_size: Optional[int], scale: float) -> Callable:
    """A custom function ``f(x, lora_A, lora_B, *base) -> x @ W.T + scale * (x @ lora_A.T) @ lora_B.T``.

    ``base`` is ``(weight,)`` for a dense base (``dequantize`` None) or ``(wq, scales, biases)`` with
    W = ``dequantize(wq, scales, biases, bits, group_size, dtype)``. x (..., in), lora_A (r, in),
    lora_B (out, r); the result (..., out) is in x.dtype, as are the matmuls.
    """

    def weight(base, tie: mx.array, dtype: mx.Dtype) -> mx.array:  # (out, in)
        if dequantize is None:
            return base[0].astype(dtype)
        wq, scales, biases = base
        return dequantize(mx.depends(wq, tie), scales, biases, bits, group_size, dtype)

    def adapters(lora_A: mx.array, lora_B: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        return lora_A.astype(dtype), (scale * lora_B).astype(dtype)  # (r, in), (out, r)

    @mx.custom_function
    def matmul(x, lora_A, lora_B, *base):
        a, b = adapters(lora_A, lora_B, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
        y = mx.addmm((x2 @ a.T) @ b.T, x2, weight(base, x, x.dtype).T)  # (rows, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, lora_A, lora_B, *base = primals
        dtype = x.dtype
        a, b = adapters(lora_A, lora_B, dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
        dy = cotangent.astype(dtype).reshape(-1, cotangent.shape[-1])  # (rows, out)
        g = dy @ b  # (rows, r)
        dx = mx.addmm(g @ a, dy, weight(base, cotangent, dtype))  # (rows, in)
        d_a = (g.T @ x2).astype(lora_A.dtype)  # (r, in)
        d_b = (scale * (dy.T @ (x2 @ a.T)).astype(mx.float32)).astype(lora_B.dtype)  # (out, r)
        return [dx.reshape(x.shape), d_a, d_b] + [mx.zeros_like(p) for p in base]

    return matmul
