"""convert_checkpoint and scripts/convert_weights.py: round trips, sharding, and clear errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)

import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.model import load_model
from mlx_qlora.quant import QuantizedLinear, quantize
from mlx_qlora.model.modules import quantize_model
from mlx_qlora import convert as convert_mod
from mlx_qlora.config import ConvertConfig
from mlx_qlora.convert import QUANTIZED_KEY, convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _read_with_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder through the ``safetensors`` library (torch reader: it knows bfloat16)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).float().numpy() if f.get_tensor(key).is_floating_point() else (
                    f.get_tensor(key).numpy())
    return out


@pytest.fixture()
def checkpoint_with_tokenizer(tiny_hf_checkpoint, tiny_spm_path, tmp_path) -> Path:
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf_checkpoint, src)
    shutil.copyfile(tiny_spm_path, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return src


def test_round_trip_float32_per_row(checkpoint_with_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 1000)  # several blocks of rows per tensor
    src, out = checkpoint_with_tokenizer, tmp_path / "mlx"
    result = convert_checkpoint(src, out, dtype="float32", shard_bytes=60_000, progress=False)
    assert result.n_quantized == 14 and result.n_shards > 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        result.shards + ["config.json", "generation_config.json", "mlx_qlora.json", "model.safetensors.index.json",
                         "tokenizer.model", "tokenizer_config.json"])
    assert json.loads((out / "mlx_qlora.json").read_text()) == {  # the mark of a model folder of ours
        "converted": {"quantization": {"bits": 4, "group_size": None, "mode": "affine"}, "dtype": "float32"}}
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"bits": 4, "group_size": None, "mode": "affine"}
    index = json.loads((out / "model.safetensors.index.json").read_text())

    original = _read_with_safetensors(src)
    written = _read_with_safetensors(out)
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in written.values())
    for key, value in original.items():
        if QUANTIZED_KEY.match(key):
            wq, scales, biases = quantize(mx.array(value), 4, None)
            stem = key[: -len("weight")]
            assert written[key].dtype == np.uint32 or written[key].dtype == np.int64  # torch has no uint32 view
            assert np.array_equal(written[key].astype(np.uint64), np.array(wq).astype(np.uint64))
            assert np.array_equal(written[stem + "scales"], np.array(scales))
            assert np.array_equal(written[stem + "biases"], np.array(biases))
        else:
            assert np.array_equal(written[key], value), key

    # the converted model is the in-memory quantized model, exactly
    ids = mx.array([[1, 7, 42, 300, 5, 9]])
    reference = quantize_model(load_model(src))
    assert mx.array_equal(load_model(out)(ids), reference(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("group_size", [None, 32])
def test_searched_rounding_round_trip(tiny_hf_checkpoint, tmp_path, monkeypatch, group_size):
    """--rounding search writes quantize(..., rounding="search") exactly (in blocks of rows), the folder
    loads, and its record says how it was rounded."""
    monkeypatch.setattr(convert_mod, "CHUNK_ELEMENTS", 1000)
    out = tmp_path / "searched"
    convert_checkpoint(tiny_hf_checkpoint, out, group_size=group_size, dtype="float16", rounding="search",
                       progress=False)
    assert json.loads((out / "mlx_qlora.json").read_text())["converted"]["rounding"] == "search"
    original, written = _read_with_safetensors(tiny_hf_checkpoint), _read_with_safetensors(out)
    weighed = 0
    for key, value in original.items():
        if QUANTIZED_KEY.match(key):
            # per row, q/k/v and gate/up weigh their columns by the norm they read (o_proj, down_proj: none)
            norm = convert_mod.input_norm_name(key, original) if group_size is None else None
            weighed += norm is not None
            wq, scales, biases = quantize(mx.array(value), 4, group_size, dtype=mx.float16, rounding="search",
                                          column_weights=None if norm is None else mx.array(original[norm]))
            stem = key[: -len("weight")]
            assert np.array_equal(written[key].astype(np.uint64), np.array(wq).astype(np.uint64))
            assert np.array_equal(written[stem + "scales"], np.array(scales))
            assert np.array_equal(written[stem + "biases"], np.array(biases))
    assert weighed == (5 * 2 if group_size is None else 0)  # two layers
    layer = load_model(out).model.layers[1].mlp.down_proj  # loads as any 4-bit folder
    reference = QuantizedLinear.from_linear(load_model(tiny_hf_checkpoint).model.layers[1].mlp.down_proj,
                                            group_size=group_size, dtype=mx.float16, rounding="search")
    assert mx.array_equal(layer.dequantize(mx.float32), reference.dequantize(mx.float32))
    with pytest.raises(UserError, match="rounding"):
        convert_checkpoint(tiny_hf_checkpoint, tmp_path / "bad", rounding="magic", progress=False)


def test_input_norm_names():
    """Which norm each projection reads: q/k/v (Phi-3's qkv_proj) input_layernorm; gate/up (gate_up_proj)
    Gemma's pre_feedforward_layernorm where it exists, else post_attention_layernorm; o/down none; any
    prefix (a multimodal checkpoint's language model)."""
    layer = "model.layers.3"
    plain = {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
    gemma = plain | {f"{layer}.pre_feedforward_layernorm.weight"}
    name = convert_mod.input_norm_name
    assert name(f"{layer}.self_attn.k_proj.weight", plain) == f"{layer}.input_layernorm.weight"
    assert name(f"{layer}.self_attn.qkv_proj.weight", plain) == f"{layer}.input_layernorm.weight"
    assert name(f"{layer}.mlp.gate_up_proj.weight", plain) == f"{layer}.post_attention_layernorm.weight"
    assert name(f"{layer}.mlp.up_proj.weight", gemma) == f"{layer}.pre_feedforward_layernorm.weight"
    assert name(f"{layer}.self_attn.o_proj.weight", plain) is None
    assert name(f"{layer}.mlp.down_proj.weight", plain) is None
    assert name(f"{layer}.mlp.gate_proj.weight", set()) is None  # no norm in the checkpoint: unweighed
    lm = "language_model.model.layers.0"
    assert name(f"{lm}.self_attn.q_proj.weight", {f"{lm}.input_layernorm.weight"}) == f"{lm}.input_layernorm.weight"


def test_group_size_and_float16(tiny_hf_checkpoint, tmp_path):
    out = tmp_path / "mlx16"
    convert_checkpoint(tiny_hf_checkpoint, out, group_size=32, dtype="float16", progress=False)
    model = load_model(out)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantizedLinear) and q.group_size == 32 and q.scales.shape == (64, 5)
    assert q.scales.dtype == mx.float16 and model.model.embed_tokens.weight.dtype == mx.float16
    # float16 storage changes the logits by little next to 4-bit quantization itself
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full = np.array(load_model(tiny_hf_checkpoint)(ids))
    ours = np.array(model(ids).astype(mx.float32))
    in_memory = np.array(quantize_model(load_model(tiny_hf_checkpoint), group_size=32)(ids))
    assert np.linalg.norm(ours - in_memory) <= 0.02 * np.linalg.norm(full)
    assert np.linalg.norm(ours - full) <= 0.2 * np.linalg.norm(full)


def test_full_precision_copy_and_llama(hf_checkpoint_factory, tmp_path):
    src = hf_checkpoint_factory("tiny-llama", arch="llama")
    out = tmp_path / "llama"
    result = convert_checkpoint(src, out, dtype="float32", quantize=False, progress=False)
    assert result.quantization is None and result.n_quantized == 0
    assert "quantization" not in json.loads((out / "config.json").read_text())
    ids = mx.array([[5, 6, 7, 8]])
    assert mx.array_equal(load_model(out)(ids), load_model(src)(ids))


def test_bfloat16_source(tiny_hf_checkpoint, tmp_path):
    """A bfloat16 checkpoint (as Mistral's are) converts: bfloat16 -> float32 -> 4 bits."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf16"
    shutil.copytree(tiny_hf_checkpoint, src)
    file = src / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}, str(file), metadata={"format": "pt"})
    out = tmp_path / "out"
    convert_checkpoint(src, out, progress=False)  # dtype auto: the checkpoint's bfloat16
    assert json.loads((out / "mlx_qlora.json").read_text())["converted"]["dtype"] == "bfloat16"
    written = _read_with_safetensors(out)
    original = load_file(str(file))
    key = "model.layers.0.mlp.up_proj.weight"
    wq, scales, _ = quantize(mx.array(original[key].float().numpy()), 4, None, dtype=mx.bfloat16)
    assert np.array_equal(written[key].astype(np.uint64), np.array(wq).astype(np.uint64))
    assert np.array_equal(written["model.norm.weight"], original["model.norm.weight"].float().numpy())


def test_auto_dtype_keeps_half_precision_and_halves_float32(tiny_hf_checkpoint, tmp_path):
    """``--dtype auto`` (the default) stores what the checkpoint stores in half precision, float16 for float32."""
    from mlx_qlora.convert import auto_dtype

    assert ConvertConfig().dtype == "auto"
    out = tmp_path / "out"
    convert_checkpoint(tiny_hf_checkpoint, out, progress=False)  # the tiny checkpoint is float32
    model = load_model(out)
    assert model.model.embed_tokens.weight.dtype == mx.float16 and model.layers[0].mlp.up_proj.scales.dtype == mx.float16
    assert auto_dtype(sorted(tiny_hf_checkpoint.glob("*.safetensors"))) == "float16"


def test_verification_rejects_non_finite_weights(tiny_hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(tiny_hf_checkpoint, src)
    file = src / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.norm.weight holds NaN"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_pickles_and_unknown_architectures(tiny_hf_checkpoint, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(tiny_hf_checkpoint / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"no \*\.safetensors.*pickle"):
        convert_checkpoint(pickled, tmp_path / "o1", progress=False)

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_hf_checkpoint, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="architectures.*not supported"):
        convert_checkpoint(gpt2, tmp_path / "o2", progress=False)
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": None}))
    with pytest.raises(UserError, match="model_type"):
        convert_checkpoint(gpt2, tmp_path / "o3", progress=False)
    (gpt2 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UserError, match="already quantized"):
        convert_checkpoint(gpt2, tmp_path / "o4", progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_existing_output_and_bad_options(tiny_hf_checkpoint, tmp_path):
    """A folder that is not a model folder of ours is never replaced, --overwrite or not; ours only with it."""
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a model folder written by mlx-qlora .*'keep.txt'"):
            convert_checkpoint(tiny_hf_checkpoint, out, overwrite=overwrite, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="group_size"):
        convert_checkpoint(tiny_hf_checkpoint, tmp_path / "g", group_size=48, progress=False)
    with pytest.raises(UserError, match="intermediate_size = 160"):
        convert_checkpoint(tiny_hf_checkpoint, tmp_path / "g", group_size=64, progress=False)
    ours = tmp_path / "ours"
    convert_checkpoint(tiny_hf_checkpoint, ours, progress=False)
    with pytest.raises(UserError, match=r"already exists \(a model folder written by mlx-qlora\); give --overwrite"):
        convert_checkpoint(tiny_hf_checkpoint, ours, group_size=32, progress=False)
    convert_checkpoint(tiny_hf_checkpoint, ours, group_size=32, overwrite=True, progress=False)
    assert json.loads((ours / "config.json").read_text())["quantization"]["group_size"] == 32


def test_disk_full_leaves_nothing(tiny_hf_checkpoint, tmp_path, monkeypatch):
    parent = tmp_path / "disk"
    parent.mkdir()
    calls = []

    def full(f, value):
        calls.append(value.shape)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(memoryview(mx.contiguous(value)))

    monkeypatch.setattr(convert_mod, "_write_bytes", full)
    with pytest.raises(UserError, match="disk full.*nothing was written"):
        convert_checkpoint(tiny_hf_checkpoint, parent / "out", progress=False)
    assert list(parent.iterdir()) == []

    monkeypatch.setattr(convert_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="not enough free disk space"):
        convert_checkpoint(tiny_hf_checkpoint, parent / "out", progress=False)
    assert list(parent.iterdir()) == []


def test_hub_errors(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub"):
        convert_checkpoint("mistralai/Mistral-7B-v0.1", tmp_path / "o", progress=False)

    requested = {}

    def not_found(repo_id, allow_patterns):
        requested.update(repo_id=repo_id, allow_patterns=allow_patterns)
        error = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
        error.args = ("404 Repository Not Found",)
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(UserError, match="repository not found"):
        convert_checkpoint("someone/no-such-model", tmp_path / "o", progress=False)
    assert requested["repo_id"] == "someone/no-such-model"
    assert "*.safetensors" in requested["allow_patterns"] and not any(".bin" in p for p in requested["allow_patterns"])

    with pytest.raises(UserError, match="no such directory"):
        convert_checkpoint(str(tmp_path / "missing" / "folder"), tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="nor a valid hub repo id"):
        convert_checkpoint("bad id!", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_script(tiny_hf_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "scripts" / "convert_weights.py")
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, script, "--hf-path", str(tiny_hf_checkpoint), "--mlx-path", str(out),
                           "--group-size", "32", "--dtype", "float32"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "4-bit, group size 32" in done.stdout
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32
    failed = subprocess.run([sys.executable, script, "--hf-path", str(tiny_hf_checkpoint), "--mlx-path", str(out)],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: {out}: already exists (a model folder written by mlx-qlora); give --overwrite to replace it, or "
        "choose another --mlx-path"]


def test_calibrated_conversion(tiny_model_dirs, tmp_path):
    """--calibration-data: GPTQ layer by layer on the prepared data; the folder loads, records how it was
    made, and its logits on calibration text are closer to the full model's than the searched ranges'."""
    from mlx_qlora.config import DataConfig
    from mlx_qlora.data import prepare_dataset
    from mlx_qlora.data.dataset import PreparedDataset

    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "dolly_sample.jsonl"
    full = tiny_model_dirs["full"]
    data = tmp_path / "data"
    prepare_dataset(sample, full / "tokenizer.model", data, DataConfig(max_seq_len=256, val_fraction=0.1))
    train = PreparedDataset(data, "train")
    calibrated, searched = tmp_path / "gptq", tmp_path / "search"
    convert_checkpoint(full, calibrated, rounding="search", calibration_data=data, calibration_examples=24,
                       dtype="float32", progress=False)
    convert_checkpoint(full, searched, rounding="search", dtype="float32", progress=False)
    record = json.loads((calibrated / "mlx_qlora.json").read_text())["converted"]
    assert record["calibration"]["method"] == "gptq" and record["calibration"]["examples"] == min(24, len(train.lengths))

    ids = mx.array(np.stack([train[i]["input_ids"][:24] for i in range(6)]))
    reference = load_model(full)(ids)

    def error(folder):
        return (mx.linalg.norm(load_model(folder)(ids) - reference) / mx.linalg.norm(reference)).item()

    assert error(calibrated) < error(searched)
    with pytest.raises(UserError, match="not a prepared data directory"):
        convert_checkpoint(full, tmp_path / "bad", calibration_data=tmp_path / "missing", progress=False)


def test_loftq_conversion_and_init(tiny_hf_checkpoint, tmp_path):
    """--loftq-rank writes Q and the factors; adapters set from them (at another alpha) start nearer the
    full weights than the plain conversion with the default init (B = 0)."""
    from mlx_qlora.lora import apply_lora
    from mlx_qlora.lora.loftq import init_from_loftq

    out, plain = tmp_path / "loftq", tmp_path / "plain"
    convert_checkpoint(tiny_hf_checkpoint, out, loftq_rank=4, dtype="float32", progress=False)
    convert_checkpoint(tiny_hf_checkpoint, plain, dtype="float32", progress=False)
    assert json.loads((out / "mlx_qlora.json").read_text())["converted"]["loftq"]["rank"] == 4
    model = apply_lora(load_model(out), rank=4, alpha=32.0)
    assert init_from_loftq(model, out) == 14
    full = load_model(tiny_hf_checkpoint).model.layers[1].mlp.up_proj.weight
    adapter = model.model.layers[1].mlp.up_proj
    start = adapter.base.dequantize(mx.float32) + adapter.delta_weight()
    default = load_model(plain).model.layers[1].mlp.up_proj.dequantize(mx.float32)
    assert mx.linalg.norm(full - start).item() < 0.9 * mx.linalg.norm(full - default).item()
    with pytest.raises(UserError, match="rank 4; pass --lora-rank 4"):
        init_from_loftq(apply_lora(load_model(out), rank=8), out)
    with pytest.raises(UserError, match="no LoftQ factors"):
        init_from_loftq(apply_lora(load_model(plain), rank=4), plain)


def test_loftq_with_searched_rows_weighs_columns_as_the_plain_search(tiny_hf_checkpoint, tmp_path):
    """--loftq-rank with --rounding search (per row): each quantization of LoftQ's alternation weighs the
    columns by the input norm as the plain search does: the written q_proj is exactly loftq_quantize's with
    the checkpoint's input_layernorm, and differs from the one without it."""
    from mlx_qlora.lora.loftq import loftq_quantize

    out = tmp_path / "loftq-search"
    convert_checkpoint(tiny_hf_checkpoint, out, loftq_rank=4, rounding="search", dtype="float32", progress=False)
    original, written = _read_with_safetensors(tiny_hf_checkpoint), _read_with_safetensors(out)
    key = "model.layers.1.self_attn.q_proj.weight"
    norm = mx.array(original["model.layers.1.input_layernorm.weight"])
    with_norm = loftq_quantize(mx.array(original[key]), 4, 4, None, mx.float32, "search", column_weights=norm)[0]
    without = loftq_quantize(mx.array(original[key]), 4, 4, None, mx.float32, "search")[0]
    stem = key[: -len("weight")]
    assert np.array_equal(written[stem + "scales"], np.array(with_norm[1]))
    assert np.array_equal(written[key].astype(np.uint64), np.array(with_norm[0]).astype(np.uint64))
    assert not np.array_equal(np.array(without[1]), np.array(with_norm[1]))


def test_calibrated_loftq_conversion(tiny_model_dirs, tmp_path):
    """--calibration-data with --loftq-rank: GPTQ's weights with factors fitted on the same inputs. The
    first layer's q_proj (whose inputs do not depend on any factor) is exactly the plain calibrated
    conversion's, its factors are ``calibrated_factors`` of its error on those inputs, and the start
    ``Q + B A`` gives logits nearer the full model's than Q alone."""
    from mlx_qlora.calibration import calibration_sequences
    from mlx_qlora.config import DataConfig
    from mlx_qlora.data import prepare_dataset
    from mlx_qlora.data.dataset import PreparedDataset
    from mlx_qlora.lora import apply_lora
    from mlx_qlora.lora.adapters import load_adapters
    from mlx_qlora.lora.loftq import calibrated_factors, init_from_loftq
    from mlx_qlora.quant.gptq import DAMP

    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "dolly_sample.jsonl"
    full = tiny_model_dirs["full"]
    data = tmp_path / "data"
    prepare_dataset(sample, full / "tokenizer.model", data, DataConfig(max_seq_len=256, val_fraction=0.1))
    both, gptq = tmp_path / "both", tmp_path / "gptq"
    for folder, rank in ((both, 4), (gptq, None)):
        convert_checkpoint(full, folder, rounding="search", calibration_data=data, calibration_examples=12,
                           loftq_rank=rank, dtype="float32", progress=False)
    record = json.loads((both / "mlx_qlora.json").read_text())["converted"]
    assert record["loftq"] == {"rank": 4, "adapters": "loftq", "fit": "calibrated"}
    written, plain = _read_with_safetensors(both), _read_with_safetensors(gptq)
    key = "model.layers.0.self_attn.q_proj"
    for part in ("weight", "scales", "biases"):
        assert np.array_equal(written[f"{key}.{part}"], plain[f"{key}.{part}"]), part

    model = load_model(full)
    sequences = calibration_sequences(data, 12, 512, model.args.vocab_size)
    hidden = [model.model.layers[0].input_layernorm(model.model.embed_tokens(mx.array(s)[None]))[0] for s in sequences]
    x = np.concatenate([np.array(h, dtype=np.float64) for h in hidden])  # (tokens, in) of layer 0's q/k/v
    w = np.array(model.model.layers[0].self_attn.q_proj.weight, dtype=np.float64)
    q = np.array(load_model(gptq).model.layers[0].self_attn.q_proj.dequantize(mx.float32), dtype=np.float64)
    factors, _ = load_adapters(both / "loftq")
    a, b = np.array(factors[key + ".lora_A"]), np.array(factors[key + ".lora_B"])
    eb, ea = calibrated_factors(w - q, x.T @ x, 4, DAMP)
    np.testing.assert_allclose(b @ a, eb @ ea, atol=1e-4)

    ids = mx.array(np.stack([PreparedDataset(data, "train")[i]["input_ids"][:24] for i in range(6)]))
    reference = model(ids)
    start = apply_lora(load_model(both), rank=4, alpha=8.0)
    assert init_from_loftq(start, both) == 14

    def error(m):
        return (mx.linalg.norm(m(ids) - reference) / mx.linalg.norm(reference)).item()

    assert error(start) < error(load_model(gptq))
