"""Our decoder against transformers' Mistral/Llama on tiny random checkpoints (float32, 1e-4 absolute)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_qlora.errors import UserError
from mlx_qlora.model import ModelArgs, load_model
from support import assert_left_padding_matches

ATOL = 1e-4  # float32 logits; observed differences are around 1e-6

CONFIGS = {
    # name: (arch, overrides)
    "gqa1-window8": ("mistral", dict(num_key_value_heads=4, sliding_window=8)),
    "gqa2-window16": ("mistral", dict(num_key_value_heads=2, sliding_window=16)),
    "gqa4-headdim24-theta1e6": ("mistral", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                                rope_theta=1e6, sliding_window=12)),
    "no-window-tied": ("mistral", dict(sliding_window=None, tie_word_embeddings=True)),
    "llama": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0)),
}


def _reference_logits(path, ids, attention_mask=None):
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        return ref(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [6, 40])
def test_logits_match_transformers(hf_checkpoint_factory, name, length):
    arch, overrides = CONFIGS[name]
    path = hf_checkpoint_factory(name, arch=arch, **overrides)
    ids = np.random.default_rng(1).integers(0, 320, size=(3, length))
    ours = np.array(load_model(path)(mx.array(ids)))
    ref = _reference_logits(path, ids)
    assert ours.shape == ref.shape == (3, length, 320)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_window_changes_logits_past_the_window(hf_checkpoint_factory):
    """The sliding window is really applied: disabling it changes logits only after `window` tokens."""
    path = hf_checkpoint_factory("gqa2-window16", **CONFIGS["gqa2-window16"][1])
    model = load_model(path)
    ids = mx.array(np.random.default_rng(2).integers(0, 320, size=(1, 40)))
    windowed = np.array(model(ids))
    model.args.sliding_window = None
    full = np.array(model(ids))
    model.args.sliding_window = 16
    np.testing.assert_allclose(windowed[:, :16], full[:, :16], atol=1e-6)
    assert np.abs(windowed[:, 17:] - full[:, 17:]).max() > 1e-3


@pytest.mark.parametrize("name", ["gqa1-window8", "no-window-tied"])
def test_incremental_decoding_matches_full_pass(hf_checkpoint_factory, name):
    arch, overrides = CONFIGS[name]
    model = load_model(hf_checkpoint_factory(name, arch=arch, **overrides))
    ids = np.random.default_rng(3).integers(0, 320, size=(2, 30))
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(30)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    if model.args.sliding_window:  # the rotating buffer never grows past the window
        assert cache[0].keys.shape[2] == model.args.sliding_window
    # prompt chunks that overflow the window, then single tokens
    cache = model.make_cache()
    chunks = [(0, 5), (5, 19), (19, 20), (20, 30)]
    pieces = [np.array(model(mx.array(ids[:, a:b]), cache=cache)) for a, b in chunks]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_left_padding_matches_transformers(hf_checkpoint_factory):
    path = hf_checkpoint_factory("gqa2-window16", **CONFIGS["gqa2-window16"][1])
    assert_left_padding_matches(path, pads=(5, 0), length=24, atol=ATOL)

def test_packed_segments_equal_separate_examples(tiny_hf_checkpoint):
    model = load_model(tiny_hf_checkpoint)
    rng = np.random.default_rng(5)
    lengths = [7, 12, 9]
    examples = [rng.integers(0, 320, size=n) for n in lengths]
    row = np.concatenate(examples)[None]
    segments = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = np.array(model(mx.array(row), position_ids=mx.array(positions), segment_ids=mx.array(segments)))
    start = 0
    for ex in examples:
        alone = np.array(model(mx.array(ex[None])))
        np.testing.assert_allclose(packed[:, start : start + len(ex)], alone, atol=1e-5)
        start += len(ex)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_hf_checkpoint):
    model = load_model(tiny_hf_checkpoint)
    ids = mx.array(np.random.default_rng(6).integers(0, 320, size=(2, 20)))

    def loss_fn(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    plain = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))
    model.model.grad_checkpoint = True
    ckpt = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))
    assert plain.keys() == ckpt.keys()
    for key in plain:
        np.testing.assert_allclose(np.array(ckpt[key]), np.array(plain[key]), atol=1e-6, err_msg=key)


@pytest.mark.parametrize("span", [2, 3, 5])
def test_checkpointing_in_segments_gives_the_same_gradients(span):
    # Five layers in segments of 2 (2 + 2 + 1), 3 (3 + 2) and 5 (one): the same gradients as without
    # checkpointing, for the LoRA matrices (the trainable arrays) and for a full fine-tune's.
    from mlx_qlora import settings
    from mlx_qlora.config import LoRAConfig
    from mlx_qlora.lora import apply_lora
    from mlx_qlora.model import MistralForCausalLM, ModelArgs

    mx.random.seed(3)
    args = ModelArgs(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                     sliding_window=6)
    ids = mx.array(np.random.default_rng(7).integers(0, 64, size=(2, 17)))

    def loss_fn(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    for lora in (False, True):
        model = MistralForCausalLM(args)
        if lora:
            apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
            # B starts at zero: random B so that every LoRA gradient is non-trivial
            model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
        plain = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))
        model.model.grad_checkpoint = True
        with settings.override(checkpoint_span=span):
            ckpt = dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model)[1]))
        assert plain.keys() == ckpt.keys() and len(plain) > 0
        for key in plain:
            np.testing.assert_allclose(np.array(ckpt[key]), np.array(plain[key]), atol=1e-6, err_msg=key)


def test_checkpoint_span_follows_the_setting_or_the_memory_limit():
    from mlx_qlora import settings
    from mlx_qlora.model.mistral import SPAN_SHARE, checkpoint_span

    limit = 16 * 2**30
    fits = int(SPAN_SHARE * limit) // 32  # 32 inputs of this size take exactly the share
    assert checkpoint_span(32, fits, limit) == 1
    assert checkpoint_span(32, fits + 1, limit) == 6  # round(sqrt(32))
    assert checkpoint_span(6, limit, limit) == 2  # round(sqrt(6)): 3 inputs kept + 2 recomputed < 6
    assert checkpoint_span(5, limit, limit) == 1  # round(sqrt(5)) = 2 would hold 3 + 2: no fewer than 5
    with settings.override(checkpoint_span=3):
        assert checkpoint_span(32, fits, limit) == 3 and checkpoint_span(32, limit, limit) == 3


def test_bfloat16_checkpoint_loads_and_casts(tmp_path, tiny_hf_checkpoint):
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint, dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    model = load_model(tmp_path / "bf16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    model32 = load_model(tmp_path / "bf16", dtype="float32")
    assert model32.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    expected = ref.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.array(model32.model.layers[0].self_attn.q_proj.weight), expected)


def test_sharded_checkpoint_loads(tmp_path, tiny_hf_checkpoint):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = load_model(tiny_hf_checkpoint)
    b = load_model(tmp_path / "sharded")
    for (ka, va), (kb, vb) in zip(tree_flatten(a.parameters()), tree_flatten(b.parameters())):
        assert ka == kb
        np.testing.assert_array_equal(np.array(va), np.array(vb))


# ---- bad input -------------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match=r"config\.json: missing"):
        load_model(tmp_path / "ckpt")


def test_unsupported_model_type(tmp_path, tiny_hf_checkpoint):
    path = _copy(tiny_hf_checkpoint, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model_type: 'gpt2' is not supported"):
        load_model(path)


def _rewrite_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(tmp_path, tiny_hf_checkpoint):
    path = _copy(tiny_hf_checkpoint, tmp_path / "ckpt")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_wrong_shape(tmp_path, tiny_hf_checkpoint):
    path = _copy(tiny_hf_checkpoint, tmp_path / "ckpt")

    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:, :32].copy()

    _rewrite_tensors(path, edit)
    with pytest.raises(UserError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(64, 32\), expected \(64, 64\)"):
        load_model(path)


def test_unexpected_tensor(tmp_path, tiny_hf_checkpoint):
    path = _copy(tiny_hf_checkpoint, tmp_path / "ckpt")
    _rewrite_tensors(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(UserError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(path)


def test_pickles_are_not_loaded(tmp_path, tiny_hf_checkpoint):
    path = _copy(tiny_hf_checkpoint, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"no \*\.safetensors weight files \(found PyTorch pickle"):
        load_model(path)


# ---- ModelArgs ------------------------------------------------------------------------------------


def test_rope_parameters_and_rope_theta_are_both_read():
    base = dict(model_type="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert ModelArgs.from_hf_config({**base, "rope_theta": 123.0}).rope_theta == 123.0
    args = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert args.rope_theta == 1e6
    with pytest.raises(ValueError, match="rope_theta: 5.0 contradicts"):
        ModelArgs.from_hf_config({**base, "rope_theta": 5.0, "rope_parameters": {"rope_theta": 6.0}})
    with pytest.raises(ValueError, match="rope_type: 'yarn' is not supported"):
        ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads: 3 does not divide"),
        (dict(hidden_act="gelu"), "hidden_act: only 'silu'"),
        (dict(sliding_window=0), "sliding_window: must be a positive integer"),
        (dict(hidden_size=65), "hidden_size: 65 is not divisible"),
        (dict(attention_bias=True), "attention_bias: biases"),
    ],
)
def test_bad_config_values_name_the_key(overrides, message):
    config = {**dict(model_type="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2), **overrides}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(config)
