"""Gradient checkpointing whose recomputation cannot start before the backward pass needs it.

``mx.checkpoint`` recomputes a function in the backward pass from its inputs, with the recomputation
tied to the function's *outputs*. Those exist right after the forward pass, so the evaluator is free to
run the recomputation of every layer early and hold all their activations until the backward pass
reaches them, which undoes the saving. Here the recomputation is tied to the *cotangent* of the output,
which only exists once the backward pass has come down to this layer.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def checkpoint(fn: Callable[[Any, mx.array], mx.array]) -> Callable[[Any, mx.array], mx.array]:
    """``fn(params, x) -> y`` (``params`` a tree of arrays) whose activations are recomputed, not stored.

    Only ``params``, ``x`` and ``y`` are kept from the forward pass; the gradients are those of ``fn``.
    """

    @mx.custom_function
    def run(params, x):
        return fn(params, x)

    @run.vjp
    def run_vjp(primals, cotangent, output):
        params, x = primals
        flat = tree_flatten(params)
        keys = [k for k, _ in flat]
        # The recomputation starts from copies of the inputs that depend on the cotangent.
        late = mx.depends([a for _, a in flat] + [x], [cotangent])

        def flat_fn(*arrays):
            return fn(tree_unflatten(list(zip(keys, arrays[:-1]))), arrays[-1])

        _, grads = mx.vjp(flat_fn, late, [cotangent])
        return tree_unflatten(list(zip(keys, grads[:-1]))), grads[-1]

    return run
