"""Sliding-window attention as a band of chunks (``model/banded.py``) against the plain path: MLX's
``mx.fast.scaled_dot_product_attention`` with ``build_mask``'s (L, L) mask, outputs and gradients of q, k, v
in float32 within 1e-5 (the CPU runs MLX's composed formula for both); the seam (``model/attention.py``)
picks it on CUDA for windowed rules longer than their window, and keeps causal-only rules off the block-wise
path there."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_qlora import settings
from mlx_qlora.kernels.cuda import sdpa
from mlx_qlora.model import attention, banded
from mlx_qlora.model.banded import banded_attention, first_keys
from mlx_qlora.model.mask import MaskRule, build_mask
from support import (assert_same_attention, assert_same_lora_training, attention_inputs, left_padding,
                     lora_loss_and_grads, seam_calls)

ATOL = 1e-5  # float32; observed differences are around 1e-6


def _plain(q, k, v, scale, rule):
    positions = mx.arange(q.shape[2], dtype=mx.int32)
    mask = build_mask(positions, positions, rule.window, rule.segment_ids, rule.attention_mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _segments(L):  # row 0: three packed examples; row 1: two
    return mx.array(np.stack([np.repeat([0, 1, 2], [30, 45, L - 75]), np.repeat([0, 1], [60, L - 60])]))


CASES = {
    # name: (L, window, chunk, segments, padding, n_kv_heads)
    "window-divisible": (100, 48, 16, False, False, 2),  # m = 3: the first 48 tokens causal, then bands
    "window-not-divisible": (100, 40, 16, False, False, 2),  # m = 3: the first 48 tokens need the window
    "exact-multiple": (96, 32, 16, False, False, 4),
    "segments": (100, 48, 16, True, False, 2),
    "left-padding": (100, 24, 16, False, True, 2),
    "gqa4-segments-padding": (100, 20, 8, True, True, 1),
    "one-band-past-the-head": (50, 48, 16, False, False, 2),  # padded to 64 tokens: four chunks
    "many-calls": (100, 16, 8, True, False, 2),  # m = 2, 13 chunks: 11 calls of one (split in two levels)
}


@pytest.mark.parametrize("per_call", [None, 1, 2])  # chunks per call: as many as fit (all here), 1, 2
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_the_plain_path(monkeypatch, name, per_call):
    L, window, chunk, segments, padding, n_kv = CASES[name]
    if per_call is not None:  # a call takes per_call chunks of (B, H, chunk, (m + 1) chunk) mask elements
        m = first_keys(window, chunk)
        monkeypatch.setattr(banded, "MAX_ELEMENTS", per_call * 2 * 4 * chunk * (m + 1) * chunk)
    q, k, v, weights = attention_inputs(L=L, Hkv=n_kv)
    rule = MaskRule(L, window, _segments(L) if segments else None, left_padding(L) if padding else None)

    ours_fn = lambda q, k, v: banded_attention(q, k, v, 0.25, rule, chunk)  # noqa: E731
    plain_fn = lambda q, k, v: _plain(q, k, v, 0.25, rule)  # noqa: E731
    assert_same_attention(ours_fn, plain_fn, q, k, v, weights, ATOL)


def test_a_chunk_sees_exactly_the_chunks_its_window_reaches():
    """m = ceil((W - 1) / C): the earliest query of a chunk reaches back W - 1 positions."""
    assert first_keys(4096, 1024) == 4 and first_keys(4097, 1024) == 4 and first_keys(4098, 1024) == 5
    assert first_keys(48, 16) == 3 and first_keys(40, 16) == 3 and first_keys(1, 16) == 0


def test_the_window_is_applied_in_the_backward_pass_too():
    q, k, v, weights = attention_inputs(L=64)
    rule = MaskRule(64, 8)
    grad = mx.grad(lambda k: mx.sum((banded_attention(q, k, v, 0.25, rule, 16) * weights)[:, :, 40:41]))(k)
    assert float(mx.abs(grad[:, :, :33]).max()) == 0.0 and float(mx.abs(grad[:, :, 41:]).max()) == 0.0
    assert float(mx.abs(grad[:, :, 33]).max()) > 0.0 and float(mx.abs(grad[:, :, 40]).max()) > 0.0


@pytest.mark.parametrize("on_cuda", [True, False])
def test_the_seam_takes_the_band_on_cuda_for_windows_narrower_than_the_sequence(monkeypatch, on_cuda):
    q, k, v, _ = attention_inputs(L=100)
    q, k, v = (x.astype(mx.bfloat16) for x in (q, k, v))
    calls = seam_calls(monkeypatch, on_cuda)
    want = np.array(_plain(q, k, v, 0.25, MaskRule(100, 48)).astype(mx.float32))
    with settings.override(attention_chunk=128, blockwise_from=0, sdpa_pad=False):
        wide = MaskRule(100, 128)  # the window covers the sequence: plain causal attention
        attention.scaled_dot_product_attention(q, k, v, 0.25, wide, training=True)
        rule = MaskRule(100, 48)
        out = attention.scaled_dot_product_attention(q, k, v, 0.25, rule, training=True)
    assert calls == (["banded_attention"] if on_cuda else [])
    assert rule._built is not on_cuda  # on CUDA no (L, L) mask was made
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), want, atol=2e-2, rtol=0)  # bfloat16
    calls.clear()
    with settings.override(attention_chunk=0, blockwise_from=0, sdpa_pad=False):  # 0: never
        attention.scaled_dot_product_attention(q, k, v, 0.25, MaskRule(100, 48), training=True)
    assert calls == []
    for up_to, banded_ in ((99, False), (100, True), (0, True)):  # longer than up_to: block-wise; 0: no bound
        calls.clear()
        with settings.override(attention_chunk=128, attention_chunk_up_to=up_to, blockwise_from=1,
                               blockwise_share=0, blockwise_block=16, sdpa_pad=False):
            attention.scaled_dot_product_attention(q, k, v, 0.25, MaskRule(100, 48), training=True)
        assert calls == (["banded_attention" if banded_ else "blockwise_attention"] if on_cuda
                         else ["blockwise_attention"])


def test_gpus_before_compute_capability_8_keep_the_blockwise_path(monkeypatch):
    """cuDNN's fused attention needs compute capability 8.0: on an older GPU MLX would compose the band's
    scores, so the seam takes block-wise attention as on other backends."""
    q, k, v, _ = attention_inputs(L=100)
    q, k, v = (x.astype(mx.bfloat16) for x in (q, k, v))
    for capability, path in (((7, 5), "blockwise_attention"), ((8, 0), "banded_attention")):
        calls = seam_calls(monkeypatch, True, capability)
        with settings.override(attention_chunk=128, blockwise_from=1, blockwise_share=0, blockwise_block=16,
                               sdpa_pad=False):
            attention.scaled_dot_product_attention(q, k, v, 0.25, MaskRule(100, 48), training=True)
            attention.scaled_dot_product_attention(q, k, v, 0.25, MaskRule(100, None), training=True)
        assert calls == ([path, path] if path == "blockwise_attention" else [path])
        monkeypatch.undo()


@pytest.mark.parametrize("on_cuda", [True, False])
def test_causal_only_rules_stay_off_the_blockwise_path_on_cuda(monkeypatch, on_cuda):
    """The fused causal kernel holds no scores: on CUDA a causal rule runs plain past every threshold; rules
    with segments, and any rule on other backends, still go block-wise."""
    q, k, v, _ = attention_inputs(L=64)
    q, k, v = (x.astype(mx.bfloat16) for x in (q, k, v))
    calls = seam_calls(monkeypatch, on_cuda)
    with settings.override(blockwise_from=1, blockwise_share=0, blockwise_block=16, sdpa_pad=False):
        attention.scaled_dot_product_attention(q, k, v, 0.25, MaskRule(64, None), training=True)
        assert calls == ([] if on_cuda else ["blockwise_attention"])
        calls.clear()
        packed = MaskRule(64, None, mx.array([[0] * 30 + [1] * 34] * 2))
        attention.scaled_dot_product_attention(q, k, v, 0.25, packed, training=True)
        assert calls == ["blockwise_attention"]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_model_trains_the_same_with_the_band(monkeypatch, tiny_model, checkpoint):
    """Loss and every LoRA gradient of a packed row (window 200, two segments, 400 tokens) with the seam taking
    the band of 128-query chunks (the backend and dtype checks passed as on CUDA) and with the dense mask."""
    L, first = 400, 250
    ids = mx.array(np.random.default_rng(0).integers(0, 320, size=(1, L)))
    segments = mx.array(np.repeat([0, 1], [first, L - first])[None])
    positions = mx.array(np.concatenate([np.arange(first), np.arange(L - first)])[None])
    results = []
    calls = seam_calls(monkeypatch, True)
    monkeypatch.setattr(sdpa, "fused_kernel", lambda q: True)  # float32 here: as if half precision
    for chunk in (0, 128):  # 0: never the band
        with settings.override(attention_chunk=chunk, blockwise_from=0, layer_tile=0, sdpa_pad=False):
            model = tiny_model(seed=3, sliding_window=200, max_position_embeddings=512)
            results.append(lora_loss_and_grads(model, ids, segments, positions, checkpoint))
    assert calls and set(calls) == {"banded_attention"}
    assert_same_lora_training(results, ATOL)
