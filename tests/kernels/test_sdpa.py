"""``kernels/cuda/sdpa.py``: attention over a length padded to cuDNN's tile gives the same outputs and gradients
as over the real length (causal, packed segments, key padding), and the model's attention seam
(``model/attention.py``) pads only when training on CUDA without a cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from support import tiny_model
from mlx_qlora import settings
from mlx_qlora.model import attention as attention_seam
from mlx_qlora.kernels.cuda import sdpa
from mlx_qlora.model.mask import build_mask


def _qkv(L: int, seed: int = 0):
    mx.random.seed(seed)
    return (mx.random.normal((2, 4, L, 16)), mx.random.normal((2, 2, L, 16)), mx.random.normal((2, 2, L, 16)))


def _masks(L: int) -> dict:
    positions = mx.arange(L)
    cut = min(10, L - 2)
    segments = mx.array([[0] * cut + [1] * (L - cut), [0] * (L - 2) + [1] * 2])  # two packed rows each
    keep = mx.array([[1] * L, [0] * 3 + [1] * (L - 3)])  # left padding in the second row
    return {"causal": "causal",
            "segments": build_mask(positions, positions, None, segment_ids=segments),
            "window and key padding": build_mask(positions, positions, 8, attention_mask=keep)}


@pytest.mark.parametrize("name", ["causal", "segments", "window and key padding"])
@pytest.mark.parametrize("L", [37, 130])
def test_padded_attention_equals_attention(name, L):
    q, k, v = _qkv(L)
    mask = _masks(L)[name]
    cot = mx.random.normal(q.shape)

    def run(pad):
        return mx.vjp(lambda q, k, v: sdpa.attention(q, k, v, 0.25, mask, pad), [q, k, v], [cot])

    (want,), want_grads = run(False)
    (got,), got_grads = run(True)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("name", ["segments", "window and key padding"])
def test_on_cuda_a_boolean_mask_reaches_the_kernel_additive_at_its_own_shape(monkeypatch, name, pad):
    """MLX broadcasts a boolean mask to (B, H, L, S) before making it additive; handed an additive one, it keeps
    the mask's shape. Outputs and gradients equal those with the boolean mask (the CPU's formula, 1e-5)."""
    L = 37
    q, k, v = _qkv(L)
    mask = _masks(L)[name]
    cot = mx.random.normal(q.shape)
    seen = []
    real = mx.fast.scaled_dot_product_attention

    def spy(*args, mask=None, **kwargs):
        seen.append(mask)
        return real(*args, mask=mask, **kwargs)

    (want,), want_grads = mx.vjp(lambda q, k, v: sdpa.attention(q, k, v, 0.25, mask, pad), [q, k, v], [cot])
    monkeypatch.setattr(sdpa, "on_cuda", lambda: True)
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    (got,), got_grads = mx.vjp(lambda q, k, v: sdpa.attention(q, k, v, 0.25, mask, pad), [q, k, v], [cot])
    length = sdpa.padded_length(L) if pad else L
    assert seen[-1].dtype == q.dtype and seen[-1].shape == (*mask.shape[:2], length, length)
    allowed = np.array(sdpa.padded_mask(mask, L) if pad else mask)
    assert np.array_equal(np.array(seen[-1]) == 0, allowed) and np.all(np.isneginf(np.array(seen[-1])[~allowed]))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-5)


def test_padded_mask_hides_padded_keys_and_lets_padded_queries_see_themselves():
    mask = _masks(6)["segments"]
    padded = sdpa.padded_mask(mask, 6)
    assert padded.shape == (2, 1, 128, 128)
    assert mx.array_equal(padded[..., :6, :6], mask)
    assert not padded[..., :6, 6:].any().item()  # no real query sees a padded key
    assert mx.array_equal(padded[1, 0, 6:, 6:], mx.eye(122, dtype=mx.bool_))
    assert sdpa.padded_mask(mask.astype(mx.float32), 6) is None  # additive masks: left alone
    assert sdpa.padded_mask(None, 6) is None and sdpa.padded_length(128) == 128


def test_the_model_pads_only_when_training_on_cuda(monkeypatch):
    model = tiny_model(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       max_position_embeddings=32768, sliding_window=None)
    seen = []
    real = sdpa.attention
    monkeypatch.setattr(sdpa, "attention", lambda *a, pad: seen.append(pad) or real(*a, pad=pad))
    tokens = mx.array([[1, 2, 3, 4, 5]])
    monkeypatch.setattr(attention_seam, "on_cuda", lambda: True)
    model.train()
    mx.eval(model(tokens))
    model.eval()
    mx.eval(model(tokens))
    model.train()
    with settings.override(sdpa_pad=False):  # MLX_QLORA_SDPA_PAD=0
        mx.eval(model(tokens))
    monkeypatch.setattr(attention_seam, "on_cuda", lambda: False)
    mx.eval(model(tokens))
    assert seen == [True, False, False, False]
    model.eval()
    mx.eval(model(tokens, cache=model.make_cache()))  # with a cache: never padded
    monkeypatch.setattr(attention_seam, "on_cuda", lambda: True)
    model.train()
    mx.eval(model(tokens, cache=model.make_cache()))
    assert seen == [True, False, False, False, False, False]


def test_the_fused_kernel_runs_where_mlx_gives_cudnn_the_attention(monkeypatch):
    """MLX's conditions for cuDNN's attention: CUDA, compute capability 8.0 or newer, half precision, a head
    dimension that is a multiple of 8 up to 128."""
    from mlx_qlora.kernels.cuda import nvrtc

    def q(dtype=mx.bfloat16, D=128):
        return mx.zeros((1, 2, 4, D), dtype=dtype)

    monkeypatch.setattr(sdpa, "on_cuda", lambda: True)
    monkeypatch.setattr(nvrtc, "capability", lambda: (8, 0))
    assert sdpa.fused_kernel(q()) and sdpa.fused_kernel(q(mx.float16, 64))
    assert not sdpa.fused_kernel(q(mx.float32)) and not sdpa.fused_kernel(q(D=160))
    assert not sdpa.fused_kernel(q(D=100))
    monkeypatch.setattr(nvrtc, "capability", lambda: (7, 5))
    assert not sdpa.fused_kernel(q())
    monkeypatch.setattr(sdpa, "on_cuda", lambda: False)
    monkeypatch.setattr(nvrtc, "capability", lambda: (9, 0))
    assert not sdpa.fused_kernel(q())
