"""Walking a decoder's modules by their Hugging Face paths: its projections, quantizing them, and the
model's weights in dense form."""

from __future__ import annotations

import re
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import KNOWN_TARGETS
from ..quant.quantized_linear import QuantizedLinear

# A decoder projection's module path: group 1 is the layer index, group 2 the projection's name.
_PROJECTION_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+_proj)$")


def decoder_projections(model: nn.Module) -> Iterator[tuple[str, int, str, nn.Module]]:
    """Yield ``(path, layer_index, projection_name, module)`` for each decoder projection of ``model``."""
    for path, module in model.named_modules():
        match = _PROJECTION_PATH.search(path)
        if match:
            yield path, int(match.group(1)), match.group(2), module


def quantize_model(
    model: nn.Module, bits: int = 4, group_size: Optional[int] = None, dtype: Optional[mx.Dtype] = None,
    rounding: str = "nearest",
) -> nn.Module:
    """Replace every decoder projection that is an ``nn.Linear`` by a ``QuantizedLinear``; returns ``model``.

    Embeddings, norms and ``lm_head`` stay as they are. ``dtype`` is the scales' dtype (default: each
    weight's own); ``rounding`` chooses the ranges (``quant/rounding.py``).
    """
    replacements = [
        (path, QuantizedLinear.from_linear(module, bits=bits, group_size=group_size, dtype=dtype,
                                                   rounding=rounding))
        for path, _, name, module in decoder_projections(model)
        if isinstance(module, nn.Linear) and name in KNOWN_TARGETS
    ]
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return model


def _dense_weight(module) -> mx.array:
    """The float32 weight (out, in) of a linear layer, dequantized when it is quantized."""
    if isinstance(module, QuantizedLinear):
        return module.dequantize(mx.float32)
    return module.weight.astype(mx.float32)


def module_at(model, path: str):
    """The module at a dotted path such as ``model.layers.0.self_attn.q_proj``."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def dense_state(model) -> dict[str, mx.array]:
    """Hugging Face-named tensors of ``model`` with quantized layers dequantized to float32 (others as stored)."""
    quantized = {path for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    state: dict[str, mx.array] = {}
    for key, value in tree_flatten(model.parameters()):
        owner, name = key.rsplit(".", 1)
        if owner in quantized:
            if name == "weight":
                state[key] = _dense_weight(module_at(model, owner))
            elif name == "bias":  # a linear bias, kept un-quantized (not the 4-bit ``biases``)
                state[key] = value
        else:
            state[key] = value
    return state
