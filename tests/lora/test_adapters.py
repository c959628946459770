"""PEFT adapter files: PEFT's save_pretrained -> our load_adapters, and our save_adapters -> PeftModel.from_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.config import LoRAConfig
from mlx_qlora.errors import UserError
from mlx_qlora.lora.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapters, save_adapters
from support import randomize_peft_lora

# (in, out) of each projection of the tiny fixture model (hidden 64, 4 heads / 2 KV heads of 16, MLP 160).
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 160), "up_proj": (64, 160), "down_proj": (160, 64)}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _hf_model(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _our_params(config: LoRAConfig, n_layers: int = 2, seed: int = 0) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    params = {}
    for i in config.layers if config.layers is not None else range(n_layers):
        for t in config.targets:
            d_in, d_out = SHAPES[t]
            prefix = f"model.layers.{i}.{PARENT[t]}.{t}"
            params[f"{prefix}.lora_A"] = mx.array(rng.standard_normal((config.rank, d_in)).astype(np.float32))
            params[f"{prefix}.lora_B"] = mx.array(rng.standard_normal((d_out, config.rank)).astype(np.float32))
    return params


def _peft_lora_tensors(peft_model) -> dict[str, np.ndarray]:
    """PEFT's LoRA weights keyed by our path (from its in-memory names, '...lora_A.default.weight')."""
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_" in name:
            path = name.removeprefix("base_model.model.").replace(".default.weight", "")
            out[path] = p.detach().numpy().copy()
    return out


@pytest.mark.parametrize(
    "peft_kwargs, expected",
    [
        (dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["v_proj", "q_proj", "down_proj"]),
         LoRAConfig(rank=4, alpha=8.0, dropout=0.05, targets=("q_proj", "v_proj", "down_proj"))),
        (dict(r=2, lora_alpha=3, target_modules=["o_proj", "up_proj"], layers_to_transform=[1], use_rslora=True),
         LoRAConfig(rank=2, alpha=3.0, targets=("o_proj", "up_proj"), layers=[1], use_rslora=True)),
        (dict(r=3, lora_alpha=6, target_modules=r".*\.(k_proj|gate_proj)"),
         LoRAConfig(rank=3, alpha=6.0, targets=("k_proj", "gate_proj"))),
    ],
)
def test_adapters_saved_by_peft_load_exactly(tmp_path, tiny_hf_checkpoint, peft_kwargs, expected):
    import peft

    model = peft.get_peft_model(_hf_model(tiny_hf_checkpoint), peft.LoraConfig(task_type="CAUSAL_LM", **peft_kwargs))
    randomize_peft_lora(model)
    reference = _peft_lora_tensors(model)
    model.save_pretrained(tmp_path)

    params, config = load_adapters(tmp_path)
    assert config == expected
    assert set(params) == set(reference)
    for path, value in params.items():
        assert value.dtype == mx.float32
        np.testing.assert_array_equal(np.array(value), reference[path], err_msg=path)


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(rank=4, alpha=16.0, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                   "up_proj", "down_proj")),
        LoRAConfig(rank=2, alpha=5.0, targets=("v_proj", "down_proj"), layers=[0], use_rslora=True),
    ],
)
def test_our_adapters_load_in_peft(tmp_path, tiny_hf_checkpoint, config):
    import peft

    ours = _our_params(config)
    save_adapters(tmp_path, ours, config, base_model_name_or_path=str(tiny_hf_checkpoint))
    model = peft.PeftModel.from_pretrained(_hf_model(tiny_hf_checkpoint), tmp_path)

    loaded = _peft_lora_tensors(model)
    assert set(loaded) == set(ours)
    for path, value in ours.items():
        np.testing.assert_array_equal(loaded[path], np.array(value), err_msg=path)
    peft_config = model.peft_config["default"]
    assert peft_config.r == config.rank and peft_config.lora_alpha == config.alpha
    assert set(peft_config.target_modules) == set(config.targets)
    assert peft_config.use_rslora == config.use_rslora and peft_config.lora_dropout == config.dropout
    first = next(iter(ours)).rsplit(".", 1)[0]  # e.g. model.layers.0.self_attn.v_proj
    layer = model.base_model.model.get_submodule(first)
    assert layer.scaling["default"] == pytest.approx(config.scale)


