"""``model/split.py`` against slices: the same pieces and the same gradients for any number of cuts, and a
backward pass that keeps no array of the whole input per piece."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_qlora.model.split import split


def _slices(x, cuts, axis):
    bounds = [0] + cuts + [x.shape[axis]]
    index = [slice(None)] * x.ndim
    out = []
    for a, b in zip(bounds, bounds[1:]):
        index[axis] = slice(a, b)
        out.append(x[tuple(index)])
    return out


# no cut, one, nine (MLX's own split), 59 (three levels) and eleven uneven ones
@pytest.mark.parametrize("cuts", [[], [7], list(range(4, 40, 4)), list(range(1, 60)),
                                  [3, 5, 50, 51, 52, 53, 54, 55, 56, 57, 58]])
def test_pieces_and_gradients_equal_slices(cuts):
    x = mx.random.normal((2, 64, 3), key=mx.random.key(0))
    weights = [mx.random.normal((2, b - a, 3), key=mx.random.key(i + 1))
               for i, (a, b) in enumerate(zip([0] + cuts, cuts + [64]))]
    ours, theirs = split(x, cuts, axis=1), _slices(x, cuts, 1)
    assert len(ours) == len(theirs) == len(cuts) + 1
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.array(a), np.array(b))

    def loss(pieces_fn, x):
        return sum((p * w).sum() for p, w in zip(pieces_fn(x, cuts, 1), weights))

    g_ours = mx.grad(lambda x: loss(split, x))(x)
    g_theirs = mx.grad(lambda x: loss(_slices, x))(x)
    np.testing.assert_allclose(np.array(g_ours), np.array(g_theirs), atol=1e-6)


def test_the_backward_pass_holds_no_whole_array_per_piece():
    # 64 pieces: as slices, MLX's backward pass sums 64 arrays of the input's size; split concatenates.
    x = mx.random.normal((64 * 256, 512), key=mx.random.key(0))
    w = mx.random.normal((64 * 256, 512), key=mx.random.key(1))
    mx.eval(x, w)
    cuts = list(range(256, 64 * 256, 256))

    def peak(pieces_fn):
        f = lambda x: sum((p * q).sum() for p, q in zip(pieces_fn(x, cuts, 0), split(w, cuts, 0)))  # noqa: E731
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(f)(x))
        return (mx.get_peak_memory() - base) / x.nbytes

    ours = peak(split)
    assert ours <= 4.0, ours  # about 3: the pieces' gradients, their concatenation and a product
    assert peak(_slices) > 2 * ours  # slices: about 14 (MLX 0.32.4 on the CPU)
