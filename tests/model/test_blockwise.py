"""Block-wise attention (``model/blockwise.py``) against the plain path: MLX's
``mx.fast.scaled_dot_product_attention`` with ``build_mask``'s (L, L) mask, outputs and gradients of q, k, v
in float32 within 1e-5; the seam (``model/attention.py``) picks it by length; a model gives the same logits
and LoRA gradients on either path, and transformers' logits past the window."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_qlora import settings
from mlx_qlora.model.attention import blockwise_block, scaled_dot_product_attention
from mlx_qlora.model.blockwise import blockwise_attention
from mlx_qlora.model.mask import MaskRule, build_mask
from support import assert_same_attention, assert_same_lora_training, attention_inputs, left_padding, lora_loss_and_grads

ATOL = 1e-5  # float32; observed differences are around 1e-6


def _plain(q, k, v, scale, window, segment_ids, attention_mask):
    positions = mx.arange(q.shape[2], dtype=mx.int32)
    mask = build_mask(positions, positions, window, segment_ids, attention_mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _segments(L):
    # row 0: three packed examples; row 1: two
    return mx.array(np.stack([np.repeat([0, 1, 2], [30, 20, L - 50]), np.repeat([0, 1], [50, L - 50])]))


CASES = {
    # name: (window, segments, padding, n_kv_heads)
    "causal": (None, False, False, 4),
    "window": (20, False, False, 4),
    "segments": (None, True, False, 2),
    "left-padding": (None, False, True, 2),
    "gqa4-window-segments-padding": (13, True, True, 1),
}


@pytest.mark.parametrize("block", [16, 32, 100])  # L = 77: not a multiple of 16 or 32; 100: one chunk
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_the_plain_path(name, block):
    window, segments, padding, n_kv = CASES[name]
    q, k, v, weights = attention_inputs(Hkv=n_kv)
    L = q.shape[2]
    seg = _segments(L) if segments else None
    pad = left_padding(L) if padding else None

    ours_fn = lambda q, k, v: blockwise_attention(q, k, v, 0.25, window, seg, pad, block=block)  # noqa: E731
    plain_fn = lambda q, k, v: _plain(q, k, v, 0.25, window, seg, pad)  # noqa: E731
    assert_same_attention(ours_fn, plain_fn, q, k, v, weights, ATOL)


def test_bfloat16_stays_within_half_precision_of_the_float32_plain_path():
    """bfloat16 inputs: outputs and gradients within 3e-2 of the plain path in float32 on the same (rounded)
    inputs; the scores and softmax are float32 inside, the products bfloat16."""
    q, k, v, weights = [a.astype(mx.bfloat16) for a in attention_inputs(Hkv=2)]
    seg = _segments(q.shape[2])

    def grads(fn, *arrays):
        return mx.grad(lambda q, k, v: mx.sum(fn(q, k, v).astype(mx.float32) * weights.astype(mx.float32)),
                       argnums=(0, 1, 2))(*arrays)

    ours = lambda q, k, v: blockwise_attention(q, k, v, 0.25, 20, seg, block=32)  # noqa: E731
    plain = lambda q, k, v: _plain(q, k, v, 0.25, 20, seg, None)  # noqa: E731
    wide = [a.astype(mx.float32) for a in (q, k, v)]
    assert ours(q, k, v).dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(ours(q, k, v).astype(mx.float32)), np.array(plain(*wide)), atol=3e-2)
    for a, b in zip(grads(ours, q, k, v), grads(plain, *wide)):
        assert a.dtype == mx.bfloat16
        np.testing.assert_allclose(np.array(a.astype(mx.float32)), np.array(b), atol=3e-2 * float(mx.abs(b).max()))


@pytest.mark.parametrize("name", ["causal", "gqa4-window-segments-padding"])
def test_softcapped_scores_equal_the_plain_softcap_branch(name):
    """Gemma 2's soft-cap inside the chunks: outputs and gradients equal ``softcapped_attention`` (the plain
    formula of transformers' eager Gemma 2 attention) over the dense mask, cap 2 so that it bends the scores."""
    from mlx_qlora.model.attention import softcapped_attention

    window, segments, padding, n_kv = CASES[name]
    q, k, v, weights = attention_inputs(Hkv=n_kv)
    q = q * 3  # scores well past the cap
    L = q.shape[2]
    seg = _segments(L) if segments else None
    pad = left_padding(L) if padding else None
    positions = mx.arange(L, dtype=mx.int32)
    mask = build_mask(positions, positions, window, seg, pad)
    ours_fn = lambda q, k, v: blockwise_attention(q, k, v, 0.25, window, seg, pad, block=16, softcap=2.0)  # noqa: E731
    plain_fn = lambda q, k, v: softcapped_attention(q, k, v, 0.25, mask, 2.0)  # noqa: E731
    uncapped = blockwise_attention(q, k, v, 0.25, window, seg, pad, block=16)
    assert float(mx.abs(uncapped - plain_fn(q, k, v)).max()) > 1e-2  # the cap matters here
    np.testing.assert_allclose(np.array(ours_fn(q, k, v)), np.array(plain_fn(q, k, v)), atol=ATOL, rtol=0)
    loss = lambda fn: lambda q, k, v: mx.sum(fn(q, k, v) * weights)  # noqa: E731
    ours = mx.grad(loss(ours_fn), argnums=(0, 1, 2))(q, k, v)
    plain = mx.grad(loss(plain_fn), argnums=(0, 1, 2))(q, k, v)
    for name_, a, b in zip("qkv", ours, plain):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=ATOL, rtol=0, err_msg=f"d{name_}")


