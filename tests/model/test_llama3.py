"""Llama 3.1+'s ``rope_type: llama3`` frequency scaling and Llama 3.2's tied embeddings, against
transformers' ``LlamaForCausalLM`` on tiny random checkpoints (float32 logits, 1e-4 absolute)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.generate.generator import generate
from mlx_qlora.model import ModelArgs, load_model
from mlx_qlora.model.layers import llama3_inv_freq
from support import TINY_MISTRAL, assert_left_padding_matches, assert_logits_match, hf_reference

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # float32 logits
ORIGINAL = 32  # original_max_position_embeddings: sequences of 48 reach past it
# head_dim 16: wavelengths 6.3, 19.9, 62.8, ... (theta 1e4) or 6.3, 26.5, 112, ... (theta 1e5); with
# 32 / 4 = 8 and 32 / 1 = 32 as the band edges the first is kept, the second smoothed and the rest divided by
# the factor, in both configs.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL}

CONFIGS = {
    "llama3.1-untied": dict(num_key_value_heads=2, rope_scaling=LLAMA3),
    "llama3.2-tied": dict(num_key_value_heads=1, rope_scaling={**LLAMA3, "factor": 32.0}, tie_word_embeddings=True,
                          rope_theta=100000.0),
}


def _save(path: Path, seed: int = 0, **overrides) -> Path:
    """A random transformers Llama with ``overrides`` saved to ``path`` (as conftest's factory does; its cache
    key cannot hold the rope_scaling dict), norms perturbed so that loading them is seen."""
    import torch
    import transformers

    kwargs = {**TINY_MISTRAL, **overrides}
    kwargs.pop("sliding_window")
    config = transformers.LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama3")
    return {name: _save(root / name, **overrides) for name, overrides in CONFIGS.items()}


@pytest.fixture(params=list(CONFIGS))
def checkpoint(request, checkpoints):
    return checkpoints[request.param]


_reference = hf_reference


def test_the_tiny_configs_cover_all_three_bands():
    """The frequencies kept, smoothed and divided by the factor all occur at head_dim 16."""
    args = ModelArgs(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     sliding_window=None, rope_type="llama3", rope_scaling_factor=8.0,
                     rope_original_max_position_embeddings=ORIGINAL)
    plain = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
    ratio = plain / np.array(llama3_inv_freq(args))
    wavelen = 2 * math.pi / plain
    assert (ratio[wavelen < ORIGINAL / 4] == pytest.approx(1.0))
    assert (ratio[wavelen > ORIGINAL] == pytest.approx(8.0))
    medium = ratio[(wavelen >= ORIGINAL / 4) & (wavelen <= ORIGINAL)]
    assert len(medium) and ((medium > 1.0001) & (medium < 7.999)).all()
    assert (wavelen < ORIGINAL / 4).any() and (wavelen > ORIGINAL).any()


def test_config_is_read_as_transformers_writes_it(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"  # transformers 5's key
    args = load_model(checkpoint).args
    assert args.rope_type == "llama3"
    assert args.rope_original_max_position_embeddings == ORIGINAL
    assert (args.rope_low_freq_factor, args.rope_high_freq_factor) == (1.0, 4.0)
    assert args.rope_theta == config["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("length", [7, 48])
def test_logits_match_transformers(checkpoint, length):
    """Batch 3, positions up to 47: past original_max_position_embeddings (32)."""
    assert_logits_match(checkpoint, rows=3, length=length, atol=ATOL)


def test_left_padding_matches_transformers(checkpoint):
    """The ``position_ids`` path of rope uses the same scaled frequencies."""
    assert_left_padding_matches(checkpoint, pads=(6, 0), length=44, atol=ATOL)

def test_scaling_changes_logits_only_where_positions_are_far(checkpoint):
    """With the scaling dropped, the first position is unchanged (angle 0) and later ones differ: the
    parity above really exercises the scaled frequencies."""
    model = load_model(checkpoint)
    ids = mx.array(np.random.default_rng(5).integers(0, 320, size=(1, 48)))
    scaled = np.array(model(ids))
    for layer in model.layers:
        layer.self_attn._rope_inv_freq = None
    plain = np.array(model(ids))
    np.testing.assert_allclose(scaled[:, 0], plain[:, 0], atol=1e-6)
    assert np.abs(scaled[:, ORIGINAL:] - plain[:, ORIGINAL:]).max() > 1e-3


def test_incremental_decoding_matches_full_pass(checkpoint):
    model = load_model(checkpoint)
    ids = np.random.default_rng(3).integers(0, 320, size=(2, 44))
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)) for t in range(44)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, a:b]), cache=cache)) for a, b in [(0, 20), (20, 21), (21, 44)]]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint):
    """40 new tokens after a 9-token prompt: generation runs past original_max_position_embeddings."""
    import torch

    ids = np.random.default_rng(9).integers(3, 320, size=9).tolist()
    out = _reference(checkpoint).generate(torch.tensor([ids]), attention_mask=torch.ones(1, 9, dtype=torch.long),
                                          do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    result = generate(load_model(checkpoint), None, ids, max_tokens=40, eos_ids=set())
    assert result.tokens == out[0, 9:].tolist()


def test_convert_then_load(checkpoints, tmp_path):
    """convert_weights.py keeps the rope settings: the 4-bit folder loads with llama3 scaling, its logits
    near the float model's, and full precision (no quantization) gives the same logits exactly."""
    src = checkpoints["llama3.2-tied"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "scripts" / "convert_weights.py")
    out = tmp_path / "q4"
    done = subprocess.run([sys.executable, script, "--hf-path", str(src), "--mlx-path", str(out), "--group-size", "32",
                           "--dtype", "float32"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    model = load_model(out)
    assert model.args.rope_type == "llama3" and model.args.tie_word_embeddings
    ids = mx.array(np.random.default_rng(6).integers(0, 320, size=(1, 48)))
    full = np.array(load_model(src)(ids))
    ours = np.array(model(ids))
    assert np.linalg.norm(ours - full) <= 0.2 * np.linalg.norm(full)

    from mlx_qlora.convert import convert_checkpoint

    convert_checkpoint(src, tmp_path / "f32", dtype="float32", quantize=False, progress=False)
    np.testing.assert_array_equal(np.array(load_model(tmp_path / "f32")(ids)), full)


def test_default_rope_is_unchanged(hf_checkpoint_factory):
    """A config without scaling builds no frequency table: the plain ``mx.fast.rope`` call runs."""
    model = load_model(hf_checkpoint_factory("tiny-llama", arch="llama"))
    assert model.args.rope_type == "default"
    assert all(layer.self_attn._rope_inv_freq is None for layer in model.layers)
    assert "_rope_inv_freq" not in str(model.parameters().keys())


# ---- configs that are refused ---------------------------------------------------------------------


def _with_rope(tmp_path, checkpoint, rope):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = rope
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "yarn", "factor": 4.0}, r"rope_parameters\.rope_type: 'yarn' is not supported \(supported: "
                                          r"default, linear, llama3, longrope\)"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
     r"rope_parameters\.low_freq_factor: missing"),
    ({**LLAMA3, "high_freq_factor": 0.5}, r"rope_parameters\.high_freq_factor must be > 1"),
    ({**LLAMA3, "original_max_position_embeddings": 0.5}, r"rope_parameters\.original_max_position_embeddings must"),
])
def test_bad_rope_settings_are_one_line_errors(tmp_path, checkpoints, rope, message):
    path = _with_rope(tmp_path, checkpoints["llama3.1-untied"], rope)
    with pytest.raises(UserError, match=message) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_transformers_4_config_is_read(checkpoints):
    """``rope_theta`` beside ``rope_scaling`` (as Llama 3.1's published config.json) reads the same."""
    src = checkpoints["llama3.1-untied"]
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    args = ModelArgs.from_hf_config(config)
    assert args == load_model(src).args
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args  # and our own config round-trips


