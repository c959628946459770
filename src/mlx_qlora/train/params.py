"""A model's trainable arrays read and written in place, without walking the module tree each step.

``tree_flatten(model.trainable_parameters())`` and ``model.update(tree_unflatten(...))`` visit every module
and array of the model (a 7B model has about 1,300 arrays, 448 of them LoRA adapters) in Python, twice per
optimizer step. ``TrainableSlots`` finds each trainable array's module once; reading and writing are then
one dictionary access per array. The paths are those of ``tree_flatten`` (``model.layers.0.mlp.up_proj.lora_A``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class TrainableSlots:
    """The trainable arrays of ``model`` as it is now (re-create it after replacing modules)."""

    def __init__(self, model: nn.Module):
        self.slots = {path: _resolve(model, path) for path, _ in tree_flatten(model.trainable_parameters())}

    def get(self) -> dict[str, mx.array]:
        """``{path: array}`` in ``tree_flatten`` order."""
        return {path: module[key] for path, (module, key) in self.slots.items()}

    def set(self, params: dict[str, mx.array]) -> None:
        """Put each array of ``params`` (keyed by path) in its module; a path that is not trainable is refused."""
        for path, value in params.items():
            if path not in self.slots:
                raise KeyError(f"{path!r} is not a trainable parameter of the model")
            module, key = self.slots[path]
            module[key] = value


def _resolve(model: nn.Module, path: str) -> tuple[dict, str]:
    """The module that holds ``path``'s array and the array's key in it."""
    *parents, key = path.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node, key
