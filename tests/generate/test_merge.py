"""Merging adapters: merged = base + adapters (float32, 1e-4), the same weights as PEFT's merge, the
exported folder loads in transformers with matching logits, bf16 originals merge losslessly, and a 4-bit
base is merged dequantized (and says so)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.generate.loading import attach_adapters
from mlx_qlora.generate.merge import max_logit_difference, merge_adapters, parse_size
from mlx_qlora.model import ModelArgs, load_model

from support import random_adapters, write_adapters

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tiny_hf_checkpoint, tiny_spm_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merge") / "tiny"
    shutil.copytree(tiny_hf_checkpoint, folder)
    shutil.copy(tiny_spm_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory) -> Path:
    """Our 4-bit format of the tiny model (per-row, float32 scales), as convert_weights.py writes it."""
    from mlx_qlora.convert import convert_checkpoint

    folder = tmp_path_factory.mktemp("merge") / "tiny-4bit"
    convert_checkpoint(model_dir, folder, bits=4, group_size=None, dtype="float32", progress=False)
    return folder


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> Path:
    args = load_model(model_dir).args
    return write_adapters(tmp_path_factory.mktemp("merge") / "run", args, template="mistral",
                          targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))


def _ids(n=3, length=20):
    return np.random.default_rng(1).integers(0, 320, size=(n, length))


def _with_adapters(path, adapter_dir, dtype="float32"):
    model = load_model(path, dtype=dtype)
    attach_adapters(model, adapter_dir)
    return model


def test_lossless_merge_of_a_float32_checkpoint(model_dir, adapters, tmp_path):
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file

    report = merge_adapters(model_dir, adapters, tmp_path / "merged", max_shard_size="40KB")
    out = tmp_path / "merged"
    assert report.lossless and report.merged_layers == 10 and report.shards > 1
    assert report.max_logit_diff < ATOL and report.check_prompts == 3
    assert "lossless merge into the original weights" in report.lines()[0]
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.model").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"
    assert json.loads((out / "mlx_qlora.json").read_text())["template"] == "mistral"

    # the merge formula, by numpy
    params, lora = random_adapters(load_model(model_dir).args,
                                   targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    original = load_file(str(model_dir / "model.safetensors"))
    merged = {}
    for file in out.glob("model-*.safetensors"):
        merged.update(load_file(str(file)))
    assert merged.keys() == original.keys()
    key = "model.layers.1.self_attn.o_proj"
    a, b = np.array(params[f"{key}.lora_A"]), np.array(params[f"{key}.lora_B"])
    np.testing.assert_allclose(merged[f"{key}.weight"], original[f"{key}.weight"] + lora.scale * b @ a, atol=1e-6)
    np.testing.assert_array_equal(merged["model.layers.1.self_attn.k_proj.weight"],
                                  original["model.layers.1.self_attn.k_proj.weight"])  # not adapted: untouched

    # PEFT's merge_and_unload gives the same weights
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(reference, adapters).merge_and_unload()
    for name, value in peft_merged.state_dict().items():
        np.testing.assert_allclose(merged[name], value.numpy(), atol=1e-6, err_msg=name)

    # the exported folder loads in transformers and gives the logits of base + adapters
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        theirs = exported(torch.tensor(ids)).logits.numpy()
    ours = np.array(_with_adapters(model_dir, adapters)(mx.array(ids)))
    np.testing.assert_allclose(theirs, ours, atol=ATOL)
    np.testing.assert_allclose(np.array(load_model(out)(mx.array(ids))), ours, atol=ATOL)


def test_bfloat16_original_weights_merge_losslessly(model_dir, quantized_dir, adapters, tmp_path):
    """W' = bf16(float32(W_bf16) + scale * B @ A), bit for bit, computed independently with torch."""
    import torch
    import transformers
    from safetensors.torch import load_file

    bf16 = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    report = merge_adapters(quantized_dir, adapters, tmp_path / "merged", base_weights=bf16)
    assert report.lossless and report.dtype == "bfloat16" and str(bf16) in report.base_description
    assert report.max_logit_diff < 0.05  # bf16 rounding of the merged weights, nothing more
    assert report.max_logit_diff_trained > 0  # against the 4-bit model the adapters were trained on
    original = load_file(str(bf16 / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    params, lora = random_adapters(load_model(model_dir).args,
                                   targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    for name, value in original.items():
        path = name[: -len(".weight")]
        if f"{path}.lora_A" in params:
            a = torch.tensor(np.array(params[f"{path}.lora_A"]))
            b = torch.tensor(np.array(params[f"{path}.lora_B"]))
            value = (value.float() + lora.scale * (b @ a)).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], value), name


def test_merge_into_the_dequantized_4bit_base(quantized_dir, adapters, tmp_path):
    report = merge_adapters(quantized_dir, adapters, tmp_path / "merged")
    assert not report.lossless
    assert "DEQUANTIZED 4-bit base" in report.lines()[0] and "--base-weights" in report.lines()[0]
    assert report.max_logit_diff < ATOL
    quantized = load_model(quantized_dir)
    merged = load_model(tmp_path / "merged")
    params, lora = random_adapters(merged.args, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    layer = quantized.model.layers[0].mlp.gate_proj
    expected = np.array(layer.dequantize(mx.float32)) + lora.scale * (
        np.array(params["model.layers.0.mlp.gate_proj.lora_B"]) @ np.array(params["model.layers.0.mlp.gate_proj.lora_A"]))
    np.testing.assert_allclose(np.array(merged.model.layers[0].mlp.gate_proj.weight), expected, atol=1e-6)
    ids = mx.array(_ids())
    np.testing.assert_allclose(np.array(merged(ids)), np.array(_with_adapters(quantized_dir, adapters)(ids)), atol=ATOL)


def test_quantized_copy_of_the_merged_model(model_dir, adapters, tmp_path):
    """--quantize: our 4-bit format again; every weight within half a quantization step of the merged one."""
    report = merge_adapters(model_dir, adapters, tmp_path / "merged", quantize=True, group_size=32, check=False)
    assert report.quantized_out == tmp_path / "merged-4bit" and report.max_logit_diff is None
    config = json.loads((tmp_path / "merged-4bit" / "config.json").read_text())
    assert config["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert json.loads((tmp_path / "merged-4bit" / "mlx_qlora.json").read_text())["template"] == "mistral"
    merged, quantized = load_model(tmp_path / "merged"), load_model(tmp_path / "merged-4bit")
    layer = quantized.model.layers[1].self_attn.v_proj
    w = np.array(merged.model.layers[1].self_attn.v_proj.weight)
    half_step = np.repeat(np.array(layer.scales), 32, axis=1) / 2
    assert np.all(np.abs(np.array(layer.dequantize(mx.float32)) - w) <= half_step + 1e-6)


def test_base_weights_of_another_shape_are_refused(quantized_dir, adapters, hf_checkpoint_factory, tmp_path):
    other = hf_checkpoint_factory("merge-other", intermediate_size=96)
    with pytest.raises(UserError, match=r"intermediate_size is 96 but .* has 160: --base-weights must be"):
        merge_adapters(quantized_dir, adapters, tmp_path / "out", base_weights=other)
    assert not (tmp_path / "out").exists()


def test_adapters_for_another_model_are_refused(model_dir, tmp_path):
    args = load_model(model_dir).args
    narrow = write_adapters(tmp_path / "narrow", ModelArgs(**{**vars(args), "hidden_size": 32, "head_dim": 8}))
    with pytest.raises(UserError, match=r"made for another model shape"):
        merge_adapters(model_dir, narrow, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40_000
    with pytest.raises(UserError, match="max_shard_size"):
        parse_size("lots")


def test_merge_script(model_dir, adapters, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_adapters.py"), "--model", str(model_dir),
                           "--adapter", str(adapters), "--out", str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lossless merge into the original weights")
    assert "max |logit difference| merged vs base + adapters (float32, 3 prompts): " in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_adapters.py"), "--model", str(model_dir),
                           "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_base_weights_with_nan_are_refused_before_writing(quantized_dir, adapters, model_dir, tmp_path):
    """The original weights are read through load_model, which checks every tensor: no merged model of NaNs."""
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    tensors = mx.load(str(base / "model.safetensors"))
    weight = tensors["model.layers.0.mlp.gate_proj.weight"]
    weight[0, 0] = float("nan")
    tensors["model.layers.0.mlp.gate_proj.weight"] = weight
    mx.save_safetensors(str(base / "model.safetensors"), tensors, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{base / 'model.safetensors'}: tensor model.layers.0.mlp.gate_proj.weight "
                                        "holds NaN"):
        merge_adapters(quantized_dir, adapters, tmp_path / "merged", base_weights=base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_merged_values_out_of_the_output_dtype_are_refused(model_dir, tmp_path):
    """W + scale * B @ A beyond float16's range would be written as inf: refused, naming the tensor."""
    args = load_model(model_dir).args
    run = write_adapters(tmp_path / "run", args, targets=("q_proj",), std=300.0)
    with pytest.raises(UserError, match=r"merged model \(float16\): tensor model.layers.\d.self_attn.q_proj.weight "
                                        r"holds NaN or infinite values.*float16: choose --dtype float32"):
        merge_adapters(model_dir, run, tmp_path / "merged", dtype="float16", check=False)
    assert not (tmp_path / "merged").exists()


def test_logit_difference_does_not_hide_nan():
    """max(0.0, nan) is 0.0 in Python: a model answering NaN must not read as a perfect match."""
    good = lambda x: mx.zeros((1, x.shape[1], 4))  # noqa: E731
    bad = lambda x: mx.full((1, x.shape[1], 4), float("nan"))  # noqa: E731
    assert np.isnan(max_logit_difference(good, bad, [[1, 2], [3]]))
    assert np.isnan(max_logit_difference(good, lambda x: bad(x) if x.shape[1] == 2 else good(x), [[1, 2], [3]]))
    assert max_logit_difference(good, good, [[1, 2]]) == 0.0
