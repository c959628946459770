"""LoRA adapter files in PEFT's format, so ``peft.PeftModel.from_pretrained`` reads ours and we read PEFT's.

A folder holds two files:

- ``adapter_model.safetensors``: for every adapted projection P of layer i,
  ``base_model.model.model.layers.{i}.{self_attn|mlp}.{P}.lora_A.weight`` of shape (r, in) and
  ``...lora_B.weight`` of shape (out, r) (metadata ``{"format": "pt"}``, as PEFT writes);
- ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ``bias`` none, ``fan_in_fan_out``
  false, ``base_model_name_or_path``, ``layers_to_transform`` when only some layers are adapted).

In memory the adapters are a flat dict keyed by our module paths, ``model.layers.{i}.self_attn.q_proj.lora_A``,
with the same shapes as PEFT's (``LoRALinear`` stores A as (r, in) and B as (out, r)): the two names differ
by the prefix ``base_model.model.`` and the suffix ``.weight`` only.

Multimodal bases (Gemma 3's ``Gemma3ForConditionalGeneration``): we train and save the language model as the
text model it is (``model/families/multimodal.py``), so our files carry the text-only names above and load in
PEFT onto the text model (``Gemma3ForCausalLM``, e.g. the merged output). We also read a PEFT LoRA made on the
multimodal model when it adapts the language model only: its names ``base_model.model.model.language_model.
layers...`` (transformers 5) or ``base_model.model.language_model.model.layers...`` (transformers 4) are read as
``model.layers...``; a LoRA on the vision tower or projector is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from ..config import KNOWN_TARGETS, LoRAConfig
from ..errors import UserError
from ..io import atomic_write_file, atomic_write_json, read_json
from ..model.loading import check_finite

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

# The sub-module of a decoder layer that holds each projection.
PROJECTION_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "qkv_proj": "self_attn", "gate_up_proj": "mlp",
}

_PROJ = "|".join(KNOWN_TARGETS)
OUR_KEY = re.compile(rf"^model\.layers\.(\d+)\.(self_attn|mlp)\.({_PROJ})\.lora_(A|B)$")
PEFT_KEY = re.compile(rf"^base_model\.model\.(?:model\.|model\.language_model\.|language_model\.model\.)layers\.(\d+)\.(self_attn|mlp)\.({_PROJ})\.lora_(A|B)(\.default)?\.weight$")

# PEFT LoraConfig fields whose non-default values change the adapter's meaning in ways we do not implement.
_UNSUPPORTED = {
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "exclude_modules": (None, []),
}


def our_path(peft_key: str) -> Optional[str]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A[.default].weight`` (or a multimodal model's
    ``...model.language_model.layers.0...``) -> our path, or None."""
    match = PEFT_KEY.match(peft_key)
    if match is None or PROJECTION_PARENT[match.group(3)] != match.group(2):
        return None
    layer, parent, proj, ab = match.group(1, 2, 3, 4)
    return f"model.layers.{int(layer)}.{parent}.{proj}.lora_{ab}"


def peft_key(path: str) -> str:
    """Our path ``model.layers.0.self_attn.q_proj.lora_A`` -> PEFT's ``base_model.model.<path>.weight``."""
    match = OUR_KEY.match(path)
    if match is None or PROJECTION_PARENT[match.group(3)] != match.group(2):
        raise ValueError(f"not a LoRA parameter path: {path!r} (expected model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>)")
    return f"{PEFT_PREFIX}{path}.weight"


def _layers_and_targets(paths) -> tuple[list[int], list[str]]:
    layers, targets = set(), set()
    for path in paths:
        match = OUR_KEY.match(path)
        layers.add(int(match.group(1)))
        targets.add(match.group(3))
    return sorted(layers), [t for t in KNOWN_TARGETS if t in targets]


def _check_pairs(params: dict[str, mx.array], rank: int, where: str, error=UserError) -> None:
    """Every A has its B and the shapes are (r, in) / (out, r) with r = ``rank``."""
    for path, value in sorted(params.items()):
        other = path[:-1] + ("B" if path.endswith("A") else "A")
        if other not in params:
            raise error(f"{where}: {path} has no matching {other.rsplit('.', 1)[1]}")
        if value.ndim != 2:
            raise error(f"{where}: {path} has shape {tuple(value.shape)}, expected a matrix")
        r = value.shape[0] if path.endswith("A") else value.shape[1]
        if r != rank:
            raise error(f"{where}: {path} has shape {tuple(value.shape)}, which does not match rank r={rank}")


