"""AdamW with decoupled weight decay and bias correction, and global-norm gradient clipping.

Both are pure functions over MLX trees (dicts/lists of arrays, e.g. the flat dict
``{"model.layers.0.self_attn.q_proj.lora_A": A, ...}`` or a module's nested ``trainable_parameters()``),
so the whole update can run inside ``mx.compile``: nothing branches in Python on array values, the
step counter lives in the state as an array, and the learning rate may be an array.

The arithmetic follows ``torch.optim.AdamW`` (its single-tensor path) term by term, for step t = 1, 2, ...::

    p <- p * (1 - lr * weight_decay)                       # decoupled weight decay, before the moments
    m <- m + (g - m) * (1 - beta1)                         # exp_avg
    v <- v * beta2 + (1 - beta2) * g * g                   # exp_avg_sq
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The moments are kept in float32 whatever the parameters' dtype; the new parameter is computed in float32
and cast back to the parameter's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

# Top-level keys of the optimizer state; none contains a dot, so a flattened state splits unambiguously.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")

Number = Union[float, mx.array]


class AdamW:
    """AdamW (Loshchilov & Hutter) exactly as ``torch.optim.AdamW`` computes it, as pure functions.

    Hyperparameters are Python constants fixed at construction; the learning rate is passed to every
    ``update`` (a float or a float32 scalar array: pass an array inside ``mx.compile`` so a new learning
    rate does not trigger a recompilation).

    State (a dict, see ``init``):
        ``step``: int32 scalar array, the number of updates applied so far;
        ``exp_avg`` / ``exp_avg_sq``: flat dicts ``{parameter path: float32 array of the parameter's shape}``,
        keyed by the ``tree_flatten`` paths of the parameter tree.
    """

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        beta1, beta2 = (float(b) for b in betas)
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, float(eps), float(weight_decay)

    def __repr__(self) -> str:
        return f"AdamW(betas=({self.beta1}, {self.beta2}), eps={self.eps}, weight_decay={self.weight_decay})"

    def init(self, params: Any) -> dict[str, Any]:
        """A fresh state for the parameter tree ``params``: step 0 and zero float32 moments."""
        flat = tree_flatten(params)
        return {
            "step": mx.array(0, dtype=mx.int32),
            "exp_avg": {path: mx.zeros(p.shape, dtype=mx.float32) for path, p in flat},
            "exp_avg_sq": {path: mx.zeros(p.shape, dtype=mx.float32) for path, p in flat},
        }

    def update(self, params: Any, grads: Any, state: dict[str, Any], lr: Number) -> tuple[Any, dict[str, Any]]:
        """One AdamW step. Returns ``(new_params, new_state)``; neither input is modified.

        params, grads: trees of the same structure (grads in any float dtype). state: from ``init``,
        ``load_state_dict`` or a previous ``update`` (its moment dicts may also be nested trees with the
        same flattened paths). lr: float or scalar array. new_params has the structure and dtypes of params.
        """
        exp_avg = dict(tree_flatten(state["exp_avg"]))
        exp_avg_sq = dict(tree_flatten(state["exp_avg_sq"]))
        step = state["step"] + 1
        lr = mx.array(lr, dtype=mx.float32) if not isinstance(lr, mx.array) else lr.astype(mx.float32)
        t = step.astype(mx.float32)
        # 1 - beta^t as -expm1(t * log(beta)): no cancellation in float32 when beta^t is close to 1.
        bias_correction1 = -mx.expm1(t * _log(self.beta1))
        bias_correction2_sqrt = mx.sqrt(-mx.expm1(t * _log(self.beta2)))
        step_size = lr / bias_correction1
        decay = 1.0 - lr * self.weight_decay
        new_avg, new_avg_sq = {}, {}

        def one(path: str, p: mx.array, g: mx.array) -> mx.array:
            if path not in exp_avg:
                raise KeyError(f"optimizer state has no moments for parameter {path!r}")
            p32, g32 = p.astype(mx.float32), g.astype(mx.float32)
            # The scalars enter through a reshape, which mx.compile does not fuse into the elementwise kernel
            # below: fused, their expm1 and sqrt would be recomputed for every element (several times slower
            # on the CPU over the one vector of ``train/step.py``; ``benchmarks/HISTORY.md``).
            ones = (1,) * p.ndim
            if self.weight_decay != 0.0:
                p32 = p32 * decay.reshape(ones)
            m = exp_avg[path]
            m = m + (g32 - m) * (1.0 - self.beta1)
            v = exp_avg_sq[path] * self.beta2 + (1.0 - self.beta2) * (g32 * g32)
            new_avg[path], new_avg_sq[path] = m, v
            denom = mx.sqrt(v) / bias_correction2_sqrt.reshape(ones) + self.eps
            return (p32 - step_size.reshape(ones) * (m / denom)).astype(p.dtype)

        new_params = tree_map_with_path(one, params, grads)
        return new_params, {"step": step, "exp_avg": new_avg, "exp_avg_sq": new_avg_sq}

    @staticmethod
    def state_dict(state: dict[str, Any]) -> dict[str, mx.array]:
        """The state as one flat dict of arrays (for safetensors): ``step``, ``exp_avg.<path>``, ``exp_avg_sq.<path>``."""
        return dict(tree_flatten({key: state[key] for key in STATE_KEYS}))

    @staticmethod
    def load_state_dict(flat: dict[str, mx.array]) -> dict[str, Any]:
        """Inverse of ``state_dict``: rebuild the state (moments as flat dicts keyed by parameter path).

        Raises ``KeyError`` naming the key when ``flat`` has a key outside ``STATE_KEYS`` or lacks ``step``.
        """
        state: dict[str, Any] = {"step": None, "exp_avg": {}, "exp_avg_sq": {}}
        for key, value in flat.items():
            head, _, path = key.partition(".")
            if head == "step" and not path:
                state["step"] = mx.array(value).astype(mx.int32).reshape(())
            elif head in ("exp_avg", "exp_avg_sq") and path:
                state[head][path] = mx.array(value).astype(mx.float32)
            else:
                raise KeyError(f"unexpected optimizer state key {key!r}")
        if state["step"] is None:
            raise KeyError("optimizer state lacks 'step'")
        if set(state["exp_avg"]) != set(state["exp_avg_sq"]):
            odd = sorted(set(state["exp_avg"]) ^ set(state["exp_avg_sq"]))[0]
            raise KeyError(f"optimizer state has only one of exp_avg/exp_avg_sq for {odd!r}")
        return state


def _log(beta: float) -> float:
    """log(beta) in float64 (beta 0 gives -inf, so beta^t = 0 and the correction is 1)."""
    return math.log(beta) if beta > 0.0 else -math.inf


def global_norm(grads: Any) -> mx.array:
    """The L2 norm of all leaves of ``grads`` taken together (float32 scalar)."""
    leaves = [g for _, g in tree_flatten(grads)]
    if not leaves:
        return mx.array(0.0, dtype=mx.float32)
    squares = [mx.sum(mx.square(g.astype(mx.float32))) for g in leaves]
    return mx.sqrt(sum(squares[1:], squares[0]))


def clip_grad_norm(grads: Any, max_norm: Optional[float]) -> tuple[Any, mx.array]:
    """Global-norm clipping as ``torch.nn.utils.clip_grad_norm_`` (L2, ``error_if_nonfinite=False``).

    Returns ``(clipped_grads, total_norm)``: total_norm is the float32 norm *before* clipping (always
    computed, for logging); every gradient is multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``.
    ``max_norm`` None or 0 disables clipping (the gradients come back unchanged). A NaN/inf norm
    propagates into the gradients, as in torch; the caller checks the returned norm.
    """
    total_norm = global_norm(grads)
    if not max_norm:
        return grads, total_norm
    if max_norm < 0:
        raise ValueError(f"max_grad_norm must be >= 0, got {max_norm}")
    coef = mx.minimum(float(max_norm) / (total_norm + 1e-6), 1.0)
    return tree_map(lambda g: (g.astype(mx.float32) * coef).astype(g.dtype), grads), total_norm
