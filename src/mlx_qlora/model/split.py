"""An array cut into many pieces along one axis whose gradient is one concatenation, not one array per piece.

The gradient of a slice is an array of the whole input (zeros but for the slice), so a long sequence taken
as n slices (attention's chunks, the loss's) costs n arrays of the whole sequence in the backward pass:
memory and work that grow as the square of the length. ``mx.split`` is one operation whose gradient is a
concatenation of the pieces' gradients, but MLX 0.32 makes it of slices from ten pieces on; ``split`` cuts
in levels of at most nine pieces instead.
"""

from __future__ import annotations

import mlx.core as mx


def split(x: mx.array, indices: list, axis: int) -> list[mx.array]:
    """``mx.split`` at ``indices`` whatever their number: MLX makes one split (whose gradient is one
    concatenation) of fewer than ten pieces and slices of more, so more are split in two levels or more."""
    indices = [int(i) for i in indices]
    if len(indices) < 9:
        return mx.split(x, indices, axis=axis) if indices else [x]
    per = -(-(len(indices) + 1) // 9)  # pieces per first-level part
    firsts = indices[per - 1::per]  # the first level's cuts, at most 8
    parts, out, start = mx.split(x, firsts, axis=axis), [], 0
    for part, stop in zip(parts, firsts + [None]):
        inner = [i - start for i in indices if start < i and (stop is None or i < stop)]
        out += split(part, inner, axis)
        start = stop
    return out
