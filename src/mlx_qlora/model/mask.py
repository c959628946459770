"""Attention masks: causal, sliding window, packed segments and key padding, as one boolean rule.

Query at position q may see key at position k when ``k <= q`` and ``k > q - window`` (Hugging Face
Mistral's window), both tokens are in the same segment (packing), and the key is not padding.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

Mask = Union[None, str, mx.array]


def build_mask(
    query_positions: mx.array,
    key_positions: mx.array,
    window: Optional[int] = None,
    segment_ids: Optional[mx.array] = None,
    attention_mask: Optional[mx.array] = None,
) -> mx.array:
    """Boolean mask (B or 1, 1, L, S); True where attention is allowed.

    query_positions (L,), key_positions (S,): absolute positions. segment_ids (B, L) when queries and keys
    are the same tokens. attention_mask (B, T) over all positions so far, 0 for padding.
    """
    q = query_positions[None, None, :, None]  # (1, 1, L, 1)
    k = key_positions[None, None, None, :]  # (1, 1, 1, S)
    q_seg = k_seg = valid = None
    if segment_ids is not None:
        q_seg, k_seg = segment_ids[:, None, :, None], segment_ids[:, None, None, :]  # (B, 1, L, 1), (B, 1, 1, L)
    if attention_mask is not None:
        # a static cache's empty slots (``EMPTY_SLOT``) and positions past the mask's length (a ring that
        # wrapped) read its last column: causality hides the former, the latter are past any left padding
        index = mx.minimum(key_positions, attention_mask.shape[1] - 1)
        valid = mx.take(attention_mask, index, axis=1).astype(mx.bool_)[:, None, None, :]  # (B, 1, 1, S)
    return allowed(q, k, window, q_seg, k_seg, valid)


def allowed(q: mx.array, k: mx.array, window: Optional[int] = None, q_seg: Optional[mx.array] = None,
            k_seg: Optional[mx.array] = None, k_valid: Optional[mx.array] = None) -> mx.array:
    """The rule itself, on arrays that broadcast against each other: query and key positions ``q`` and ``k``
    (absolute), the queries' and the keys' segment ids (packing; both or neither) and whether each key is a
    token (False: padding) -> booleans of the broadcast shape. Every mask of this package comes from here
    (``build_mask``; block-wise and banded attention chunk by chunk)."""
    ok = k <= q
    if window is not None:
        ok = ok & (k > q - window)
    if q_seg is not None:
        ok = ok & (q_seg == k_seg)
    if k_valid is not None:
        # A padding query would otherwise see no key at all and produce NaNs that reach later layers.
        ok = (ok & k_valid) | (k == q)
    return ok


def make_mask(
    length: int,
    offset: Union[int, mx.array],
    key_positions: Optional[mx.array],
    window: Optional[int],
    segment_ids: Optional[mx.array] = None,
    attention_mask: Optional[mx.array] = None,
) -> Mask:
    """The cheapest mask that is exact for ``length`` new tokens after ``offset`` cached ones.

    ``key_positions`` None means no cache: keys are the new tokens themselves. An array ``offset`` (a
    ``StaticKVCache``, whose buffers include empty slots) always gets a mask.
    """
    if key_positions is None:
        if segment_ids is None and attention_mask is None and (window is None or length <= window):
            return "causal"
        positions = mx.arange(length, dtype=mx.int32)
        return build_mask(positions, positions, window, segment_ids, attention_mask)
    if segment_ids is not None:
        raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
    if isinstance(offset, mx.array):
        query_positions = offset.astype(mx.int32) + mx.arange(length, dtype=mx.int32)
    elif length == 1 and attention_mask is None:
        return None  # the cache returns exactly the keys inside the window
    else:
        query_positions = mx.arange(offset, offset + length, dtype=mx.int32)
    return build_mask(query_positions, key_positions, window, None, attention_mask)


def row_info(segment_ids: Optional[mx.array], attention_mask: Optional[mx.array], batch: int, length: int,
             padded_length: Optional[int] = None) -> mx.array:
    """Segment ids (B, L) and the padding mask (B, L), either None, as one (B, 2, padded_length) int32 array
    for the chunked attentions (``blockwise.py``, ``banded.py``): each position's segment id (0 without
    packing) and whether it is a key (1) or padding (0). Positions from ``length`` on (a sequence padded to
    whole chunks) are one segment of their own (-1), keys."""
    seg = segment_ids if segment_ids is not None else mx.zeros((batch, length), dtype=mx.int32)
    valid = attention_mask if attention_mask is not None else mx.ones((batch, length), dtype=mx.int32)
    seg = mx.broadcast_to(seg.astype(mx.int32), (batch, length))
    valid = mx.broadcast_to(valid.astype(mx.int32), (batch, length))
    extra = (padded_length or length) - length
    if extra:
        seg = mx.concatenate([seg, mx.full((batch, extra), -1, dtype=mx.int32)], axis=1)
        valid = mx.concatenate([valid, mx.ones((batch, extra), dtype=mx.int32)], axis=1)
    return mx.stack([seg, valid], axis=1)


class MaskRule:
    """The mask of ``length`` tokens without a cache, kept as its inputs until a path needs the array.

    Block-wise attention (``model/blockwise.py``) evaluates the rule chunk by chunk and never builds the
    (L, L) array; ``dense()`` builds ``make_mask``'s mask once for the paths that take one.
    """

    def __init__(self, length: int, window: Optional[int], segment_ids: Optional[mx.array] = None,
                 attention_mask: Optional[mx.array] = None):
        self.length, self.window = length, window
        self.segment_ids, self.attention_mask = segment_ids, attention_mask
        self._dense: Mask = None
        self._built = False

    def causal_only(self) -> bool:
        """Whether the rule is plain causal attention (``dense()`` is ``"causal"``): no segments, no padding,
        and no window or one at least as long as the sequence."""
        return (self.segment_ids is None and self.attention_mask is None
                and (self.window is None or self.length <= self.window))

    def dense(self) -> Mask:
        """``make_mask(length, 0, None, window, segment_ids, attention_mask)``, built on the first call."""
        if not self._built:
            self._dense = make_mask(self.length, 0, None, self.window, self.segment_ids, self.attention_mask)
            self._built = True
        return self._dense
