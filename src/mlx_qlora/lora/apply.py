"""Attaching LoRA to a model: ``apply_lora`` swaps the chosen decoder projections for ``LoRALinear`` by
their Hugging Face path (``...layers.{i}.self_attn.q_proj``, ``...layers.{i}.mlp.down_proj``) with
``update_modules``; parameter counts for the run's summary."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import LoRAConfig
from ..model.modules import decoder_projections
from ..quant.quantized_linear import QuantizedLinear
from .layer import LoRALinear


def _resolve_layers(layers: Optional[list[int]], n_layers: int) -> set[int]:
    if layers is None:
        return set(range(n_layers))
    chosen = set()
    for index in layers:
        if not -n_layers <= index < n_layers:
            raise ValueError(f"layers: index {index} is out of range for a model with {n_layers} layers")
        chosen.add(index % n_layers)
    return chosen


# A projection name -> the fused layer that holds it (Phi-3), which PEFT adapts as one layer.
FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}


def model_targets(model: nn.Module, targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` as ``model`` names its projections: on a model with fused projections (Phi-3), q/k/v become
    ``qkv_proj`` and gate/up ``gate_up_proj`` (an adapter on the fused layer, as PEFT puts it: asking for
    q_proj alone adapts k and v too); order kept, repeats dropped. Elsewhere ``targets`` unchanged."""
    present = {name for _, _, name, _ in decoder_projections(model)}
    out: list[str] = []
    for target in targets:
        if target not in present:
            target = FUSED_INTO.get(target, target)
        if target not in out:
            out.append(target)
    return tuple(out)


def apply_lora(model: nn.Module, config: Optional[LoRAConfig] = None, **kwargs) -> nn.Module:
    """Freeze ``model`` and wrap the chosen decoder projections in ``LoRALinear``; returns ``model``.

    ``config`` is a ``LoRAConfig``; keyword arguments (``targets``, ``rank``, ``alpha``, ``dropout``,
    ``layers``, ``use_rslora``) build one or override its fields. ``targets`` names projections
    (``"q_proj,v_proj"`` or a list; default all seven) and ``layers`` decoder-layer indices (negative
    ones count from the end; default all); on a model with fused projections the names map onto them
    (``model_targets``). Afterwards only the adapters are trainable.
    """
    values = config.to_dict() if config is not None else {}
    values.update(kwargs)
    config = LoRAConfig.from_dict(values)

    found = list(decoder_projections(model))
    config = replace(config, targets=model_targets(model, config.targets))
    if not found:
        raise ValueError("apply_lora: the model has no decoder projections (paths like layers.0.self_attn.q_proj)")
    n_layers = max(index for _, index, _, _ in found) + 1
    chosen_layers = _resolve_layers(config.layers, n_layers)

    model.freeze()
    replacements = []
    for path, index, name, module in found:
        if index not in chosen_layers or name not in config.targets:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: {path} already has an adapter")
        adapter = LoRALinear.from_base(
            module, rank=config.rank, alpha=config.alpha, dropout=config.dropout, use_rslora=config.use_rslora
        )
        replacements.append((path, adapter))
    if not replacements:
        raise ValueError(f"apply_lora: no projection matched targets {list(config.targets)} in layers {config.layers}")
    model.update_modules(tree_unflatten(replacements))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts.

    A ``QuantizedLinear`` counts as the ``in * out`` weights it stands for (its packed words, scales and
    biases are storage, not parameters) plus its linear ``bias`` if it has one, so the total is the
    original model's plus the adapters.
    """
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    total = sum(m.in_features * m.out_features for m in quantized.values())
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner not in quantized or leaf == "bias":  # a quantized layer's linear bias is a parameter
            total += value.size
    trainable = sum(value.size for _, value in tree_flatten(model.trainable_parameters()))
    return trainable, total


def format_trainable(model: nn.Module) -> str:
    """``"trainable: 20,971,520 / 7,262,703,616 (0.29%)"``."""
    trainable, total = count_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable: {trainable:,} / {total:,} ({share:.2f}%)"