def test_round_trip_keeps_dtype_values_and_config(tmp_path):
    config = LoRAConfig(rank=3, alpha=7.5, targets=("q_proj", "up_proj"), layers=[1, 0])
    params = {k: v.astype(mx.bfloat16) for k, v in _our_params(config).items()}
    save_adapters(tmp_path, params, config, "some/model")
    loaded, loaded_config = load_adapters(tmp_path)
    assert loaded_config == LoRAConfig(rank=3, alpha=7.5, targets=("q_proj", "up_proj"), layers=[0, 1])
    for k, v in params.items():
        assert loaded[k].dtype == mx.bfloat16 and mx.array_equal(loaded[k], v).item()
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["base_model_name_or_path"] == "some/model" and written["layers_to_transform"] == [0, 1]
    assert written["bias"] == "none" and written["fan_in_fan_out"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left


def test_keys_with_the_default_adapter_name_are_accepted(tmp_path):
    config = LoRAConfig(rank=2, targets=("q_proj",))
    params = _our_params(config)
    save_adapters(tmp_path, params, config)
    tensors = mx.load(str(tmp_path / WEIGHTS_NAME))
    mx.save_safetensors(str(tmp_path / WEIGHTS_NAME),
                        {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()})
    loaded, _ = load_adapters(tmp_path)
    assert all(mx.array_equal(loaded[k], v).item() for k, v in params.items())


def _saved(tmp_path, config=None):
    config = config or LoRAConfig(rank=2, targets=("q_proj", "v_proj"))
    save_adapters(tmp_path, _our_params(config), config)
    return mx.load(str(tmp_path / WEIGHTS_NAME)), json.loads((tmp_path / CONFIG_NAME).read_text())


def _error(tmp_path) -> str:
    with pytest.raises(UserError) as info:
        load_adapters(tmp_path)
    return str(info.value)


def test_unexpected_key_is_named(tmp_path):
    tensors, _ = _saved(tmp_path)
    tensors["base_model.model.lm_head.lora_A.weight"] = mx.zeros((2, 64))
    mx.save_safetensors(str(tmp_path / WEIGHTS_NAME), tensors)
    message = _error(tmp_path)
    assert WEIGHTS_NAME in message and "base_model.model.lm_head.lora_A.weight" in message


def test_missing_key_is_named(tmp_path):
    tensors, _ = _saved(tmp_path)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    mx.save_safetensors(str(tmp_path / WEIGHTS_NAME), tensors)
    message = _error(tmp_path)
    assert "missing" in message and "model.layers.1.self_attn.v_proj.lora_B.weight" in message


def test_target_listed_in_config_but_absent_is_missing(tmp_path):
    _, values = _saved(tmp_path)
    values["target_modules"] = ["q_proj", "v_proj", "o_proj"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    assert "o_proj.lora_A.weight" in _error(tmp_path)


def test_rank_mismatch_is_named(tmp_path):
    _, values = _saved(tmp_path)
    values["r"] = 8
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    message = _error(tmp_path)
    assert "r=8" in message and "lora_" in message


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("peft_type", "IA3", "peft_type"),
        ("use_dora", True, "use_dora"),
        ("bias", "all", "bias"),
        ("target_modules", ["q_proj", "lm_head"], "lm_head"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
    ],
)
def test_unsupported_config_fields_are_named(tmp_path, field, value, fragment):
    _, values = _saved(tmp_path)
    values[field] = value
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    message = _error(tmp_path)
    assert CONFIG_NAME in message and fragment in message


def test_missing_files_are_named(tmp_path):
    assert CONFIG_NAME in _error(tmp_path)
    _saved(tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "adapter_model.bin")
    message = _error(tmp_path)
    assert WEIGHTS_NAME in message and "safe_serialization" in message
    (tmp_path / CONFIG_NAME).write_text("{not json")
    assert "not valid JSON" in _error(tmp_path)


def test_save_refuses_bad_paths_and_shapes_without_touching_existing_files(tmp_path):
    config = LoRAConfig(rank=2, targets=("q_proj",))
    save_adapters(tmp_path, _our_params(config), config)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="not a LoRA parameter path"):
        save_adapters(tmp_path, {"model.layers.0.self_attn.q_proj.weight": mx.zeros((2, 2))}, config)
    bad = _our_params(config)
    bad["model.layers.0.self_attn.q_proj.lora_B"] = mx.zeros((64, 3))
    with pytest.raises(ValueError, match="rank"):
        save_adapters(tmp_path, bad, config)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_named(tmp_path, value):
    tensors, _ = _saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    spoiled = tensors[key]
    spoiled[1, 0] = value
    tensors[key] = spoiled
    mx.save_safetensors(str(tmp_path / WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    assert _error(tmp_path) == f"{tmp_path / WEIGHTS_NAME}: tensor {key} holds NaN or infinite values; the file " \
                               "is corrupt or was written from a diverged model"
