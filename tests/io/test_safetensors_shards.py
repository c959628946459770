"""io.write_safetensors_shards: the index maps every tensor to the file that holds it, shards keep the size
bound (a tensor larger than it alone in its shard), natural name order, Hugging Face's file names, and a
tiny transformers model written this way loads in transformers with every weight equal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)

from mlx_qlora.io import SAFETENSORS_INDEX_NAME, natural_key, write_safetensors_shards


def _numpy_writer(tensors: dict[str, np.ndarray]):
    from safetensors.numpy import save_file

    def write(path: Path, names: list[str]) -> None:
        save_file({k: tensors[k] for k in names}, str(path), metadata={"format": "pt"})

    return write


def _tensors() -> dict[str, np.ndarray]:
    """Twelve layers of differently sized float32 tensors (inserted out of order) and one tensor of 40,000 bytes."""
    rng = np.random.default_rng(0)
    tensors = {}
    for i in (10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9):
        tensors[f"model.layers.{i}.mlp.weight"] = rng.standard_normal((8, 16 + 4 * i)).astype(np.float32)
        tensors[f"model.layers.{i}.norm.weight"] = rng.standard_normal(8).astype(np.float32)
    tensors["model.embed_tokens.weight"] = rng.standard_normal((100, 100)).astype(np.float32)  # 40,000 bytes
    return tensors


def _read_folder(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{file: {name: array}}`` of every safetensors file, through the ``safetensors`` library."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            assert f.metadata() == {"format": "pt"}
            out[file.name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


@pytest.mark.parametrize("bound", [1_000, 3_000, 10_000])
def test_index_maps_every_tensor_to_its_file_and_shards_keep_the_bound(tmp_path, bound):
    tensors = _tensors()
    sizes = {k: v.nbytes for k, v in tensors.items()}
    names = write_safetensors_shards(tmp_path, sizes, bound, _numpy_writer(tensors))

    n = len(names)
    assert n > 1 and names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / SAFETENSORS_INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": sum(sizes.values())}
    files = _read_folder(tmp_path)
    assert sorted(files) == sorted(names)
    held = {name: file for file, content in files.items() for name in content}
    assert index["weight_map"] == held and set(held) == set(tensors)
    for content in files.values():
        for name, value in content.items():
            np.testing.assert_array_equal(value, tensors[name])

    shards = [list(files[file]) for file in names]
    for shard in shards:
        total = sum(sizes[k] for k in shard)
        assert total <= bound or len(shard) == 1, (shard, total)
    big = "model.embed_tokens.weight"
    assert [big] in shards  # larger than every bound here: a shard of its own
    # natural order across the files, and each shard as full as it can be: the next tensor did not fit
    in_order = [k for file in names for k in sorted(files[file], key=natural_key)]
    assert in_order == sorted(tensors, key=natural_key)
    assert in_order.index("model.layers.2.mlp.weight") < in_order.index("model.layers.10.mlp.weight")
    for shard, following in zip(shards, shards[1:]):
        first_next = min(following, key=natural_key)
        assert sum(sizes[k] for k in shard) + sizes[first_next] > bound


def test_one_shard_is_model_safetensors_without_an_index_unless_numbered(tmp_path):
    tensors = _tensors()
    sizes = {k: v.nbytes for k, v in tensors.items()}
    assert write_safetensors_shards(tmp_path / "a", sizes, 10**9, _numpy_writer(tensors)) == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors"]

    names = write_safetensors_shards(tmp_path / "b", sizes, 10**9, _numpy_writer(tensors), numbered=True)
    assert names == ["model-00001-of-00001.safetensors"]
    index = json.loads((tmp_path / "b" / SAFETENSORS_INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {names[0]} and set(index["weight_map"]) == set(tensors)


def test_given_order_is_kept_without_natural_order(tmp_path):
    sizes = {"c": 4, "b": 4, "a": 4}
    written: list[list[str]] = []
    names = write_safetensors_shards(tmp_path, sizes, 8, lambda path, shard: (written.append(shard),
                                                                               path.write_bytes(b"")),
                                     natural_order=False)
    assert written == [["c", "b"], ["a"]] and len(names) == 2
    index = json.loads((tmp_path / SAFETENSORS_INDEX_NAME).read_text())
    assert list(index["weight_map"]) == ["c", "b", "a"]


def test_transformers_loads_a_folder_written_in_shards(tiny_hf_checkpoint, tmp_path):
    import torch
    import transformers
    from safetensors.numpy import load_file

    original = load_file(str(tiny_hf_checkpoint / "model.safetensors"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = write_safetensors_shards(folder, {k: v.nbytes for k, v in original.items()}, 40_000,
                                     _numpy_writer(original))
    assert len(names) > 2
    shutil.copyfile(tiny_hf_checkpoint / "config.json", folder / "config.json")

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for name, value in original.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
