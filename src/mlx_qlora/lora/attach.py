"""Adapters from files attached to a loaded model at run time (not merged): each adapted projection is
wrapped in ``LoRALinear`` and the adapter weights are loaded in the model's compute dtype, after every
key and shape was checked against the model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..config import LoRAConfig
from ..errors import UserError
from ..model.modules import decoder_projections
from .adapters import CONFIG_NAME, WEIGHTS_NAME, base_model_name, load_adapters
from .apply import apply_lora
from .layer import base_shape


def _expected_shapes(model, rank: int) -> dict[str, tuple[int, int]]:
    """``{path.lora_A: (r, in), path.lora_B: (out, r)}`` for every decoder projection of ``model``."""
    shapes = {}
    for path, _, _, module in decoder_projections(model):
        out_features, in_features = base_shape(module)
        shapes[f"{path}.lora_A"] = (rank, in_features)
        shapes[f"{path}.lora_B"] = (out_features, rank)
    return shapes


def _lora_parameters(model) -> dict[str, mx.array]:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_A", ".lora_B"))}


def attach(model, adapter_dir: Path, made_for: Optional[str] = None) -> LoRAConfig:
    """Wrap the projections that ``adapter_dir``'s adapters adapt and load their weights; returns their
    ``LoRAConfig``. ``made_for``: the base model the adapters were trained on, named in errors (default:
    the ``base_model_name_or_path`` of their ``adapter_config.json``). ``UserError`` when the adapters do
    not fit this model's shape."""
    params, lora_config = load_adapters(adapter_dir)
    made_for = made_for or base_model_name(adapter_dir)
    n_layers = model.args.num_hidden_layers
    hint = f" (made for {made_for})" if made_for else ""
    deepest = max(int(k.split(".")[2]) for k in params)
    if deepest >= n_layers:
        raise UserError(f"{adapter_dir / WEIGHTS_NAME}: adapts layer {deepest} but the model has {n_layers} "
                        f"layers: the adapters were made for another model{hint}")
    expected = _expected_shapes(model, lora_config.rank)
    for key, value in sorted(params.items()):
        if key not in expected:
            raise UserError(f"{adapter_dir / WEIGHTS_NAME}: {key} has no projection to adapt in this model{hint}")
        if tuple(value.shape) != expected[key]:
            raise UserError(
                f"{adapter_dir / WEIGHTS_NAME}: {key} has shape {tuple(value.shape)} but this model needs "
                f"{expected[key]}: the adapters were made for another model shape{hint}"
            )
    try:
        apply_lora(model, lora_config)
    except ValueError as e:
        raise UserError(f"{adapter_dir / CONFIG_NAME}: {e}{hint}") from None
    missing = sorted(set(_lora_parameters(model)) - set(params))
    if missing:
        raise UserError(f"{adapter_dir / WEIGHTS_NAME}: lacks {missing[0]} (adapter_config.json and the weights disagree)")
    dtype = model.model.embed_tokens.weight.dtype
    if not mx.issubdtype(dtype, mx.floating):
        dtype = mx.float32
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in params.items()]))
    model.freeze()
    mx.eval(model.parameters())
    return lora_config
