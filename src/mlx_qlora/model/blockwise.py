"""Attention whose memory is linear in the sequence: exact softmax over chunks of queries, in MLX operations.

The plain path (``mx.fast.scaled_dot_product_attention`` with an array mask, and its gradient wherever the
backend has no fused kernel for that mask) holds the (B, H, L, L) scores, and the mask an (L, L) array.
Here the queries are taken ``block`` rows at a time; a chunk of queries [a, b) can only see the keys
[a - window + 1, b) (all keys before b without a window), so its scores are (B, H, block, window + block)
and its softmax is exact without a running rescale. The log-sum-exp of every row is kept (B, H, L, one
float32 each) so that the backward pass (``mx.custom_function``'s ``vjp``) recomputes the probabilities of a
chunk from it, as the flash-attention recipe does:

- d q, chunk by chunk of queries: ``dq = (P * (dP - delta)) @ K * scale`` with ``dP = dO @ V^T`` and
  ``delta = rowsum(dO * O)``;
- d k and d v, chunk by chunk of keys (a key chunk [c, e) is seen by the queries [c, e + window - 1)):
  ``dv = P^T @ dO``, ``dk = (P * (dP - delta))^T @ (Q * scale)``; every chunk's result is its own slice of
  the gradient, so nothing is scattered or accumulated across chunks.

The mask rule is ``model/mask.py``'s (causal, sliding window, packed segments, key padding with every query
seeing itself), evaluated per chunk from positions, segment ids and the padding mask: no (L, L) array.
With ``softcap`` (Gemma 2) each chunk's scores become ``cap * tanh(scores / cap)`` before the mask, and the
backward pass multiplies d s by the derivative ``1 - tanh^2``, recomputed from the same chunk's scores.
Scores and softmax are float32; the matmuls run in the inputs' dtype. Grouped-query heads share their key
and value rows by broadcasting (B, Hkv, G, L, D) against (B, Hkv, 1, L, D).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .mask import allowed as mask_rule, row_info


def blockwise_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, window: Optional[int] = None,
                        segment_ids: Optional[mx.array] = None, attention_mask: Optional[mx.array] = None,
                        block: int = 512, softcap: Optional[float] = None) -> mx.array:
    """q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, H, L, D): causal self-attention (queries and keys are the
    same L tokens, no cache) under ``model/mask.py``'s rule, ``block`` query or key rows at a time.

    window: Hugging Face Mistral's sliding window (None: full causal). segment_ids (B, L): packed rows,
    attention only within a segment. attention_mask (B, L): 0 at padding keys. softcap: scores soft-capped
    to ``softcap * tanh(scores / softcap)`` (None: not). Differentiable in q, k, v.
    """
    B, H, L, D = q.shape
    if k.shape[2] != L:
        raise ValueError(f"blockwise attention needs keys of the queries' length {L}, got {k.shape[2]}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    # Segment ids and the padding mask travel as one int32 array (an input of the custom function).
    info = row_info(segment_ids, attention_mask, B, L)  # (B, 2, L)
    fn = _attention_fn(scale, window, segment_ids is not None, attention_mask is not None, block, softcap)
    return fn(q, k, v, info)[0]


def _attention_fn(scale: float, window: Optional[int], segments: bool, padding: bool, block: int,
                  softcap: Optional[float] = None):
    """The custom function ``(q, k, v, info) -> (out (B, H, L, D), lse (B, Hkv, G, L))`` for these settings."""
    span = window if window is not None else None

    def allowed(info: mx.array, qa: int, qb: int, ka: int, kb: int) -> mx.array:
        """(B or 1, 1, 1, qb - qa, kb - ka) booleans: may query qa + i see key ka + j."""
        qp = mx.arange(qa, qb, dtype=mx.int32)[None, None, None, :, None]  # (1, 1, 1, Rq, 1)
        kp = mx.arange(ka, kb, dtype=mx.int32)[None, None, None, None, :]  # (1, 1, 1, 1, Rk)
        q_seg = info[:, 0, qa:qb][:, None, None, :, None] if segments else None  # (B, 1, 1, Rq, 1)
        k_seg = info[:, 0, ka:kb][:, None, None, None, :] if segments else None  # (B, 1, 1, 1, Rk)
        valid = (info[:, 1, ka:kb] != 0)[:, None, None, None, :] if padding else None
        return mask_rule(qp, kp, span, q_seg, k_seg, valid)

    def first_key(qa: int) -> int:
        return 0 if span is None else max(0, qa - span + 1)

    def last_query(kb: int, length: int) -> int:
        return length if span is None else min(length, kb + span - 1)

    def capped(s: mx.array):
        """Raw float32 scores -> (scores as the softmax sees them, d capped / d raw or None)."""
        if softcap is None:
            return s, None
        t = mx.tanh(s / softcap)
        return t * softcap, 1.0 - t * t

    def split(q, k, v):
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        q5 = (q * mx.array(scale, dtype=q.dtype)).reshape(B, Hkv, H // Hkv, L, D)  # (B, Hkv, G, L, D)
        return q5, k[:, :, None], v[:, :, None]  # (B, Hkv, 1, L, D) x 2

    @mx.custom_function
    def attention(q, k, v, info):
        B, H, L, D = q.shape
        q5, k5, v5 = split(q, k, v)
        outs, lses, previous = [], [], None
        for qa in range(0, L, block):
            qb, ka = min(qa + block, L), first_key(qa)
            q_chunk = q5[..., qa:qb, :]
            if previous is not None:  # one chunk's scores at a time: MLX would otherwise run them side by side
                q_chunk = mx.depends(q_chunk, [previous])
            s = (q_chunk @ k5[..., ka:qb, :].swapaxes(-1, -2)).astype(mx.float32)  # (B, Hkv, G, Rq, Rk)
            s, _ = capped(s)
            s = mx.where(allowed(info, qa, qb, ka, qb), s, -mx.inf)
            m = mx.max(s, axis=-1, keepdims=True)  # every query sees at least itself: finite
            p = mx.exp(s - m)
            total = mx.sum(p, axis=-1, keepdims=True)
            out = (p / total).astype(v.dtype) @ v5[..., ka:qb, :]  # (B, Hkv, G, Rq, D)
            outs.append(out)
            lses.append((m + mx.log(total))[..., 0])  # (B, Hkv, G, Rq)
            previous = out
        out = mx.concatenate(outs, axis=3).reshape(B, H, L, D)
        return out, mx.concatenate(lses, axis=3)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v, info = primals
        d_out, d_lse = cotangents
        out, lse = outputs
        B, H, L, D = q.shape
        q5, k5, v5 = split(q, k, v)
        do5 = d_out.reshape(q5.shape).astype(q.dtype)  # (B, Hkv, G, L, D)
        out5 = out.reshape(q5.shape)
        # d loss / d s = P * (dP - delta + d_lse): delta from the output, d_lse for a caller that uses the lse;
        # a chunk of rows at a time, so that no (B, H, L, D) float32 product exists.
        delta = mx.concatenate([
            mx.sum(do5[..., a:a + block, :].astype(mx.float32) * out5[..., a:a + block, :].astype(mx.float32), axis=-1)
            for a in range(0, L, block)], axis=3) - d_lse.astype(mx.float32)  # (B, Hkv, G, L)

        def probabilities_and_ds(qa, qb, ka, kb, q_rows, do_rows):
            s = (q_rows @ k5[..., ka:kb, :].swapaxes(-1, -2)).astype(mx.float32)  # (B, Hkv, G, Rq, Rk)
            s, slope = capped(s)
            p = mx.where(allowed(info, qa, qb, ka, kb), mx.exp(s - lse[..., qa:qb, None]), 0.0)
            dp = (do_rows @ v5[..., ka:kb, :].swapaxes(-1, -2)).astype(mx.float32)
            ds = p * (dp - delta[..., qa:qb, None])
            return p, ds if slope is None else ds * slope

        d_q, previous = [], None
        for qa in range(0, L, block):
            qb, ka = min(qa + block, L), first_key(qa)
            q_rows = q5[..., qa:qb, :]
            if previous is not None:
                q_rows = mx.depends(q_rows, [previous])
            _, ds = probabilities_and_ds(qa, qb, ka, qb, q_rows, do5[..., qa:qb, :])
            previous = (ds.astype(q.dtype) @ k5[..., ka:qb, :]) * scale  # (B, Hkv, G, Rq, D)
            d_q.append(previous)
        d_k, d_v = [], []
        for ka in range(0, L, block):
            kb = min(ka + block, L)
            qb = last_query(kb, L)
            q_rows = q5[..., ka:qb, :]
            if previous is not None:
                q_rows = mx.depends(q_rows, previous if isinstance(previous, list) else [previous])
            p, ds = probabilities_and_ds(ka, qb, ka, kb, q_rows, do5[..., ka:qb, :])
            d_v.append(mx.sum(p.astype(v.dtype).swapaxes(-1, -2) @ do5[..., ka:qb, :], axis=2))  # (B, Hkv, Rk, D)
            d_k.append(mx.sum(ds.astype(k.dtype).swapaxes(-1, -2) @ q_rows, axis=2))
            previous = [d_k[-1], d_v[-1]]  # both: a chunk's probabilities must not wait for a later d v
        d_q = mx.concatenate(d_q, axis=3).reshape(q.shape)
        d_k = mx.concatenate(d_k, axis=2).astype(k.dtype)
        d_v = mx.concatenate(d_v, axis=2).astype(v.dtype)
        return d_q.astype(q.dtype), d_k, d_v, mx.zeros_like(info)

    return attention
