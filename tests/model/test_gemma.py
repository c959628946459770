"""Gemma 2 and Gemma 3 (text) against transformers' ``Gemma2ForCausalLM`` and ``Gemma3ForCausalLM`` on tiny
random checkpoints (eager attention): float32 logits within 1e-4 absolute, incremental decoding equal to the
full pass, greedy generation token for token.

The configs cover soft-capped scores and logits (on and off), sliding windows shorter than the sequences
beside global layers, ``query_pre_attn_scalar`` other than head_dim, tied and untied heads, Gemma 3's
per-head query/key norms and its local RoPE base beside linearly scaled global RoPE. Weights are drawn
larger than transformers' initialisation (std 0.1) and every norm weight is random, so that the caps, the
``1 + weight`` norms and the windows change the logits visibly (``test_each_feature_changes_the_logits``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.generate.generator import generate
from mlx_qlora.model import ModelArgs, load_model
from support import GEMMA_VOCAB as VOCAB, assert_left_padding_matches, assert_logits_match, hf_reference, save_gemma

ATOL = 1e-4  # float32 logits
CONFIGS = {
    # Gemma 2: layers alternate sliding (0, 2) and global (1, 3); both caps small enough to bite
    "gemma2-capped": ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma2-uncapped-untied": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                              tie_word_embeddings=False, num_key_value_heads=1)),
    # Gemma 3: global every third layer, local RoPE base 1e4, global 1e6 linearly scaled by 8
    "gemma3-scaled": ("gemma3_text", dict(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
                                          rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # final cap only: transformers' Gemma 3 does not apply attn_logit_softcapping (nor do we)
    "gemma3-capped": ("gemma3_text", dict(layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                       "full_attention"], attn_logit_softcapping=2.0,
                                          final_logit_softcapping=3.0, rope_theta=1e4, rope_local_base_freq=500.0)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {name: save_gemma(root / name, kind, **overrides) for name, (kind, overrides) in CONFIGS.items()}


@pytest.fixture(params=list(CONFIGS))
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


reference = hf_reference


def test_config_is_read_as_transformers_writes_it(checkpoints):
    g2 = load_model(checkpoints["gemma2-capped"]).args
    assert (g2.model_type, g2.hidden_act, g2.norm_weight_offset, g2.scale_embeddings) == (
        "gemma2", "gelu_pytorch_tanh", 1.0, True)
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (2.0, 3.0, 24)
    assert g2.tie_word_embeddings and g2.sandwich_norms and not g2.qk_norm
    g3 = load_model(checkpoints["gemma3-scaled"]).args
    config = json.loads((checkpoints["gemma3-scaled"] / "config.json").read_text())
    assert set(config["rope_parameters"]) == {"full_attention", "sliding_attention"}  # transformers 5's layout
    assert g3.layer_types == ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    assert (g3.rope_theta, g3.rope_type, g3.rope_scaling_factor, g3.rope_local_base_freq) == (1e6, "linear", 8.0, 1e4)
    assert g3.qk_norm and g3.attn_logit_softcapping is None
    for args in (g2, g3):  # our own config round-trips
        assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_exported_config_builds_the_same_transformers_model(checkpoints, tmp_path):
    """``to_hf_config`` (what a merge writes when the base config lacks keys) is read by transformers as the
    config it came from: same layer types, RoPE per layer type, caps and scalar."""
    import transformers

    for name in ("gemma2-capped", "gemma3-scaled"):
        original = transformers.AutoConfig.from_pretrained(checkpoints[name])
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(load_model(checkpoints[name]).args.to_hf_config()))
        ours = transformers.AutoConfig.from_pretrained(folder)
        for key in ("layer_types", "rope_parameters", "attn_logit_softcapping", "final_logit_softcapping",
                    "query_pre_attn_scalar", "sliding_window", "head_dim", "tie_word_embeddings"):
            assert getattr(ours, key) == getattr(original, key), (name, key)


@pytest.mark.parametrize("length", [5, 30])
def test_logits_match_transformers(checkpoint, length):
    """Batch 2; 30 positions run well past the window of 8."""
    assert_logits_match(checkpoint, rows=2, length=length, atol=ATOL, vocab=VOCAB)


def test_left_padding_matches_transformers(checkpoint):
    assert_left_padding_matches(checkpoint, pads=(5, 0, 11), length=26, atol=ATOL, vocab=VOCAB)

def test_incremental_decoding_matches_full_pass(checkpoint):
    """One token at a time, and in uneven pieces: sliding layers keep only their window, global layers all."""
    model = load_model(checkpoint)
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(2, 30))
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    windows = [c.max_size for c in cache]
    assert windows == [model.args.layer_window(i) for i in range(4)] and None in windows and 8 in windows
    steps = [np.array(model(mx.array(ids[:, t: t + 1]), cache=cache)) for t in range(30)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    assert [c.keys.shape[2] for c, w in zip(cache, windows) if w is not None] == [8] * windows.count(8)
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, a:b]), cache=cache)) for a, b in [(0, 11), (11, 12), (12, 30)]]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint):
    """30 new tokens after a 7-token prompt: decoding runs past the window; through the compiled decoder."""
    import torch

    ids = np.random.default_rng(9).integers(3, VOCAB, size=7).tolist()
    out = reference(checkpoint).generate(torch.tensor([ids]), attention_mask=torch.ones(1, 7, dtype=torch.long),
                                         do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    result = generate(load_model(checkpoint), None, ids, max_tokens=30, eos_ids=set())
    assert result.tokens == out[0, 7:].tolist()


def test_each_feature_changes_the_logits(checkpoints):
    """The parity above is not blind to the features: switching each off moves the logits by far more
    than the tolerance."""
    ids = mx.array(np.random.default_rng(5).integers(0, VOCAB, size=(1, 30)))
    model = load_model(checkpoints["gemma2-capped"])
    base = np.array(model(ids))

    def moved(change) -> float:
        model = load_model(checkpoints["gemma2-capped"])
        change(model)
        return float(np.abs(np.array(model(ids)) - base).max())

    def no_attn_cap(m):
        for layer in m.layers:
            layer.self_attn.softcap = None

    def no_window(m):
        m.args.layer_types = ("full_attention",) * len(m.layers)

    def plain_norms(m):
        for _, module in m.named_modules():
            if hasattr(module, "offset"):
                module.offset = 0.0

    def no_final_cap(m):
        m.args.final_logit_softcapping = None

    for change in (no_attn_cap, no_window, plain_norms, no_final_cap):
        assert moved(change) > 100 * ATOL, change.__name__


def test_unsupported_configs_are_one_line_errors(checkpoints, tmp_path):
    import shutil

    for key, value, message in [
        ("hidden_activation", "gelu", r"hidden_activation: only 'gelu_pytorch_tanh' is supported for Gemma"),
        ("use_bidirectional_attention", True, r"use_bidirectional_attention: only causal"),
        ("model_type", "gemma3n", r"model_type: 'gemma3n' is not supported \(supported: mistral, llama, qwen2, "
                                  r"qwen3, phi3, gemma2, gemma3_text; multimodal, as text models: gemma3\)"),
        # the multimodal model type (tests/test_gemma3_multimodal.py) needs its nested text config
        ("model_type", "gemma3", r"text_config: a gemma3 config needs a text_config object"),
    ]:
        path = tmp_path / f"{key}-{value}"
        shutil.copytree(checkpoints["gemma3-scaled"], path)
        config = json.loads((path / "config.json").read_text())
        config[key] = value
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match=message) as info:
            load_model(path)
        assert "\n" not in str(info.value)


GEMMA_SWITCHES = {
    "norm_weight_offset": 1.0, "sandwich_norms": True, "qk_norm": True, "hidden_act": "gelu_pytorch_tanh",
    "attn_logit_softcapping": 20.0,
}


@pytest.mark.parametrize("switch", [None, *GEMMA_SWITCHES])
def test_fused_decode_leaves_gemma_layers_to_the_plain_path(monkeypatch, switch):
    """The CUDA decode kernels compute Mistral's layer: any one of Gemma's features sends a layer to the
    plain path, while the same layer without it is taken (CUDA stood in for, as in test_llama3.py)."""
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
    model = tiny_model(seed=1, **({} if switch is None else {switch: GEMMA_SWITCHES[switch]}))
    quantize_model(model, bits=4)
    model.eval()
    with settings.override(fused_decode=True):
        assert fused_decode.applies(model.layers[0], mx.zeros((1, 1, 64)), cache) == (switch is None)


def test_geglu_never_takes_the_fused_swiglu_launch(monkeypatch):
    """``quant/matmul.py``'s fused gate/up launch computes SiLU: a GeGLU MLP must not reach it, and gives
    down(gelu_tanh(gate x) * up x) (the formula, float32, 1e-6)."""
    from mlx_qlora.model import layers
    from support import tiny_model

    def refuse(*args):
        raise AssertionError("swiglu called for a GeGLU MLP")

    monkeypatch.setattr(layers, "swiglu", refuse)
    mlp = tiny_model(seed=2, hidden_act="gelu_pytorch_tanh").layers[0].mlp
    x = mx.array(np.random.default_rng(0).normal(size=(2, 3, 64)).astype(np.float32))
    g = np.array(x) @ np.array(mlp.gate_proj.weight).T
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    expected = (gelu * (np.array(x) @ np.array(mlp.up_proj.weight).T)) @ np.array(mlp.down_proj.weight).T
    np.testing.assert_allclose(np.array(mlp(x)), expected, atol=1e-6, rtol=1e-5)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(checkpoints):
    """Left-padded batch of prompts of different lengths (masks per kind of layer, per-layer caches, the
    compiled decoder) gives each prompt's own greedy tokens, which equal transformers' for that prompt."""
    import torch

    from mlx_qlora.generate.generator import generate_batch

    model = load_model(checkpoints["gemma2-capped"])
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (4, 13, 9)]
    batched = generate_batch(model, None, prompts, max_tokens=16, eos_ids=set(), prefill_chunk=8)
    ref = reference(checkpoints["gemma2-capped"])
    for prompt, result in zip(prompts, batched):
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
        assert result.tokens == out[0, len(prompt):].tolist()


def test_training_loss_and_gradients_equal_transformers(checkpoints):
    """The chunked training loss (``train/loss.py``, logits a chunk at a time from ``logits_from_hidden``,
    final soft-cap included) equals transformers' ``labels=`` loss, and the gradient of every LoRA-free
    weight of the first layer equals torch's (float32: loss 1e-5, gradients 1e-4), with and without
    gradient checkpointing."""
    import torch
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_qlora.train.step import make_loss_fn

    path = checkpoints["gemma2-capped"]
    ids = np.random.default_rng(6).integers(3, VOCAB, size=(2, 24))
    labels = ids.copy()
    labels[:, :7] = -100
    ref = reference(path)
    out = ref(torch.tensor(ids), labels=torch.tensor(labels))
    out.loss.backward()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.1.post_feedforward_layernorm.weight"]
    for checkpointing in (False, True):
        model = load_model(path)
        model.freeze()
        model.unfreeze(keys=["weight"], recurse=True)
        model.model.grad_checkpoint = checkpointing
        loss_fn = make_loss_fn(chunk=16, packed=False)
        (loss_sum, n), grads = nn.value_and_grad(model, loss_fn)(model, mx.array(ids), mx.array(labels))
        assert abs(loss_sum.item() / n.item() - out.loss.item()) < 1e-5
        grads = dict(tree_flatten(grads))
        for name in names:
            theirs = ref.get_parameter(name).grad.numpy()
            np.testing.assert_allclose(np.array(grads[name]) / n.item(), theirs, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("compiled", [True, False])
def test_prompt_cache_with_mixed_windows_equals_a_fresh_pass(checkpoints, compiled):
    """A conversation kept in a ``PromptCache`` over sliding (window 8) and global layers: each turn's
    reply equals a fresh pass over the whole prompt (greedy, float32) while the sliding layers' caches
    hold their window only and the global layers' every position."""
    from mlx_qlora.generate.generator import PromptCache, generate_stream

    model = load_model(checkpoints["gemma3-capped"])
    rng = np.random.default_rng(8)
    cache, ids = PromptCache(), rng.integers(3, VOCAB, size=9).tolist()
    for turn in range(3):
        run = list(generate_stream(model, None, ids, 6, eos_ids=set(), compiled=compiled, prompt_cache=cache))
        fresh = generate(model, None, ids, max_tokens=6, eos_ids=set(), compiled=compiled)
        assert [s.token for s in run] == fresh.tokens, turn
        ids = ids + fresh.tokens + rng.integers(3, VOCAB, size=4).tolist()
    sizes = {c.max_size: c.keys.shape[2] for c in cache.caches}
    assert sizes[8] == 8 and sizes[None] >= cache.caches[0].offset > 8


def test_bfloat16_stays_bfloat16_and_near_transformers(checkpoints):
    """In bfloat16 (a GPU's default) the hidden states and logits stay bfloat16 (the float32 norm factor and
    softmax are rounded back) and the logits are within 0.25 of transformers' bfloat16 ones (the two
    round differently: each is about 0.05-0.08 from float32 on these models)."""
    import torch
    import transformers

    ids = np.random.default_rng(12).integers(0, VOCAB, size=(2, 30))
    for name in ("gemma2-capped", "gemma3-scaled"):
        model = load_model(checkpoints[name], dtype="bfloat16")
        assert model.hidden_states(mx.array(ids)).dtype == mx.bfloat16
        ours = model(mx.array(ids))
        assert ours.dtype == mx.bfloat16
        ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], attn_implementation="eager",
                                                                dtype=torch.bfloat16).eval()
        with torch.no_grad():
            theirs = ref(torch.tensor(ids)).logits.float().numpy()
        np.testing.assert_allclose(np.array(ours.astype(mx.float32)), theirs, atol=0.25, rtol=0)
