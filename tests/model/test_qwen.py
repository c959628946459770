"""Qwen2 / Qwen2.5 and Qwen3 (dense) against transformers' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` on
tiny random checkpoints (norms and biases perturbed): float32 logits within 1e-4 absolute, tied and untied,
with and without a sliding window shorter than the sequence (on the layers from ``max_window_layers`` on),
batch > 1 with left padding, decoding one token at a time, and greedy generation token for token."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.generate.generator import generate, generate_batch
from mlx_qlora.model import ModelArgs, load_model
from support import assert_left_padding_matches, assert_logits_match, hf_reference, make_family_checkpoint

ATOL = 1e-4  # float32 logits
WINDOW = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
CONFIGS = {
    "qwen2-untied": ("qwen2", dict(num_key_value_heads=2)),
    # layer 0 full attention, layers 1 and 2 a window of 8
    "qwen2-tied-window": ("qwen2", dict(num_hidden_layers=3, tie_word_embeddings=True, **WINDOW)),
    # head_dim 24, not hidden / heads = 16
    "qwen3-untied": ("qwen3", dict(head_dim=24, num_key_value_heads=1)),
    "qwen3-tied-window-bias": ("qwen3", dict(head_dim=32, attention_bias=True, tie_word_embeddings=True,
                                             rope_theta=100000.0, **WINDOW)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen")
    return {name: make_family_checkpoint(root / name, arch, **kw) for name, (arch, kw) in CONFIGS.items()}


@pytest.fixture(params=list(CONFIGS))
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


_reference = hf_reference


def test_config_is_read_as_transformers_builds_it(checkpoint):
    """The features the decoder switches on follow the config: biases, q/k norms, head_dim, the window's
    layers (transformers' own ``layer_types``)."""
    ref = _reference(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    model = load_model(checkpoint)
    attn, ref_attn = model.layers[0].self_attn, ref.model.layers[0].self_attn
    assert ("bias" in attn.q_proj) == (ref_attn.q_proj.bias is not None)
    assert ("bias" in attn.o_proj) == (ref_attn.o_proj.bias is not None)
    assert ("q_norm" in attn) == hasattr(ref_attn, "q_norm")
    assert attn.head_dim == ref_attn.head_dim
    assert [layer.self_attn.sliding_window for layer in model.layers] == \
        [layer.self_attn.sliding_window for layer in ref.model.layers]
    assert model.args.tie_word_embeddings == config["tie_word_embeddings"]


@pytest.mark.parametrize("length", [7, 40])
def test_logits_match_transformers(checkpoint, length):
    """Batch 3; at length 40 the window (8) is far shorter than the sequence."""
    assert_logits_match(checkpoint, rows=3, length=length, atol=ATOL)


def test_the_window_matters(checkpoints):
    """Dropping the window of the windowed layers changes the logits past position 8 only: the parity
    above really covers the window, and only on the layers transformers gives it."""
    model = load_model(checkpoints["qwen2-tied-window"])
    ids = mx.array(np.random.default_rng(2).integers(0, 320, size=(1, 30)))
    windowed = np.array(model(ids))
    assert [layer.self_attn.sliding_window for layer in model.layers] == [None, 8, 8]
    model.args.sliding_window = None
    assert [layer.self_attn.sliding_window for layer in model.layers] == [None, None, None]
    full = np.array(model(ids))
    np.testing.assert_allclose(windowed[:, :8], full[:, :8], atol=1e-6)
    assert np.abs(windowed[:, 9:] - full[:, 9:]).max() > 1e-3


def test_left_padding_matches_transformers(checkpoint):
    assert_left_padding_matches(checkpoint, pads=(6, 0), length=30, atol=ATOL)

def test_incremental_decoding_matches_full_pass(checkpoint):
    """One token at a time and in uneven chunks; each layer's cache keeps its own window."""
    model = load_model(checkpoint)
    ids = np.random.default_rng(3).integers(0, 320, size=(2, 30))
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    assert [c.max_size for c in cache] == [layer.self_attn.sliding_window for layer in model.layers]
    steps = [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(30)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, a:b]), cache=cache)) for a, b in [(0, 12), (12, 13), (13, 30)]]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False])
