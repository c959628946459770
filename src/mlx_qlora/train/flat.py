"""The trainable arrays and their optimizer moments as one float32 vector each, for the update.

A 7B model has 448 LoRA tensors. Updating them one by one costs several MLX operations each, and on a
GPU the host's work per operation is most of the update's time (``benchmarks/probes/step_probe.py`` times
the host's phases of a step); so the update runs over one vector. Kept flat between steps, the parameters
and both moments are not gathered again every step (on CUDA each gathered tensor is one copy kernel: 1,344
per step of a 7B model); only the gradients are, and the new parameters come back as views of the new vector.

``FlatLayout`` fixes the order (the paths of the trainable tree) and converts both ways: the per-tensor
state format of ``AdamW`` (``exp_avg.<path>``) stays what checkpoints hold.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .optimizer import STATE_KEYS

FLAT = "flat"  # the one key of the flat trees: a flat state is AdamW's state for the tree {FLAT: vector}
MOMENTS = STATE_KEYS[1:]  # exp_avg, exp_avg_sq


class FlatLayout:
    """Paths, shapes and dtypes of a flat dict of arrays (``{path: array}``), in its order."""

    def __init__(self, like: dict[str, mx.array]):
        self.entries = [(path, tuple(a.shape), a.dtype) for path, a in like.items()]
        self.paths = [path for path, _, _ in self.entries]
        self.size = sum(_numel(shape) for _, shape, _ in self.entries)
        self.all_float32 = all(dtype == mx.float32 for _, _, dtype in self.entries)

    def concat(self, tree: dict[str, mx.array]) -> mx.array:
        """The arrays of ``tree`` at the layout's paths, flattened and concatenated, as float32 (size,)."""
        missing = [path for path in self.paths if path not in tree]
        if missing:
            raise KeyError(f"no array for parameter {missing[0]!r}")
        if not self.paths:
            return mx.zeros((0,), dtype=mx.float32)
        return mx.concatenate([tree[path].reshape(-1).astype(mx.float32) for path in self.paths])

    def split(self, flat: mx.array, dtype: Optional[mx.Dtype] = None) -> dict[str, mx.array]:
        """Inverse of ``concat``: ``flat`` cut into the layout's shapes, cast to ``dtype`` or each entry's own."""
        out, start = {}, 0
        for path, shape, own in self.entries:
            n = _numel(shape)
            out[path] = flat[start:start + n].reshape(shape).astype(dtype or own)
            start += n
        return out

    def flat_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """AdamW's per-tensor state (``AdamW.init`` or ``load_state_dict``) as the state of the flat vector."""
        out = {"step": state["step"]}
        for key in MOMENTS:
            moments = dict(tree_flatten(state[key]))  # the moments may be given as nested trees
            missing = [path for path in self.paths if path not in moments]
            if missing:
                raise KeyError(f"optimizer state has no moments for parameter {missing[0]!r}")
            out[key] = {FLAT: self.concat(moments)}
        return out

    def tensor_state(self, flat_state: dict[str, Any]) -> dict[str, Any]:
        """Inverse of ``flat_state``: moments per parameter path, float32."""
        return {"step": flat_state["step"],
                **{key: self.split(flat_state[key][FLAT], mx.float32) for key in MOMENTS}}


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
