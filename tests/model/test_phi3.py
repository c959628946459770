"""Phi-3 / Phi-3.5 / Phi-4-mini against transformers' ``Phi3ForCausalLM`` on tiny random checkpoints: fused
``qkv_proj`` and ``gate_up_proj``, a sliding window, ``longrope`` scaling (short factors up to the original
length, long ones past it, the attention factor) and partial rotary embeddings; float32 logits within 1e-4,
left padding, cache decoding, greedy generation token for token; LoRA on the fused layers against PEFT,
both ways; convert, merge and transformers loading the merged folder; GGUF (``phi3``) both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.generate.generator import generate
from mlx_qlora.generate.loading import attach_adapters
from mlx_qlora.model import ModelArgs, load_model
from support import (assert_left_padding_matches, assert_logits_match, hf_reference, make_family_checkpoint,
                     randomize_peft_lora, write_adapters)

ATOL = 1e-4  # float32 logits
ORIGINAL = 32  # original_max_position_embeddings: sequences of 40 cross it
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _longrope(rotated: int) -> dict:
    half = rotated // 2
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.3 * i for i in range(half)]}


CONFIGS = {
    "phi3-mini-4k-window": dict(sliding_window=8),
    "phi3.5-longrope": dict(original_max_position_embeddings=ORIGINAL, rope_scaling=_longrope(16)),
    # head_dim 16, 12 of its dimensions rotated; tied embeddings; one key/value head
    "phi4-mini-partial-tied": dict(original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.75,
                                   rope_scaling=_longrope(12), tie_word_embeddings=True, num_key_value_heads=1),
}
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("phi3")
    return {name: make_family_checkpoint(root / name, "phi3", **IDS, **kw) for name, kw in CONFIGS.items()}


@pytest.fixture(params=list(CONFIGS))
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


_reference = hf_reference


def _hf_logits(model, ids, **kwargs):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids), **{k: torch.tensor(v) for k, v in kwargs.items()}).logits.numpy()


@pytest.mark.parametrize("length", [7, 40])
def test_logits_match_transformers(checkpoint, length):
    """Batch 3; at 40 tokens the window (8) matters and longrope takes its long factors (past 32)."""
    assert_logits_match(checkpoint, rows=3, length=length, atol=ATOL)


def test_config_is_read_as_transformers_builds_it(checkpoints):
    args = load_model(checkpoints["phi4-mini-partial-tied"]).args
    assert args.fused_projections and args.rotary_dims == 12 and args.rope_type == "longrope"
    assert args.rope_attention_factor == pytest.approx(np.sqrt(1 + np.log(256 / ORIGINAL) / np.log(ORIGINAL)))
    ref = _reference(checkpoints["phi4-mini-partial-tied"])
    assert args.rope_attention_factor == pytest.approx(ref.model.rotary_emb.attention_scaling)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    assert load_model(checkpoints["phi3-mini-4k-window"]).args.sliding_window == 8


def test_long_factors_matter(checkpoints):
    """Past the original length the long factors (and before it the short ones) give other logits than the
    other set would: the parity above covers both."""
    model = load_model(checkpoints["phi3.5-longrope"])
    ids = mx.array(np.random.default_rng(1).integers(0, 320, size=(1, 40)))
    long = np.array(model(ids))
    for layer in model.layers:
        layer.self_attn._rope_long_inv_freq = layer.self_attn._rope_inv_freq
    assert np.abs(np.array(model(ids)) - long).max() > 1e-3


def test_left_padding_matches_transformers(checkpoint):
    assert_left_padding_matches(checkpoint, pads=(6, 0), length=30, atol=ATOL)

def test_incremental_decoding_matches_full_pass(checkpoint):
    """Within the original length (past it, a full pass rotates every position with the long factors while
    cached keys keep the short ones, in transformers too: generation below covers that)."""
    model = load_model(checkpoint)
    ids = np.random.default_rng(3).integers(0, 320, size=(2, 30))
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(30)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False])
def test_greedy_generation_matches_transformers(checkpoint, compiled):
    """30 new tokens after 9: generation crosses the original length (longrope's switch) and the window."""
    import torch

    ids = np.random.default_rng(9).integers(3, 320, size=9).tolist()
    out = _reference(checkpoint).generate(torch.tensor([ids]), attention_mask=torch.ones(1, 9, dtype=torch.long),
                                          do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    result = generate(load_model(checkpoint), None, ids, max_tokens=30, eos_ids=set(), compiled=compiled)
    assert result.tokens == out[0, 9:].tolist()


def test_lora_targets_map_onto_the_fused_layers(checkpoints):
    """The default seven names become Phi-3's four layers, as PEFT names them; q_proj alone is qkv_proj."""
    from mlx_qlora.lora import apply_lora
    from mlx_qlora.lora.apply import model_targets

    model = load_model(checkpoints["phi3.5-longrope"])
    assert model_targets(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) == \
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert model_targets(model, ("v_proj",)) == ("qkv_proj",)
    apply_lora(model, rank=2)
    names = {k.split(".")[-2] for k in dict(__import__("mlx.utils").utils.tree_flatten(model.trainable_parameters()))}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_adapters_on_fused_layers_both_ways_with_peft(checkpoints, tmp_path):
    """Ours in PEFT and PEFT's in ours, on qkv_proj/o_proj/gate_up_proj/down_proj: logits within 1e-4."""
    import peft

    path = checkpoints["phi4-mini-partial-tied"]
    ids = np.random.default_rng(2).integers(0, 320, size=(2, 36))
    ours = load_model(path)
    folder = write_adapters(tmp_path / "ours", ours.args, rank=4, std=0.2, targets=FUSED)
    attach_adapters(ours, folder)
    peft_model = peft.PeftModel.from_pretrained(_reference(path), folder).eval()
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _hf_logits(peft_model, ids), atol=ATOL, rtol=0)

    model = peft.get_peft_model(_reference(path), peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(FUSED)))
    randomize_peft_lora(model, std=0.2)
    model.save_pretrained(tmp_path / "peft")
    ours = load_model(path)
    attach_adapters(ours, tmp_path / "peft")
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _hf_logits(model.eval(), ids), atol=ATOL, rtol=0)


