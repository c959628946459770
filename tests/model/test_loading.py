"""Checkpoint loading refuses what it cannot use with a ``UserError`` naming the file and the tensor or key:
NaN/inf values (as stored, whatever the dtype asked for), a quantization we do not implement, a truncated file."""

from __future__ import annotations

import json
import shutil

import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.model import load_model
from mlx_qlora.model.loading import check_finite


def _spoil(folder, name, value, index=(0, 0)):
    """Set one value of the tensor ``name`` in the single safetensors file of ``folder``; return the file."""
    file = next(folder.glob("*.safetensors"))
    tensors = mx.load(str(file))
    tensor = tensors[name]
    tensor[index] = value
    tensors[name] = tensor
    mx.save_safetensors(str(file), tensors, metadata={"format": "pt"})
    return file


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_name_the_file_and_tensor(tiny_hf_checkpoint, tmp_path, value):
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_checkpoint, folder)
    file = _spoil(folder, "model.layers.0.self_attn.k_proj.weight", value, (2, 7))
    message = f"{file}: tensor model.layers.0.self_attn.k_proj.weight holds NaN or infinite values"
    with pytest.raises(UserError, match=message):
        load_model(folder)
    with pytest.raises(UserError, match=message):  # checked as stored, not after the cast
        load_model(folder, dtype="float16")


def test_non_finite_scales_of_a_4bit_checkpoint(tiny_model_dirs, tmp_path):
    folder = tmp_path / "q4"
    shutil.copytree(tiny_model_dirs["quant"], folder)
    _spoil(folder, "model.layers.1.mlp.up_proj.scales", float("nan"), (4, 0))
    with pytest.raises(UserError, match="tensor model.layers.1.mlp.up_proj.scales holds NaN"):
        load_model(folder)
    load_model(tiny_model_dirs["quant"])  # the untouched one loads


def test_check_finite_counts_and_skips_integer_tensors():
    tensors = {"a": mx.array([1.0, float("nan")]), "b": mx.array([1, 2], dtype=mx.uint32),
               "c": mx.array([float("inf")], dtype=mx.bfloat16), "d": mx.ones((3,))}
    with pytest.raises(UserError, match=r"^f: tensor a holds NaN or infinite values \(and 1 more tensor\(s\)\); why$"):
        check_finite(tensors, "f", why="why")
    check_finite({"b": tensors["b"], "d": tensors["d"]}, "f")


@pytest.mark.parametrize("quantization, message", [
    ({"bits": 3}, r"quantization: bits: 3 is not supported"),
    ({"group_size": 48}, r"quantization: .*48"),
    ({"bits": None}, r"quantization: "),
])
def test_unsupported_quantization_is_a_user_error(tiny_model_dirs, tmp_path, quantization, message):
    folder = tmp_path / "q"
    shutil.copytree(tiny_model_dirs["quant"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"].update(quantization)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"{folder / 'config.json'}: {message}"):
        load_model(folder)


def test_truncated_file(tiny_hf_checkpoint, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_checkpoint, folder)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100_000])
    with pytest.raises(UserError, match=f"{file}: cannot be read as safetensors"):
        load_model(folder)
