"""The compiled pieces of one optimizer step: a micro-batch's loss and gradients, and the update.

The loss of a step is the mean cross-entropy over the learned tokens (labels != -100) of the whole
effective batch. Each micro-batch therefore returns the *sum* of its token losses, the number of its
learned tokens, and the gradients of that sum; the step divides by the total count once, so k
accumulated micro-batches give exactly the update of one batch k times larger.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .loss import loss_sums
from .optimizer import STATE_KEYS, AdamW, clip_grad_norm


def make_loss_fn(chunk: int, packed: bool, fused: bool = True) -> Callable:
    """``loss(model, input_ids, labels[, position_ids, segment_ids]) -> (loss_sum, n_learned)``.

    input_ids, labels: (B, L). Position t predicts token t + 1, so labels are shifted by one.
    """

    def loss(model, input_ids, labels, position_ids=None, segment_ids=None):
        inputs = input_ids[:, :-1]  # (B, L-1)
        targets = labels[:, 1:]  # (B, L-1)
        if packed:
            position_ids, segment_ids = position_ids[:, :-1], segment_ids[:, :-1]
        hidden = model.hidden_states(inputs, position_ids=position_ids, segment_ids=segment_ids)  # (B, L-1, D)
        return loss_sums(hidden, model.logits_from_hidden, targets, chunk=chunk, fused=fused)

    return loss


def make_grad_fn(model: nn.Module, chunk: int, packed: bool, compile: bool = True) -> Callable:
    """``grad(batch arrays...) -> (loss_sum, n_learned, grads)``: grads of loss_sum, flat by parameter path."""
    value_and_grad = nn.value_and_grad(model, make_loss_fn(chunk, packed))

    def grad(*arrays):
        (loss_sum, n_learned), grads = value_and_grad(model, *arrays)
        return loss_sum, n_learned, dict(tree_flatten(grads))  # flat, keyed like lora_parameters()

    if not compile:
        return grad
    state = [model.state, mx.random.state]
    return mx.compile(grad, inputs=state, outputs=state)


def make_eval_fn(model: nn.Module, chunk: int, packed: bool, compile: bool = True) -> Callable:
    """``evaluate(batch arrays...) -> (loss_sum, n_learned)`` without gradients."""
    loss = make_loss_fn(chunk, packed, fused=False)  # no gradient needed: skip the fused backward work

    def evaluate(*arrays):
        return loss(model, *arrays)

    return mx.compile(evaluate, inputs=[model.state]) if compile else evaluate


def make_update_fn(optimizer: AdamW, max_grad_norm: Optional[float], compile: bool = True) -> Callable:
    """``update(params, grad_sums, opt_state, lr, n_learned) -> (params, opt_state, grad_norm)``.

    grad_sums are summed over the micro-batches of the step; they are divided by the number of learned
    tokens here, then clipped to ``max_grad_norm`` (global norm; None or 0 disables).

    params and grad_sums are flat dicts keyed by parameter path (``lora_parameters()``). The parameters,
    gradients and both moments go through the arithmetic as one float32 vector each, concatenated in path
    order and split again at the end: a few operations instead of several per tensor (a 7B model has 448
    LoRA tensors), which on a GPU is most of the update's cost, the host's work per operation
    (``benchmarks/RESULTS.md``). Element by element this is the per-tensor arithmetic of ``AdamW.update``
    and ``clip_grad_norm``; only the global norm's summation order differs.
    """

    def update(params, grad_sums, opt_state, lr, n_learned):
        paths = list(params)
        scale = 1.0 / mx.maximum(n_learned, 1).astype(mx.float32)
        if not paths:
            grads, norm = clip_grad_norm(grad_sums, max_grad_norm)
            params, opt_state = optimizer.update(params, grads, opt_state, lr)
            return params, opt_state, norm
        (flat_grads,), norm = clip_grad_norm([_concat(grad_sums, paths) * scale], max_grad_norm)
        state = {"step": opt_state["step"], **{key: {_FLAT: _flat_moments(opt_state[key], paths)} for key in _MOMENTS}}
        new_params, state = optimizer.update({_FLAT: _concat(params, paths)}, {_FLAT: flat_grads}, state, lr)
        new_state = {"step": state["step"], **{key: _split(state[key][_FLAT], params, mx.float32) for key in _MOMENTS}}
        return _split(new_params[_FLAT], params), new_state, norm

    return mx.compile(update) if compile else update


_FLAT = "flat"  # the one key of the concatenated trees
_MOMENTS = STATE_KEYS[1:]  # exp_avg, exp_avg_sq


def _concat(tree: dict, paths: list) -> mx.array:
    """The arrays of ``tree`` at ``paths``, flattened and concatenated in that order, as float32 (total,)."""
    return mx.concatenate([tree[path].reshape(-1).astype(mx.float32) for path in paths])


def _flat_moments(moments, paths: list) -> mx.array:
    flat = dict(tree_flatten(moments))  # the moments may be given as nested trees
    missing = [path for path in paths if path not in flat]
    if missing:
        raise KeyError(f"optimizer state has no moments for parameter {missing[0]!r}")
    return _concat(flat, paths)


def _split(flat: mx.array, like: dict, dtype: Optional[mx.Dtype] = None) -> dict:
    """Inverse of ``_concat``: ``flat`` cut into the shapes of ``like`` (in its order), cast to ``dtype`` or
    to each array's own dtype."""
    out, start = {}, 0
    for path, ref in like.items():
        out[path] = flat[start:start + ref.size].reshape(ref.shape).astype(dtype or ref.dtype)
        start += ref.size
    return out


def add_trees(a, b):
    """Element-wise sum of two trees of arrays (None counts as zero)."""
    return b if a is None else tree_map(lambda x, y: x + y, a, b)