def test_the_seam_gives_a_softcapped_rule_to_blockwise_from_the_threshold():
    q, k, v, _ = attention_inputs(L=40)
    rule = MaskRule(40, None)
    with settings.override(blockwise_share=0, blockwise_from=41):
        below = scaled_dot_product_attention(q, k, v, 0.25, rule, training=True, softcap=2.0)
    fresh = MaskRule(40, None)
    with settings.override(blockwise_share=0, blockwise_from=40, blockwise_block=16):
        above = scaled_dot_product_attention(q, k, v, 0.25, fresh, training=True, softcap=2.0)
        assert not fresh._built
    np.testing.assert_allclose(np.array(above), np.array(below), atol=ATOL)


def test_the_window_is_applied_in_the_backward_pass_too():
    """An invariant: with window 8, a loss over the queries before 40 gives keys 40.. no gradient, key 39 some."""
    q, k, v, weights = attention_inputs(L=64)
    grad = mx.grad(lambda k: mx.sum((blockwise_attention(q, k, v, 0.25, 8, block=16) * weights)[:, :, :40]))(k)
    assert float(mx.abs(grad[:, :, 40:]).max()) == 0.0
    assert float(mx.abs(grad[:, :, 39]).max()) > 0.0


def test_the_seam_picks_blockwise_from_the_threshold_on():
    q, k, v, _ = attention_inputs(L=40)
    rule = MaskRule(40, 8, mx.array([[0] * 25 + [1] * 15] * 2))
    plain = np.array(_plain(q, k, v, 0.25, 8, rule.segment_ids, None))
    with settings.override(blockwise_share=0, blockwise_from=41):  # below: the dense mask and MLX's kernel
        below = scaled_dot_product_attention(q, k, v, 0.25, rule, training=True)
        assert rule._built
    fresh = MaskRule(40, 8, rule.segment_ids)
    with settings.override(blockwise_share=0, blockwise_from=40, blockwise_block=16):
        above = scaled_dot_product_attention(q, k, v, 0.25, fresh, training=True)
        assert not fresh._built  # no (L, L) mask was made
    np.testing.assert_allclose(np.array(below), plain, atol=ATOL)
    np.testing.assert_allclose(np.array(above), plain, atol=ATOL)


