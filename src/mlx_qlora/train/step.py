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
from .flat import FLAT, FlatLayout
from .optimizer import AdamW, clip_grad_norm


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


def make_update_fn(optimizer: AdamW, max_grad_norm: Optional[float], layout: FlatLayout,
                   compile: bool = True) -> Callable:
    """``update(flat_params, grad_sums, flat_state, lr, n_learned) -> (flat_params, params, flat_state, norm)``.

    The parameters and the optimizer state are flat (``train/flat.py``): ``layout.concat(params)`` and
    ``layout.flat_state(state)``; both come back flat for the next step, and ``params`` is the new
    parameters per path (views of the new vector, in each parameter's dtype) for the model.

    grad_sums (a dict keyed like the layout) are summed over the micro-batches of the step; they are divided
    by the number of learned tokens here, then clipped to ``max_grad_norm`` (global norm; None or 0
    disables). Element by element this is the per-tensor arithmetic of ``AdamW.update`` and
    ``clip_grad_norm``; only the global norm's summation order differs.
    """

    def update(flat_params, grad_sums, flat_state, lr, n_learned):
        scale = 1.0 / mx.maximum(n_learned, 1).astype(mx.float32)
        (flat_grads,), norm = clip_grad_norm([layout.concat(grad_sums) * scale], max_grad_norm)
        new, flat_state = optimizer.update({FLAT: flat_params}, {FLAT: flat_grads}, flat_state, lr)
        params = layout.split(new[FLAT])
        # A parameter kept in a lower precision is rounded every step, as the per-tensor update does.
        flat = new[FLAT] if layout.all_float32 else layout.concat(params)
        return flat, params, flat_state, norm

    return mx.compile(update) if compile else update


def add_trees(a, b):
    """Element-wise sum of two trees of arrays (None counts as zero)."""
    return b if a is None else tree_map(lambda x, y: x + y, a, b)
