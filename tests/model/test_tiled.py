"""A decoder layer in tiles of tokens (``model/tiled.py``): the same logits and LoRA gradients as the whole
layer at once (float32, 1e-5), with and without gradient checkpointing, packed rows and a tile that does
not divide the length; and its activations do not grow with the sequence."""

from __future__ import annotations


import numpy as np
import pytest

import mlx.core as mx

from mlx_qlora import settings
from support import lora_loss_and_grads

ATOL = 1e-5  # float32; observed differences are around 1e-7


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("tile,blockwise_from", [(16, 0), (24, 32)])  # 70 tokens: 5 or 3 tiles
def test_tiles_give_the_whole_layers_loss_and_gradients(tiny_model, checkpoint, tile, blockwise_from):
    L = 70
    ids = mx.array(np.random.default_rng(0).integers(0, 320, size=(1, L)))
    segments = mx.array(np.repeat([0, 1], [45, L - 45])[None])
    positions = mx.array(np.concatenate([np.arange(45), np.arange(L - 45)])[None])
    results = []
    for layer_tile in (0, tile):  # 0: never tiled
        with settings.override(layer_tile=layer_tile, blockwise_share=0, blockwise_from=blockwise_from,
                               blockwise_block=16):
            results.append(lora_loss_and_grads(tiny_model(seed=3), ids, segments, positions, checkpoint))
    (plain_loss, plain), (tiled_loss, tiled) = results
    assert len(plain) == 2 * 7 * 2
    assert abs(plain_loss - tiled_loss) < 1e-5
    for key in plain:
        np.testing.assert_allclose(np.array(tiled[key]), np.array(plain[key]), atol=ATOL, rtol=0, err_msg=key)


def test_tiles_follow_plain_positions(tiny_model):
    """Without position ids every tile's rotary starts at its own offset: logits equal the whole layer's."""
    model = tiny_model(seed=1, sliding_window=None)
    ids = mx.array(np.random.default_rng(2).integers(0, 320, size=(2, 50)))
    with settings.override(layer_tile=0):
        whole = np.array(model(ids))
    with settings.override(layer_tile=12):
        tiled = np.array(model(ids))
    np.testing.assert_allclose(tiled, whole, atol=ATOL, rtol=0)


def _layer_peak(layer, length: int) -> int:
    from mlx_qlora.model.mask import MaskRule

    x = mx.random.normal((1, length, 64), key=mx.random.key(0))
    weights = mx.random.normal((1, length, 64), key=mx.random.key(1))
    rule = MaskRule(length, 16)

    def loss(params, x):
        layer.update(params)
        return mx.sum(layer(x, lambda *_: rule) * weights)

    grad = mx.grad(loss, argnums=(0, 1))
    mx.eval(grad(layer.trainable_parameters(), x))
    mx.reset_peak_memory()
    mx.eval(grad(layer.trainable_parameters(), x))
    return mx.get_peak_memory()


def test_tiles_bound_a_layers_activations(tiny_model):
    """CPU peak of one LoRA layer's forward and backward: from 1024 to 2048 tokens it grows by less than half
    as much in tiles of 128 as the whole layer (observed: 3.9 MB against 11.1 MB)."""
    from mlx_qlora.config import LoRAConfig
    from mlx_qlora.lora import apply_lora

    model = tiny_model(seed=0, max_position_embeddings=4096)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    layer = model.model.layers[0]
    growth = {}
    for tile in (0, 128):
        with settings.override(layer_tile=tile, blockwise_share=0, blockwise_from=1, blockwise_block=64):
            growth[tile] = _layer_peak(layer, 2048) - _layer_peak(layer, 1024)
    assert growth[128] < 0.5 * growth[0], growth


FAMILY_SWITCHES = {
    # Gemma 2: sandwich norms, GeGLU, 1 + weight norms, soft-capped scores, sliding and full layers
    "gemma2": dict(sandwich_norms=True, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0,
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                   layer_types=("sliding_attention", "full_attention")),
    # Gemma 3: q/k norms, a local RoPE base on the sliding layer
    "gemma3": dict(sandwich_norms=True, hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0, qk_norm=True,
                   rope_local_base_freq=500.0, layer_types=("full_attention", "sliding_attention")),
    "qwen2": dict(qkv_bias=True, layer_types=("full_attention", "sliding_attention")),
    "phi3": dict(fused_projections=True, partial_rotary_factor=0.5, sliding_window=None),
}


@pytest.mark.parametrize("family", list(FAMILY_SWITCHES))
def test_tiles_run_every_decoder_layer_variant(tiny_model, family):
    """The same loss and LoRA gradients on the plain path (dense masks, the soft-cap branch), block-wise
    (each layer's own window and the soft-cap inside the chunks) and block-wise in tiles."""
    L = 70
    ids = mx.array(np.random.default_rng(0).integers(0, 320, size=(1, L)))
    segments = mx.array(np.repeat([0, 1], [45, L - 45])[None])
    positions = mx.array(np.concatenate([np.arange(45), np.arange(L - 45)])[None])
    results = []
    for layer_tile, blockwise_from in ((0, 0), (0, 32), (24, 32)):  # 0: never tiled, never block-wise
        with settings.override(layer_tile=layer_tile, blockwise_share=0, blockwise_from=blockwise_from,
                               blockwise_block=16):
            model = tiny_model(seed=3, **FAMILY_SWITCHES[family])
            results.append(lora_loss_and_grads(model, ids, segments, positions))
    plain_loss, plain = results[0]
    assert len(plain) > 0
    for loss, grads in results[1:]:
        assert grads.keys() == plain.keys() and abs(plain_loss - loss) < 1e-5
        for key in plain:
            np.testing.assert_allclose(np.array(grads[key]), np.array(plain[key]), atol=ATOL, rtol=0, err_msg=key)


def test_longrope_layers_are_not_tiled(tiny_model):
    """longrope picks its factors from the whole call's length, which a tile does not know: refused."""
    from mlx_qlora.model import tiled

    model = tiny_model(rope_type="longrope", rope_short_factor=(1.0,) * 8, rope_long_factor=(2.0,) * 8,
                       rope_original_max_position_embeddings=32)
    x = mx.zeros((1, 40, 64))
    with settings.override(layer_tile=16):
        assert not tiled.applies(model.model.layers[0], x, None)
        assert tiled.applies(tiny_model().model.layers[0], x, None)