def test_convert_merge_and_transformers_loads_the_merged_folder(checkpoints, tmp_path):
    """4-bit conversion quantizes the fused layers; a lossless merge of adapters trained on it is a
    transformers Phi-3 whose logits equal PEFT's merge into the original weights."""
    from peft import PeftModel

    from mlx_qlora.convert import convert_checkpoint
    from mlx_qlora.generate.merge import merge_adapters

    src = checkpoints["phi3.5-longrope"]
    convert_checkpoint(src, tmp_path / "q4", dtype="float32", progress=False)
    q4 = load_model(tmp_path / "q4")
    assert q4.layers[0].self_attn.qkv_proj.weight.dtype == mx.uint32
    adapter = write_adapters(tmp_path / "adapter", q4.args, rank=4, std=0.2, targets=FUSED, template=None)
    # the folders hold generation_config.json but no tokenizer: the merge's own check runs on random ids
    report = merge_adapters(tmp_path / "q4", adapter, tmp_path / "merged", base_weights=src)
    assert report.check_prompts == 3 and report.max_logit_diff < 1e-3
    ids = np.random.default_rng(5).integers(0, 320, size=(2, 40))
    merged = _reference(tmp_path / "merged")
    assert type(merged).__name__ == "Phi3ForCausalLM"
    expected = PeftModel.from_pretrained(_reference(src), adapter).merge_and_unload().eval()
    np.testing.assert_allclose(_hf_logits(merged, ids), _hf_logits(expected, ids), atol=ATOL, rtol=0)


