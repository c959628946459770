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


def test_segments_of_layers_hold_fewer_layer_inputs():
    # 16 LoRA-adapted layers over 512 tokens: checkpointed one by one, the backward pass starts with all 16
    # layer inputs held; in segments of 4, with 4 (one per segment) plus the 4 of the segment being recomputed,
    # so the peak drops by about 8 inputs (measured: 8.6-10.5 MB for 8 x 1.05 MB on MLX 0.32.4's CPU).
    from mlx_qlora import settings
    from mlx_qlora.config import LoRAConfig
    from mlx_qlora.lora import apply_lora
    from mlx_qlora.model import MistralForCausalLM, ModelArgs

    args = ModelArgs(model_type="mistral", vocab_size=64, hidden_size=512, intermediate_size=512,
                     num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                     rope_theta=10000.0)
    mx.random.seed(0)
    model = MistralForCausalLM(args)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    model.model.grad_checkpoint = True
    ids = mx.random.randint(0, 64, (1, 513))
    mx.eval(model.parameters(), ids)

    def peak(span):
        with settings.override(checkpoint_span=span, layer_tile=256):
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            loss = lambda m: nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()  # noqa: E731
            mx.eval(nn.value_and_grad(model, loss)(model))
            return mx.get_peak_memory() - base

    one_input = 512 * 512 * 4  # (1, 512, 512) float32
    peak(1)  # the first call's own buffers (MLX's caches) out of the comparison
    assert peak(1) - peak(4) >= 0.75 * 8 * one_input