def test_greedy_generation_matches_transformers(checkpoint, compiled):
    """30 new tokens after a 9-token prompt (past the window), through the compiled decoder (static caches
    of each layer's own capacity) and the plain one."""
    import torch

    ids = np.random.default_rng(9).integers(3, 320, size=9).tolist()
    out = _reference(checkpoint).generate(torch.tensor([ids]), attention_mask=torch.ones(1, 9, dtype=torch.long),
                                          do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    result = generate(load_model(checkpoint), None, ids, max_tokens=30, eos_ids=set(), compiled=compiled)
    assert result.tokens == out[0, 9:].tolist()


def test_batched_generation_with_left_padding_matches_transformers(checkpoints):
    """Two prompts of different lengths, left-padded as transformers pads them."""
    import torch

    path = checkpoints["qwen3-tied-window-bias"]
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (5, 11)]
    ids = np.zeros((2, 11), dtype=np.int64)
    mask = np.zeros((2, 11), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, 11 - len(p):], mask[row, 11 - len(p):] = p, 1
    out = _reference(path).generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                    max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    results = generate_batch(load_model(path), None, prompts, max_tokens=12, eos_ids=set())
    assert [r.tokens for r in results] == out[:, 11:].tolist()


def test_our_config_round_trips_and_transformers_reads_it_the_same(checkpoint):
    """``to_hf_config`` (a merged model's config.json) gives back the same ``ModelArgs``, and transformers
    builds from it the same attention layers (window per layer)."""
    import transformers

    args = load_model(checkpoint).args
    config = args.to_hf_config()
    assert ModelArgs.from_hf_config(config) == args
    ref = transformers.AutoConfig.for_model(**config)
    original = transformers.AutoConfig.from_pretrained(checkpoint)
    assert ref.layer_types == original.layer_types and ref.sliding_window == original.sliding_window
    assert type(ref).__name__ == type(original).__name__


def test_unsupported_family_is_one_line_naming_the_supported(tmp_path, checkpoints):
    path = tmp_path / "ckpt"
    path.mkdir()
    config = json.loads((checkpoints["qwen2-untied"] / "config.json").read_text())
    config["model_type"] = "qwen2_moe"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model_type: 'qwen2_moe' is not supported \(supported: mistral, llama, "
                                        r"qwen2, qwen3") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_bad_layer_types_are_refused(tmp_path, checkpoints):
    config = json.loads((checkpoints["qwen2-tied-window"] / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=r"layer_types: 2 entries for 3 layers"):
        ModelArgs.from_hf_config(config)


def test_fused_decode_leaves_qwen_layers_to_the_plain_path(monkeypatch, checkpoints):
    """The CUDA decode kernels have no q/k/v biases (Qwen2) and no per-head q/k norms (Qwen3): neither layer
    is taken by them, while a plain Llama layer of the same shape is (CUDA stood in for, as in
    test_llama3.py)."""
    from mlx_qlora import settings
    from mlx_qlora.kernels.cuda import attention as attention_cuda
    from mlx_qlora.kernels.cuda import qmv as qmv_cuda
    from mlx_qlora.model import fused_decode
    from mlx_qlora.model.modules import quantize_model
    from mlx_qlora.model.static_cache import StaticKVCache
    from support import tiny_model

    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "on_cuda", lambda: True)
    monkeypatch.setattr(attention_cuda, "supports_shapes", lambda *a: True)
    cache = StaticKVCache(mx.zeros((1, 2, 256, 16)), mx.zeros((1, 2, 256, 16)), mx.array(3))
    x = mx.zeros((1, 1, 64))
    applies = {}
    for name, overrides in {"llama": {}, "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True)}.items():
        model = tiny_model(seed=1, model_type=name, sliding_window=None, **overrides)
        quantize_model(model, bits=4)
        model.eval()
        with settings.override(fused_decode=True):
            applies[name] = fused_decode.applies(model.layers[0], x, cache)
    assert applies == {"llama": True, "qwen2": False, "qwen3": False}


@pytest.mark.parametrize("compiled", [True, False])
def test_a_conversation_reuses_caches_of_layers_with_different_windows(checkpoints, compiled):
    """Qwen2 with a full layer and two windowed ones (8): a ``PromptCache`` keeps each layer's cache with its
    own window and capacity, and every turn's reply equals a fresh pass token for token."""
    from mlx_qlora.generate.generator import PromptCache, generate_stream

    model = load_model(checkpoints["qwen2-tied-window"])
    rng = np.random.default_rng(12)
    cache, ids = PromptCache(), rng.integers(3, 320, size=9).tolist()
    for turn in range(3):
        run = list(generate_stream(model, None, ids, 10, eos_ids=set(), compiled=compiled, prompt_cache=cache))
        fresh = generate(model, None, ids, max_tokens=10, eos_ids=set(), compiled=compiled)
        assert [s.token for s in run] == fresh.tokens, turn
        assert run[-1].stats.reused_tokens == (0 if turn == 0 else len(ids) - 4)
        assert [c.max_size for c in cache.caches] == [None, 8, 8]
        ids = ids + fresh.tokens + rng.integers(3, 320, size=3).tolist()