def test_gguf_export_and_import_of_plain_phi3(checkpoints, tmp_path):
    """Phi-3-mini-4k's shape (plain RoPE, a window) as llama.cpp's ``phi3``: ``attn_qkv`` and ``ffn_up`` hold
    the fused layers, rows as they are, the window as ``phi3.attention.sliding_window``; transformers' GGUF
    loader gives our logits (within the window: it drops it), and our import gives them back exactly."""
    pytest.importorskip("gguf")
    import shutil
    from pathlib import Path

    from mlx_qlora.convert import convert_checkpoint
    from mlx_qlora.gguf.reader import open_gguf, read_metadata
    from mlx_qlora.gguf.writer import export_gguf
    from support import write_chatml_tokenizer

    folder = shutil.copytree(checkpoints["phi3-mini-4k-window"], tmp_path / "model")
    sample = Path(__file__).resolve().parents[2] / "data" / "sample" / "dolly_sample.jsonl"
    write_chatml_tokenizer(folder, 320, [json.loads(line)["response"] for line in sample.open()])
    report = export_gguf(folder, tmp_path / "m.gguf", "f32")
    assert not report.notes  # the window is written, not dropped
    meta = read_metadata(open_gguf(tmp_path / "m.gguf"))
    assert meta["general.architecture"] == "phi3" and meta["phi3.attention.sliding_window"] == 8
    ours = load_model(folder)
    ids = np.random.default_rng(6).integers(0, 320, size=(2, 8))
    ref = _hf_logits(_reference_gguf(tmp_path), ids)
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), ref, atol=ATOL, rtol=0)
    convert_checkpoint(tmp_path / "m.gguf", tmp_path / "back", quantize=False, dtype="float32", progress=False)
    back = load_model(tmp_path / "back")
    assert back.args.sliding_window == 8 and back.args.fused_projections
    ids = mx.array(np.random.default_rng(7).integers(0, 320, size=(2, 30)))
    np.testing.assert_array_equal(np.array(back(ids)), np.array(ours(ids)))


def _reference_gguf(folder):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf", dtype=torch.float32).eval()


@pytest.mark.parametrize("name,rotated", [("phi3.5-longrope", 16), ("phi4-mini-partial-tied", 12)])
def test_gguf_export_of_longrope_and_partial_rotary(checkpoints, name, rotated, tiny_spm_path, tmp_path):
    """llama.cpp's phi3 takes longrope as float32 ``rope_factors_long`` / ``_short`` tensors (rotated
    dimensions / 2 each), the original context length and the attention factor as metadata, and partial
    rotary embeddings as ``rope.dimension_count``: read back from the file, the factors are the config's,
    the attention factor transformers' own (its longrope initialisation, 1e-6) and the count the rotated
    dimensions. Importing such a file is refused with one line."""
    gguf = pytest.importorskip("gguf")
    import shutil

    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mlx_qlora.gguf.writer import export_gguf
    from mlx_qlora.gguf.reader import gguf_to_hf

    src = shutil.copytree(checkpoints[name], tmp_path / "model")
    shutil.copy(tiny_spm_path, src / "tokenizer.model")
    export_gguf(src, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    field = lambda key: reader.fields[key].parts[-1][0]  # noqa: E731
    config = json.loads((src / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    for kind in ("long", "short"):
        got = tensors[f"rope_factors_{kind}.weight"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.array(rope[f"{kind}_factor"], dtype=np.float32))
    hf_config = transformers.AutoConfig.from_pretrained(src)
    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu")
    assert float(field("phi3.rope.scaling.attn_factor")) == pytest.approx(attention_factor, rel=1e-6)
    assert int(field("phi3.rope.scaling.original_context_length")) == ORIGINAL
    assert int(field("phi3.rope.dimension_count")) == rotated
    with pytest.raises(UserError) as info:
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    assert "\n" not in str(info.value) and ("rope_factors_long" in str(info.value) or "dimension_count" in str(info.value))


def test_fused_decode_leaves_phi3_layers_to_the_plain_path(monkeypatch):
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
    model = tiny_model(seed=1, model_type="phi3", sliding_window=None, fused_projections=True)
    quantize_model(model, bits=4)
    model.eval()
    with settings.override(fused_decode=True):
        assert not fused_decode.applies(model.layers[0], mx.zeros((1, 1, 64)), cache)


@pytest.mark.slow  # two scripts in fresh processes: about 10 s
def test_fused_target_names_on_a_model_without_them_are_one_line(tmp_path, tiny_model_dirs):
    """finetune.py --lora-targets qkv_proj on a Mistral: one line naming the model's config, exit 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    run = [sys.executable, str(root / "scripts" / "prepare_data.py"), "--tokenizer", str(tiny_model_dirs["quant"]),
           "--out", str(data), "--max-seq-len", "64", "--no-progress"]
    assert subprocess.run(run, capture_output=True, text=True, env=env).returncode == 0
    done = subprocess.run([sys.executable, str(root / "scripts" / "finetune.py"), "--model",
                           str(tiny_model_dirs["quant"]), "--data", str(data), "--out", str(tmp_path / "run"),
                           "--iters", "1", "--lora-targets", "qkv_proj", "--no-progress"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json: lora: apply_lora: no projection matched targets ['qkv_proj']" in lines[0]
