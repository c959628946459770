"""A fixed-size key/value cache whose position is an array, so one compiled graph serves every step.

``KVCache`` grows its buffers and keeps the number of stored positions as a Python int, which makes the
shapes and the slices of each step different: a compiled function would be traced again for every token.
``StaticKVCache`` keeps buffers of a fixed ``capacity`` and the offset as an int32 array; the new keys are
written with ``mx.slice_update`` at slot ``offset % capacity`` and attention covers the whole buffer with a
mask that hides the slots not filled yet. Slots follow ``KVCache``'s convention (position ``p`` in slot
``p % capacity``), so a cache filled by the prompt can be copied over as it is.

The capacity must either hold every position of the generation or equal the sliding window: only then
does overwriting the oldest slot drop exactly the position that left the window.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .cache import KVCache

# Position given to slots that hold nothing yet: larger than any query position, so causality hides them.
EMPTY_SLOT = 1 << 30


class StaticKVCache:
    """One layer's buffers (B, n_kv_heads, capacity, head_dim) and ``offset`` (int32 scalar array)."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys = keys
        self.values = values
        self.offset = offset  # positions stored before this step

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def from_cache(cls, cache: KVCache, capacity: int) -> "StaticKVCache":
        """Copy a filled ``KVCache`` into buffers of ``capacity`` slots (see the module docstring)."""
        if cache.keys is None:
            raise ValueError("StaticKVCache.from_cache: the cache is empty (run the prompt first)")
        window = cache.max_size
        if window is not None and cache.offset > capacity and capacity != window:
            raise ValueError(f"capacity {capacity} must equal the window {window} once positions wrap around")
        if cache.offset > capacity and window is None:
            raise ValueError(f"capacity {capacity} is smaller than the {cache.offset} cached positions")
        n = min(cache.offset, cache.keys.shape[2], capacity)
        B, H, _, D = cache.keys.shape
        keys = mx.zeros((B, H, capacity, D), dtype=cache.keys.dtype)
        values = mx.zeros((B, H, capacity, D), dtype=cache.values.dtype)
        keys[:, :, :n, :] = cache.keys[:, :, :n, :]
        values[:, :, :n, :] = cache.values[:, :, :n, :]
        return cls(keys, values, mx.array(cache.offset, dtype=mx.int32))

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Store one new position; return the whole buffers and the position of every slot.

        keys, values: (B, n_kv_heads, 1, head_dim). Returns keys, values (B, n_kv_heads, C, head_dim) and
        positions (C,) int32, ``EMPTY_SLOT`` for slots not filled yet.
        """
        if keys.shape[2] != 1:
            raise ValueError(f"StaticKVCache stores one position per step, got {keys.shape[2]}")
        C = self.capacity
        slot = (self.offset % C).reshape(1)
        self.keys = mx.slice_update(self.keys, keys, slot, axes=(2,))
        self.values = mx.slice_update(self.values, values, slot, axes=(2,))
        # every layer computes the same positions: mx.compile keeps one copy of them
        return self.keys, self.values, slot_positions(self.offset, C)


def slot_positions(offset: mx.array, capacity: int) -> mx.array:
    """(capacity,) int32: the position each slot holds once position ``offset`` is written (the latest
    p <= offset with p % capacity == slot), ``EMPTY_SLOT`` where none is yet."""
    slots = mx.arange(capacity, dtype=mx.int32)
    positions = offset - ((offset - slots) % capacity)
    return mx.where(positions < 0, EMPTY_SLOT, positions)


def static_capacity(positions_needed: int, window: Optional[int], step: int = 256) -> int:
    """Slots for a generation that reaches ``positions_needed`` positions: rounded up to ``step`` (so that
    nearby lengths share one compiled graph), and never more than the sliding window."""
    capacity = ((positions_needed + step - 1) // step) * step
    return capacity if window is None else min(capacity, window)


def grown_capacity(positions_needed: int, window: Optional[int], previous: int = 0, step: int = 256) -> int:
    """Slots for the next turn of a conversation whose last compiled decoding had ``previous`` slots (0: none
    yet, then ``static_capacity``): kept while it holds the positions, else doubled until it does (never past
    the window). Each capacity is one traced graph, so a conversation whose turns each add a few hundred
    positions traces a new one only when the slot count doubles, not at every turn."""
    if not previous:
        return static_capacity(positions_needed, window, step)
    capacity = previous
    while capacity < positions_needed and capacity != window:
        capacity = capacity * 2 if window is None else min(capacity * 2, window)
    return capacity
