"""Causal attention as chunks of queries (``model/causal_chunks.py``) against one call of MLX's attention with
``build_mask``'s explicit (L, L) causal mask: outputs and gradients of q, k, v in float32 within 1e-5 (the CPU
runs MLX's composed formula for both); the chunk size rule; the seam (``model/attention.py``) takes it on
CUDA only, for plainly causal rules whose one call would cover more than ``causal_call_pairs`` pairs."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_qlora import settings
from mlx_qlora.kernels.cuda.sdpa import TILE
from mlx_qlora.model import attention
from mlx_qlora.model.causal_chunks import chunk_rows, chunked_causal_attention
from mlx_qlora.model.mask import MaskRule, build_mask
from support import assert_same_attention, attention_inputs, seam_calls

ATOL = 1e-5  # float32; observed differences are around 1e-6


def _plain(q, k, v, scale):
    positions = mx.arange(q.shape[2], dtype=mx.int32)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=build_mask(positions, positions, None))


@pytest.mark.parametrize("L, chunk, n_kv", [
    (300, 128, 2),  # padded to 384: three calls, the last of 128 rows of which 44 are real
    (256, 128, 4),  # no padding, two calls, no grouped heads
    (77, 128, 2),  # one call over the padded sequence
    (1300, 128, 1),  # eleven calls: the queries split in two levels (model/split.py)
    (640, 256, 2),  # a last chunk shorter than the others (256, 256, 128)
])
def test_outputs_and_gradients_equal_one_call(L, chunk, n_kv):
    q, k, v, weights = attention_inputs(B=2 if L < 1000 else 1, L=L, Hkv=n_kv)
    assert_same_attention(lambda q, k, v: chunked_causal_attention(q, k, v, 0.25, chunk),
                          lambda q, k, v: _plain(q, k, v, 0.25), q, k, v, weights, ATOL)


@pytest.mark.parametrize("length", [1, 127, 128, 300, 32768, 65536, 100_000, 131072, 262144, 1 << 20])
@pytest.mark.parametrize("pairs", [1, 128 * 128, 1 << 24, 1 << 30])
def test_a_call_covers_at_most_the_pairs_allowed_in_tiles(length, pairs):
    """C is a multiple of the tile; C x the padded length stays within ``pairs`` unless C is one tile; a
    sequence that fits in one call runs as one; a tile more would pass ``pairs``."""
    padded = -(-length // TILE) * TILE
    C = chunk_rows(length, pairs)
    assert C % TILE == 0 and TILE <= C <= padded
    if padded * padded <= pairs:
        assert C == padded
    else:
        assert C == TILE or C * padded <= pairs
        assert (C + TILE) * padded > pairs
    assert chunk_rows(65536, 1 << 30) == 16384 and chunk_rows(32768, 1 << 30) == 32768


@pytest.mark.parametrize("on_cuda", [True, False])
def test_the_seam_chunks_long_causal_attention_on_cuda_only(monkeypatch, on_cuda):
    q, k, v, _ = attention_inputs(L=300)
    q, k, v = (x.astype(mx.bfloat16) for x in (q, k, v))
    want = np.array(_plain(q, k, v, 0.25).astype(mx.float32))
    calls = seam_calls(monkeypatch, on_cuda)
    for pairs, rule, chunked in ((300 * 300 - 1, MaskRule(300, None), True),
                                 (300 * 300, MaskRule(300, None), False),  # one call covers them
                                 (0, MaskRule(300, None), False),  # 0: one call at any length
                                 (128, MaskRule(300, 512), True),  # a window past the sequence: causal
                                 (128, MaskRule(300, None, mx.zeros((2, 300), dtype=mx.int32)), False)):  # segments
        calls.clear()
        with settings.override(causal_call_pairs=pairs, blockwise_from=0, sdpa_pad=False):
            out = attention.scaled_dot_product_attention(q, k, v, 0.25, rule, training=True)
        assert calls == (["chunked_causal_attention"] if chunked and on_cuda else [])
        np.testing.assert_allclose(np.array(out.astype(mx.float32)), want, atol=2e-2, rtol=0)  # bfloat16
