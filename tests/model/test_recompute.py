"""Gradient checkpointing (``model/recompute.py``): same gradients as the plain function, compiled or not,
and activations that are not kept for the backward pass."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qlora.model.recompute import checkpoint


def _blocks(n, dim, hidden, seed=0):
    mx.random.seed(seed)
    blocks = [nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(n)]
    mx.eval([b.parameters() for b in blocks])
    return blocks


def _loss(blocks, ckpt):
    def loss(params, x):
        for block, p in zip(blocks, params):
            if ckpt:
                def run(q, h, block=block):
                    block.update(q)
                    return h + block(h)

                x = checkpoint(run)(p, x)
            else:
                block.update(p)
                x = x + block(x)
        return (x * x).mean()

    return loss


def _grads(blocks, ckpt, compiled=False):
    params = [b.trainable_parameters() for b in blocks]
    x = mx.random.normal((16, 32), key=mx.random.key(1))
    fn = mx.value_and_grad(_loss(blocks, ckpt), argnums=(0, 1))
    if compiled:
        fn = mx.compile(fn)
    value, (g_params, g_x) = fn(params, x)
    mx.eval(value, g_params, g_x)
    return value, dict(tree_flatten(g_params)), g_x


def test_checkpoint_gradients_equal_the_plain_function():
    blocks = _blocks(3, 32, 64)
    v0, p0, x0 = _grads(blocks, ckpt=False)
    v1, p1, x1 = _grads(blocks, ckpt=True)
    assert p0.keys() == p1.keys() and len(p0) == 12
    np.testing.assert_allclose(np.array(v1), np.array(v0), rtol=1e-6)
    np.testing.assert_allclose(np.array(x1), np.array(x0), atol=1e-7)
    for key in p0:
        np.testing.assert_allclose(np.array(p1[key]), np.array(p0[key]), atol=1e-7, err_msg=key)


def test_checkpoint_under_compile_gives_the_same_gradients():
    blocks = _blocks(2, 32, 64, seed=3)
    _, p0, x0 = _grads(blocks, ckpt=False)
    _, p1, x1 = _grads(blocks, ckpt=True, compiled=True)
    np.testing.assert_allclose(np.array(x1), np.array(x0), atol=1e-7)
    for key in p0:
        np.testing.assert_allclose(np.array(p1[key]), np.array(p0[key]), atol=1e-7, err_msg=key)


def _peak(blocks, ckpt):
    # Only the input is trained: the per-block activations, not weight gradients, decide the peak.
    x = mx.random.normal((2048, 64), key=mx.random.key(2))
    params = [b.trainable_parameters() for b in blocks]
    grad = mx.grad(lambda x: _loss(blocks, ckpt)(params, x))
    mx.eval(grad(x))
    mx.reset_peak_memory()
    mx.eval(grad(x))
    return mx.get_peak_memory()


@pytest.mark.slow  # 16 blocks of (2048, 1024) activations, forward and backward twice
def test_checkpoint_does_not_keep_the_activations():
    # Each block makes a (2048, 1024) float32 activation (8 MB) twice over: 16 blocks hold ~250 MB of
    # them without checkpointing; with it only the (2048, 64) block inputs (0.5 MB each) remain.
    blocks = _blocks(16, 64, 1024, seed=4)
    plain, ckpt = _peak(blocks, False), _peak(blocks, True)
    assert ckpt < 0.5 * plain, (ckpt, plain)
