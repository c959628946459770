"""The compute dtype of ``--dtype auto`` (the default): float32 on the CPU, the checkpoint's half-precision
dtype on a GPU (bfloat16 for a float32 checkpoint), read from the safetensors header without loading."""

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
import pytest

from mlx_qlora.model.loading import compute_dtype, stored_dtype


def _checkpoint(folder, dtype):
    folder.mkdir()
    tensors = {"model.norm.weight": mx.ones((8,), dtype=mx.float32),
               "model.embed_tokens.weight": mx.zeros((16, 8), dtype=dtype)}
    mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    return folder


@pytest.mark.parametrize("dtype,name", [(mx.bfloat16, "bfloat16"), (mx.float16, "float16"), (mx.float32, "float32")])
def test_stored_dtype_is_the_embeddings(tmp_path, dtype, name):
    assert stored_dtype(_checkpoint(tmp_path / "m", dtype)) == name


@pytest.mark.parametrize("stored,device,want", [
    (mx.bfloat16, "cpu", "float32"), (mx.float16, "cpu", "float32"),
    (mx.bfloat16, "gpu", "bfloat16"), (mx.float16, "gpu", "float16"), (mx.float32, "gpu", "bfloat16"),
])
def test_auto(tmp_path, stored, device, want):
    dtype, why = compute_dtype("auto", _checkpoint(tmp_path / "m", stored), device)
    assert dtype == want and why.startswith("auto")


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_an_explicit_dtype_is_kept(tmp_path, device):
    assert compute_dtype("float16", _checkpoint(tmp_path / "m", mx.bfloat16), device) == ("float16", "--dtype")