def test_fused_decode_leaves_llama3_layers_to_the_plain_path(monkeypatch):
    """The CUDA decode kernels rotate with plain RoPE: a llama3-scaled layer is not taken by them, while
    the same layer without scaling is (CUDA stood in for, as in tests/generate/test_decode_step.py)."""
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
    for rope_type in ("default", "llama3"):
        model = tiny_model(seed=1, model_type="llama", sliding_window=None, rope_type=rope_type,
                           rope_scaling_factor=8.0 if rope_type == "llama3" else 1.0,
                           rope_original_max_position_embeddings=ORIGINAL)
        quantize_model(model, bits=4)
        model.eval()
        with settings.override(fused_decode=True):
            applies[rope_type] = fused_decode.applies(model.layers[0], x, cache)
    assert applies == {"default": True, "llama3": False}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gguf_export_writes_llama3_rope_as_rope_freqs(checkpoints, name, tiny_spm_path, tmp_path):
    """llama.cpp takes llama3 scaling as a float32 ``rope_freqs.weight`` (head_dim/2,) that ggml's rope
    divides each plain frequency by: ``base**(-2i/D) / rope_freqs[i]`` read back from the file equals
    transformers' own inverse frequencies of the checkpoint (1e-6 relative), over all three bands; no
    linear scaling is declared in the metadata."""
    gguf = pytest.importorskip("gguf")
    from mlx_qlora.gguf.writer import export_gguf

    src = shutil.copytree(checkpoints[name], tmp_path / "model")
    shutil.copy(tiny_spm_path, src / "tokenizer.model")
    report = export_gguf(src, tmp_path / "out.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    freqs = np.array(tensors["rope_freqs.weight"].data)
    assert freqs.dtype == np.float32 and freqs.shape == (8,) and report.n_tensors == len(tensors)
    fields = {f.name for f in reader.fields.values()}
    assert "llama.rope.scaling.type" not in fields
    base = float(reader.fields["llama.rope.freq_base"].parts[-1][0])
    want = hf_reference(src).model.rotary_emb.inv_freq.numpy()  # (8,)
    ggml = base ** (-np.arange(0, 16, 2) / 16) / freqs
    np.testing.assert_allclose(ggml, want, rtol=1e-6)
    assert freqs.min() == pytest.approx(1.0) and freqs.max() == pytest.approx(CONFIGS[name]["rope_scaling"]["factor"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gguf_of_llama3_reads_back(checkpoints, name, tiny_spm_path, tmp_path):
    """convert_weights.py's GGUF import recovers the scaling from rope_freqs: the same factor, original
    length and band edges as the checkpoint's config (low_freq_factor 1, as written), and logits equal to
    transformers' on the original checkpoint (float32, 1e-4) at positions past the original length; a
    rope_freqs that follows no llama3 scaling is refused with one line."""
    gguf = pytest.importorskip("gguf")
    from mlx_qlora.gguf.reader import gguf_to_hf, llama3_scaling
    from mlx_qlora.gguf.writer import export_gguf

    src = shutil.copytree(checkpoints[name], tmp_path / "model")
    shutil.copy(tiny_spm_path, src / "tokenizer.model")
    export_gguf(src, tmp_path / "m.gguf", "f32")
    info = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "back")
    got = info.config["rope_scaling"]  # head_dim 16 smooths one frequency: edges not identifiable, the model is
    assert got["rope_type"] == "llama3" and got["factor"] == CONFIGS[name]["rope_scaling"]["factor"]
    ids = np.random.default_rng(5).integers(3, 320, size=(1, 48))  # past the original length (32)
    ref = hf_reference(src)
    import torch

    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(load_model(tmp_path / "back")(mx.array(ids))), expected, atol=ATOL)
    # Llama 3.1 8B's own shape and scaling (head_dim 128, theta 5e5): the parameters come back exactly
    from types import SimpleNamespace

    from mlx_qlora.gguf.writer import rope_freqs

    real = SimpleNamespace(head_dim=128, rope_theta=500000.0, rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                           rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192)
    assert llama3_scaling(rope_freqs(real), 500000.0, 128, "x.gguf") == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    with pytest.raises(UserError, match=r"x\.gguf: rope_freqs\.weight does not follow Llama 3\.1"):
        llama3_scaling(np.array([1.0, 3.0, 1.5, 8.0, 2.0, 8.0, 8.0, 8.0], np.float32), 10000.0, 16, "x.gguf")


def test_merge_with_gguf_of_llama3(checkpoints, tiny_spm_path, tmp_path):
    """merge_adapters --gguf on a Llama 3.1 checkpoint: the merged folder keeps llama3 scaling and the GGUF
    carries it as rope_freqs (the same values as a direct export of the merged folder)."""
    gguf = pytest.importorskip("gguf")
    from mlx_qlora.generate.merge import merge_adapters
    from mlx_qlora.gguf.writer import rope_freqs
    from support import write_adapters

    src = shutil.copytree(checkpoints["llama3.1-untied"], tmp_path / "model")
    shutil.copy(tiny_spm_path, src / "tokenizer.model")
    adapter = write_adapters(tmp_path / "adapter", load_model(src).args)
    merge_adapters(src, adapter, tmp_path / "merged", gguf=tmp_path / "merged.gguf")
    args = load_model(tmp_path / "merged").args
    assert args.rope_type == "llama3"
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "merged.gguf")).tensors}
    np.testing.assert_array_equal(np.array(tensors["rope_freqs.weight"].data), rope_freqs(args))