def peft_config_dict(lora_config: LoRAConfig, base_model_name_or_path: Optional[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` contents for ``lora_config`` (PEFT ``LoraConfig`` field names)."""
    alpha = lora_config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": lora_config.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": lora_config.dropout,
        "target_modules": list(lora_config.targets),
        "layers_to_transform": None if lora_config.layers is None else sorted(int(i) for i in lora_config.layers),
        "layers_pattern": None,
        "use_rslora": lora_config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def save_adapters(
    directory: str | os.PathLike,
    lora_params: dict[str, mx.array],
    lora_config: LoRAConfig,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory`` (created if needed).

    lora_params: flat ``{our path: array}``; A (r, in) and B (out, r), r = ``lora_config.rank``, any float
    dtype (stored as given). Each file is written to a temporary name and renamed, the weights first.
    Returns the folder. Raises ``ValueError`` on a path that is not a LoRA parameter or a shape that does
    not match the rank.
    """
    directory = Path(directory)
    if not lora_params:
        raise ValueError("no LoRA parameters to save")
    tensors = {peft_key(path): value for path, value in lora_params.items()}
    _check_pairs(lora_params, lora_config.rank, "save_adapters", error=ValueError)
    # mx.save_safetensors appends ".safetensors" to a name without it: the temporary name ends with it
    atomic_write_file(directory / WEIGHTS_NAME,
                      lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata={"format": "pt"}),
                      suffix=".tmp.safetensors")
    atomic_write_json(directory / CONFIG_NAME, peft_config_dict(lora_config, base_model_name_or_path))
    return directory


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json``; raise ``UserError`` naming the file and field on anything
    we cannot reproduce (another PEFT method, DoRA, biases, per-module ranks, ...)."""
    path = Path(path)
    values = read_json(path, missing=f"not found (an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    if values.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {values.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in values:
            raise UserError(f"{path}: missing field {key!r}")
    for key, allowed in _UNSUPPORTED.items():
        if key in values and values[key] not in allowed:
            raise UserError(f"{path}: {key} = {values[key]!r} is not supported (expected {allowed[0]!r})")
    pattern = values.get("layers_pattern")
    if pattern not in (None, "layers", ["layers"]):
        raise UserError(f"{path}: layers_pattern = {pattern!r} is not supported (expected 'layers')")
    targets = values["target_modules"]
    if isinstance(targets, list):
        bad = [t for t in targets if t not in KNOWN_TARGETS]
        if bad:
            raise UserError(f"{path}: target_modules {bad} are not supported (choose from {', '.join(KNOWN_TARGETS)})")
    elif not isinstance(targets, str):
        raise UserError(f"{path}: target_modules must be a list or a string, got {targets!r}")
    return values


def base_model_name(directory: str | os.PathLike) -> Optional[str]:
    """The ``base_model_name_or_path`` that ``directory``'s ``adapter_config.json`` names, or None."""
    name = read_peft_config(Path(directory) / CONFIG_NAME).get("base_model_name_or_path")
    return None if name is None else str(name)


def load_adapters(directory: str | os.PathLike) -> tuple[dict[str, mx.array], LoRAConfig]:
    """Read adapters saved by ``save_adapters`` or by PEFT's ``save_pretrained``.

    Returns ``(params, lora_config)``: params flat ``{our path: array}`` in the dtype stored in the file
    (A (r, in), B (out, r)); keys with PEFT's ``.default`` adapter-name segment are accepted. Raises
    ``UserError`` naming the file and key when a file is missing, a key is unexpected or missing, a
    shape does not match ``r``, or a tensor holds NaN or infinite values.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    values = read_peft_config(config_path)
    if not weights_path.exists():
        hint = " (PEFT's .bin format is not supported: save with safe_serialization=True)" if (
            directory / "adapter_model.bin").exists() else ""
        raise UserError(f"{weights_path}: not found{hint}")
    try:
        tensors = mx.load(str(weights_path))
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{weights_path}: cannot read safetensors ({e})") from None

    params: dict[str, mx.array] = {}
    for key, value in tensors.items():
        path = our_path(key)
        if path is None:
            raise UserError(f"{weights_path}: unexpected key {key!r} (expected {PEFT_PREFIX}model.layers.<i>."
                            f"<self_attn|mlp>.<proj>.lora_<A|B>.weight)")
        if path in params:
            raise UserError(f"{weights_path}: {key!r} appears twice (with and without '.default')")
        params[path] = value
    if not params:
        raise UserError(f"{weights_path}: holds no LoRA weights")

    present_layers, present_targets = _layers_and_targets(params)
    if isinstance(values["target_modules"], list):
        targets = [t for t in KNOWN_TARGETS if t in values["target_modules"]]
    else:  # a regular expression in PEFT: take the projections the file holds
        targets = present_targets
    layers = values.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None:
        expected_layers = sorted(int(i) for i in layers)
    else:
        expected_layers = list(range(present_layers[-1] + 1))
        if isinstance(values["target_modules"], str) and present_layers != expected_layers:
            layers = expected_layers = present_layers
    expected = {
        f"model.layers.{i}.{PROJECTION_PARENT[t]}.{t}.lora_{ab}"
        for i in expected_layers for t in targets for ab in ("A", "B")
    }
    extra = sorted(set(params) - expected)
    if extra:
        raise UserError(f"{weights_path}: unexpected key {peft_key(extra[0])!r} (not in the layers/target_modules "
                        f"of {config_path.name})")
    missing = sorted(expected - set(params))
    if missing:
        raise UserError(f"{weights_path}: missing key {peft_key(missing[0])!r} (required by {config_path.name})")

    try:
        config = LoRAConfig(
            rank=int(values["r"]),
            alpha=float(values["lora_alpha"]),
            dropout=float(values.get("lora_dropout") or 0.0),
            targets=tuple(targets),
            layers=None if layers is None else [int(i) for i in layers],
            use_rslora=bool(values.get("use_rslora", False)),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_path}: {e}") from None
    _check_pairs(params, config.rank, str(weights_path))
    check_finite(tensors, weights_path)
    return params, config
