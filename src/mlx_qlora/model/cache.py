"""Key/value cache for incremental decoding, with a rotating buffer for sliding-window attention.

Keys are stored after RoPE, so the order of slots does not matter to attention; what matters is which
positions are present. With a window W the slot of position p is ``p % W``, so the buffer never holds
more than the W most recent positions, which is all a sliding-window query can see.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

_STEP = 256  # growth of the unbounded buffer, in positions


class KVCache:
    """Per-layer cache. ``max_size`` is the sliding window (None: keep every position)."""

    def __init__(self, max_size: Optional[int] = None):
        self.max_size = max_size
        self.keys: Optional[mx.array] = None  # (B, n_kv_heads, capacity, head_dim)
        self.values: Optional[mx.array] = None
        self.offset = 0  # positions seen so far

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    def _slot_positions(self, n_slots: int) -> mx.array:
        """Absolute position held by each of the first ``n_slots`` slots (after ``offset`` positions).

        Built with MLX operations, so decoding steps that need no mask never compute it.
        """
        slots = mx.arange(n_slots, dtype=mx.int32)
        if self.max_size is None or self.offset <= self.max_size:
            return slots
        last = self.offset - 1
        return last - ((last - slots) % self.max_size)

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Add L new positions; return the keys/values the new queries attend to and their positions.

        keys, values: (B, n_kv_heads, L, head_dim). Returns keys, values (B, n_kv_heads, S, head_dim) and
        positions (S,) int32, the absolute position of each returned key.
        """
        B, H, L, D = keys.shape
        start = self.offset
        window = self.max_size
        if window is not None and start + L > window and not (L == 1 and start >= window):
            return self._update_overflow(keys, values)
        capacity = window if window is not None else None
        needed = start + L if window is None else min(start + L, window)
        if self.keys is None or self.keys.shape[2] < needed:
            if capacity is None:
                capacity = ((start + L + _STEP - 1) // _STEP) * _STEP
            new_k = mx.zeros((B, H, capacity, D), dtype=keys.dtype)
            new_v = mx.zeros((B, H, capacity, D), dtype=values.dtype)
            if self.keys is not None:
                n = self.keys.shape[2]
                new_k[:, :, :n, :] = self.keys
                new_v[:, :, :n, :] = self.values
            self.keys, self.values = new_k, new_v
        slot = start if window is None else start % window
        self.keys[:, :, slot : slot + L, :] = keys
        self.values[:, :, slot : slot + L, :] = values
        self.offset = start + L
        n_valid = self.offset if window is None else min(self.offset, window)
        return self.keys[:, :, :n_valid, :], self.values[:, :, :n_valid, :], self._slot_positions(n_valid)

    def _update_overflow(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Several new positions that push older ones out of the window: attend to all, keep the last W."""
        window = self.max_size
        n_old = min(self.offset, window)
        if n_old:
            old_pos = np.arange(self.offset - n_old, self.offset)
            order = mx.array(old_pos % window, dtype=mx.int32)  # slots in chronological order
            keys = mx.concatenate([mx.take(self.keys, order, axis=2), keys], axis=2)
            values = mx.concatenate([mx.take(self.values, order, axis=2), values], axis=2)
        first = self.offset - n_old
        self.offset += keys.shape[2] - n_old
        positions = np.arange(first, self.offset)
        kept = positions[-window:]
        # slot s must hold the kept position p with p % window == s
        take = mx.array(np.argsort(kept % window) + (len(positions) - len(kept)), dtype=mx.int32)
        self.keys = mx.take(keys, take, axis=2)
        self.values = mx.take(values, take, axis=2)
        return keys, values, mx.array(positions, dtype=mx.int32)