def test_from_the_threshold_plain_attention_runs_while_its_scores_fit_the_memory_share():
    """``uses_blockwise``: below the threshold never; from it on, block-wise exactly where two (B*H, L, L)
    score arrays exceed the share of MLX's memory limit (a share of 0: always); and the seam follows it (no
    (L, L) mask built on the block-wise side)."""
    from mlx_qlora.model.attention import plain_scores_bytes, uses_blockwise

    limit = mx.get_memory_limit()
    assert plain_scores_bytes(32, 8192, 2) == 2 * 32 * 8192 * 8192 * 2
    fits = int((0.4 * limit / (2 * 32 * 2)) ** 0.5)  # the longest length whose scores fit 40% of the limit
    with settings.override(blockwise_from=1024, blockwise_share=0.4):
        assert not uses_blockwise(1000, 32, 2)
        assert not uses_blockwise(fits, 32, 2) and uses_blockwise(fits + 1, 32, 2)
        assert uses_blockwise(fits, 64, 2)  # twice the rows: twice the scores
    with settings.override(blockwise_from=1024, blockwise_share=0):
        assert uses_blockwise(1024, 1, 2) and not uses_blockwise(1023, 1, 2)
    q, k, v, _ = attention_inputs(L=40)
    for share, blockwise in ((0.4, False), (0.0, True)):
        rule = MaskRule(40, 8, None)
        with settings.override(blockwise_from=40, blockwise_share=share, blockwise_block=16):
            scaled_dot_product_attention(q, k, v, 0.25, rule, training=True)
        assert rule._built is not blockwise


def test_full_attention_chunks_shrink_to_the_score_budget():
    with settings.override(blockwise_block=512):
        assert blockwise_block(32, 8192, 4096) == 512  # windowed: 32 x 512 x 4608 scores fit
        assert blockwise_block(32, 32768, None) == 128  # full attention: 32 x 128 x 32768 = 2^27 scores
        assert blockwise_block(32, 131072, None) == 64  # never below 64, even past the budget


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_model_trains_the_same_on_either_path(tiny_model, checkpoint):
    """Loss and every LoRA gradient of a packed row (window 16, two segments, 70 tokens) on both paths."""
    L = 70
    ids = mx.array(np.random.default_rng(0).integers(0, 320, size=(1, L)))
    segments = mx.array(np.repeat([0, 1], [45, L - 45])[None])
    positions = mx.array(np.concatenate([np.arange(45), np.arange(L - 45)])[None])
    results = []
    for threshold in (0, 32):  # 0: never block-wise
        with settings.override(blockwise_share=0, blockwise_from=threshold, blockwise_block=16, layer_tile=0):
            results.append(lora_loss_and_grads(tiny_model(seed=3), ids, segments, positions, checkpoint))
    assert_same_lora_training(results, ATOL)


def test_blockwise_logits_match_transformers_past_the_window(tiny_hf_checkpoint):
    """The independent reference: transformers' Mistral (window 16) on 50 tokens, our model block-wise."""
    import torch
    import transformers

    from mlx_qlora.model import load_model

    ids = np.random.default_rng(1).integers(0, 320, size=(2, 50))
    with settings.override(blockwise_share=0, blockwise_from=1, blockwise_block=16):
        ours = np.array(load_model(tiny_hf_checkpoint)(mx.array(ids)))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)  # test_decoder.py's tolerance for logits


def _training_peak(model, length: int) -> int:
    from mlx_qlora.train.step import make_grad_fn

    grad = make_grad_fn(model, chunk=256, packed=False, compile=False)
    ids = mx.random.randint(0, 320, (1, length + 1), key=mx.random.key(length))
    mx.eval(grad(ids, ids))
    peaks = []
    for _ in range(2):  # the smaller of two: the evaluation order, and so the peak, can vary a little
        mx.reset_peak_memory()
        mx.eval(grad(ids, ids))
        peaks.append(mx.get_peak_memory())
    return min(peaks)


@pytest.mark.parametrize("layer_tile", [0, 128])  # the whole layer at once, or in tiles (model/tiled.py)
def test_training_memory_grows_linearly_with_the_length(tiny_model, layer_tile):
    """CPU peak of a checkpointed LoRA step at L/2, L, 2L (block-wise attention; layers whole or in tiles): the
    growth from L to 2L is about twice the growth from L/2 to L (ratio 2 if linear, 4 if quadratic; observed
    2.0, but once above 2.4 among the other tests; the plain path gives 3.5)."""
    from mlx_qlora.config import LoRAConfig
    from mlx_qlora.lora import apply_lora

    model = tiny_model(seed=0, max_position_embeddings=4096)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    model.model.grad_checkpoint = True
    with settings.override(blockwise_share=0, blockwise_from=1, blockwise_block=32, layer_tile=layer_tile):
        peaks = [_training_peak(model, length) for length in (256, 512, 1024)]
    ratio = (peaks[2] - peaks[1]) / (peaks[1] - peaks[0])
    assert ratio < 2.8, (peaks, ratio)
