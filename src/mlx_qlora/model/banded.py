"""Sliding-window attention as a band of chunks, each through MLX's fused attention: memory linear in the length.

With a window W (Hugging Face Mistral's), a query at position p sees the keys (p - W, p]. Taken ``C``
queries at a time, the chunk j (queries [jC, (j+1)C)) sees no key before (j - m)C with m = ceil((W - 1) / C),
so its attention is exact over the keys [(j - m)C, (j+1)C): (m + 1)C keys under one band mask, the same
(C, (m + 1)C) array for every chunk once j >= m. The sequence is padded with zeros to a multiple of C and
runs as two calls of ``mx.fast.scaled_dot_product_attention``:

- the first mC tokens (no window cuts there when C divides W): causal attention over themselves;
- the other chunks folded into the batch, (B g, H, C, D) queries against their (m + 1)C keys, gathered
  from the key chunks (each a piece of ``model/split.py``'s, used by m + 1 query chunks), g chunks per
  call (``MAX_ELEMENTS``).

Where the fused kernel exists (CUDA's cuDNN attention, forward and backward, for query lengths that are
multiples of 128) nothing holds (L, L) scores or an (L, L) mask: the peak is the keys and values taken m + 1
times and a (C, (m + 1)C) mask (additive, in the inputs' dtype: MLX would broadcast a boolean one to every
head and chunk, see ``kernels/cuda/sdpa.py``), and the work (m + 1)C keys a query instead of the window's W
(25% more at C = W / 4). Packed segments and key padding become a mask for each chunk,
(B (n - m), 1, C, (m + 1)C), evaluated from the same rule as ``model/mask.py``'s. Padded positions after the
sequence are their own segment and only the sequence's rows are returned, so that their keys are never seen
by a real query (causality hides them) and their own rows always see themselves.

On backends without the fused backward (the CPU, where the tests run) MLX differentiates the composed
formula per call, so the chunks' scores exist all at once: ``model/attention.py`` takes this path on CUDA
only and block-wise attention elsewhere.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from ..kernels.cuda.sdpa import additive_of, pad_sequence
from .mask import MaskRule, allowed, row_info
from .split import split


# Elements of one call's mask as MLX broadcasts it, (B g, H, C, (m + 1)C): kept under 2**31. Measured on an
# H100 (MLX 0.32.4), one call of 28 chunks of 1,024 queries against 5,120 keys with 32 heads (4.7e9 elements)
# ran out of 80 GB where 20 chunks (3.4e9) took 4.6 GB for forward and backward.
MAX_ELEMENTS = (1 << 31) - 1


def first_keys(window: int, chunk: int) -> int:
    """m: how many whole chunks before its own a chunk of ``chunk`` queries sees under ``window``."""
    return -(-(window - 1) // chunk)


def banded_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, rule: MaskRule,
                     chunk: int) -> mx.array:
    """q (B, H, L, D), k/v (B, Hkv, L, D) -> (B, H, L, D): attention without a cache under ``rule`` (which has
    a window), ``chunk`` query rows at a time (see the module docstring)."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    W = rule.window
    if W is None:
        raise ValueError("banded attention needs a sliding window")
    C = chunk
    m = first_keys(W, C)
    n = max(-(-L // C), m + 1)  # chunks after padding: at least one past the first m
    Lp = n * C
    if Lp > L:
        q, k, v = (pad_sequence(x, Lp) for x in (q, k, v))
    masked = rule.segment_ids is not None or rule.attention_mask is not None
    info = row_info(rule.segment_ids, rule.attention_mask, B, L, Lp) if masked else None

    # The chunks m .. n-1 folded into the batch, ``group`` chunks per call: queries (B g, H, C, D) against keys
    # (B g, Hkv, (m + 1)C, D). Every piece is taken by ``split`` (its gradient is one concatenation), never by a
    # slice of the sequence: a slice's gradient is an array of its whole input.
    K = (m + 1) * C
    group = max(1, MAX_ELEMENTS // (B * H * C * K))
    starts = list(range(m, n, group))  # the calls' first chunks
    sizes = [min(group, n - a) for a in starts]
    P = m * C
    q_parts = split(q, ([P] if P else []) + [a * C for a in starts[1:]], axis=2)  # the head's, then each call's
    # One piece per key chunk: in the backward pass a chunk's uses add up chunk-sized, then one concatenation.
    k_pieces, v_pieces = (split(x.reshape(B, Hkv, n, C, D), list(range(1, n)), axis=2) for x in (k, v))
    outs = []
    # The first mC tokens: their keys start at 0.
    if P:
        head_mask = "causal"  # no window cuts there when C divides W
        if masked or P > W:
            positions = mx.arange(P, dtype=mx.int32)[None]
            head_mask = additive_of(_allowed(info, positions, positions, W), q.dtype)  # (B or 1, 1, P, P)
        k_head, v_head = (mx.concatenate(pieces[:m], axis=2).reshape(B, Hkv, P, D) for pieces in (k_pieces, v_pieces))
        outs.append(mx.fast.scaled_dot_product_attention(q_parts.pop(0), k_head, v_head, scale=scale, mask=head_mask))
    if not masked:
        q_pos = m * C + mx.arange(C, dtype=mx.int32)[None]  # (1, C): chunk m, like every chunk after it
        band_mask = additive_of(_allowed(None, q_pos, mx.arange(K, dtype=mx.int32)[None], W), q.dtype)

    def bands(pieces):  # n x (B, Hkv, 1, C, D) -> per call [a, a + g): the keys [(a - m)C, (a + g)C) as
        # (B g, Hkv, (m + 1)C, D)
        for a, g in zip(starts, sizes):
            # shift i, query chunk c (a .. a + g - 1): key chunk c - m + i
            xs = mx.concatenate([pieces[c - m + i] for i in range(m + 1) for c in range(a, a + g)], axis=2)
            xs = xs.reshape(B, Hkv, m + 1, g, C, D).transpose(0, 3, 1, 2, 4, 5)  # (B, g, Hkv, m + 1, C, D)
            yield xs.reshape(B * g, Hkv, K, D)

    for a, g, qg, kg, vg in zip(starts, sizes, q_parts, bands(k_pieces), bands(v_pieces)):
        qg = qg.reshape(B, H, g, C, D).transpose(0, 2, 1, 3, 4).reshape(B * g, H, C, D)
        if masked:
            q_pos = mx.arange(a * C, (a + g) * C, dtype=mx.int32).reshape(g, C)  # (g, C)
            k_pos = ((mx.arange(a, a + g, dtype=mx.int32) - m) * C)[:, None] + mx.arange(K, dtype=mx.int32)[None]
            mask = additive_of(_allowed(info, q_pos, k_pos, W).reshape(B * g, 1, C, K), q.dtype)
        else:
            mask = band_mask  # (1, 1, C, K)
        out = mx.fast.scaled_dot_product_attention(qg, kg, vg, scale=scale, mask=mask)
        outs.append(out.reshape(B, g, H, C, D).transpose(0, 2, 1, 3, 4).reshape(B, H, g * C, D))
    out = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return out[:, :, :L] if Lp > L else out


def _allowed(info: Optional[mx.array], q_pos: mx.array, k_pos: mx.array, window: int) -> mx.array:
    """q_pos (N, Rq), k_pos (N, Rk) absolute positions -> (B or 1, N, Rq, Rk) booleans under ``model/mask.py``'s
    rule: causal, inside the window, same segment, key not padding (a padding query sees itself)."""
    qp, kp = q_pos[None, :, :, None], k_pos[None, :, None, :]  # (1, N, Rq, 1), (1, N, 1, Rk)
    if info is None:
        return allowed(qp, kp, window)
    seg, valid = info[:, 0], info[:, 1]  # (B, Lp)
    q_seg = mx.take(seg, q_pos, axis=1)[..., :, None]  # (B, N, Rq, 1)
    k_seg = mx.take(seg, k_pos, axis=1)[..., None, :]  # (B, N, 1, Rk)
    k_valid = mx.take(valid, k_pos, axis=1).astype(mx.bool_)[..., None, :]  # (B, N, 1, Rk)
    return allowed(qp, kp, window, q_seg, k_seg, k_valid)
