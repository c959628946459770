"""Learning-rate schedules: constant, or a linear warm-up followed by a cosine or linear decay.

Which step gets which learning rate: ``step`` is the number of optimizer updates already applied, so the
first update uses ``lr(0)`` and the last of a run of ``total_steps`` updates uses ``lr(total_steps - 1)``.
With W warm-up steps, T = ``total_steps``, base learning rate ``base_lr`` and ``r = min_lr_ratio``::

    warm-up   (step < W):  lr = base_lr * step / W          (so lr(0) = 0 when W > 0)
    constant  (step >= W): lr = base_lr
    cosine    (step >= W): lr = base_lr * (r + (1 - r) * 0.5 * (1 + cos(pi * p)))
    linear    (step >= W): lr = base_lr * (r + (1 - r) * (1 - p))
    where p = (step - W) / max(1, T - W), clipped to [0, 1].

These are the formulas of transformers' ``get_constant_schedule_with_warmup``,
``get_cosine_schedule_with_warmup`` (``get_cosine_with_min_lr_schedule_with_warmup`` with
``min_lr_rate = r``) and ``get_linear_schedule_with_warmup`` (which has no ``r``; ours reaches ``r``
instead of 0), read at the same step index as a ``LambdaLR`` that is stepped after each update.
Past T the learning rate stays at its final value (``base_lr * r`` for the decays).

The warm-up length is ``warmup_steps`` when it is > 0, otherwise ``ceil(warmup_ratio * total_steps)``
(transformers' ``TrainingArguments`` rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import mlx.core as mx

SCHEDULES = ("constant", "cosine", "linear")

Step = Union[int, mx.array]


@dataclass(frozen=True)
class Schedule:
    """``schedule(step) -> lr``. An int step gives a Python float (computed in float64); an array step
    gives a float32 scalar array computed with MLX ops, usable inside ``mx.compile``."""

    name: str
    base_lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.0

    def factor(self, step: Step) -> Union[float, mx.array]:
        """The multiplier of ``base_lr`` at ``step`` (see the module docstring)."""
        if isinstance(step, mx.array):
            return self._factor_array(step)
        return self._factor_float(int(step))

    def __call__(self, step: Step) -> Union[float, mx.array]:
        return self.base_lr * self.factor(step)

    def _factor_float(self, step: int) -> float:
        warmup, r = self.warmup_steps, self.min_lr_ratio
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if self.name == "constant":
            return 1.0
        progress = min(max(float(step - warmup) / float(max(1, self.total_steps - warmup)), 0.0), 1.0)
        if self.name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = 1.0 - progress
        return r + (1.0 - r) * decay

    def _factor_array(self, step: mx.array) -> mx.array:
        warmup, r = self.warmup_steps, self.min_lr_ratio
        s = step.astype(mx.float32)
        ramp = s / float(max(1, warmup))
        if self.name == "constant":
            after = mx.ones_like(s)
        else:
            progress = mx.clip((s - warmup) / float(max(1, self.total_steps - warmup)), 0.0, 1.0)
            if self.name == "cosine":
                decay = 0.5 * (1.0 + mx.cos(math.pi * progress))
            else:
                decay = 1.0 - progress
            after = r + (1.0 - r) * decay
        return mx.where(s < warmup, ramp, after)


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """The warm-up length: ``warmup_steps`` if > 0, else ``ceil(warmup_ratio * total_steps)``."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if warmup_steps > 0:
        return int(warmup_steps)
    return int(math.ceil(warmup_ratio * total_steps))


def build_schedule(
    name: str,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """A learning-rate schedule ``step -> lr`` (see the module docstring for the exact formulas).

    name: ``constant`` | ``cosine`` | ``linear``. total_steps: the number of optimizer updates of the
    whole run (>= 1). min_lr_ratio: where the decay ends, as a fraction of ``base_lr`` (ignored by
    ``constant``). Bad values raise ``ValueError`` naming the argument.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    if not base_lr > 0:
        raise ValueError(f"learning_rate must be > 0, got {base_lr}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = warmup_steps_for(total_steps, warmup_steps, warmup_ratio)
    return Schedule(name, float(base_lr), int(total_steps), warmup, float(min_lr_ratio))
