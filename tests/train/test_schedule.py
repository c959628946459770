"""Learning-rate schedules against transformers' get_*_schedule_with_warmup, step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.train.schedule import build_schedule

BASE_LR = 3e-4
CASES = [(1, 0), (10, 0), (10, 3), (57, 5), (100, 10), (100, 99)]  # (total_steps, warmup_steps)


def _torch_optimizer():
    import torch

    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)


def _reference(name: str, total: int, warmup: int, min_lr_ratio: float = 0.0):
    """transformers' LambdaLR multiplier for ``name``."""
    import transformers

    opt = _torch_optimizer()
    if name == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    elif name == "linear":
        sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    elif min_lr_ratio:
        sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_lr_ratio)
    else:
        sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    return sched.lr_lambdas[0]


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("total, warmup", CASES)
def test_matches_transformers_at_every_step(name, total, warmup):
    schedule = build_schedule(name, BASE_LR, total, warmup_steps=warmup)
    reference = _reference(name, total, warmup)
    for step in range(total + 1):
        assert schedule(step) == pytest.approx(BASE_LR * reference(step), rel=1e-12, abs=1e-18), step


@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 0)])
def test_cosine_with_floor_matches_transformers_min_lr_rate(total, warmup):
    schedule = build_schedule("cosine", BASE_LR, total, warmup_steps=warmup, min_lr_ratio=0.1)
    reference = _reference("cosine", total, warmup, min_lr_ratio=0.1)
    for step in range(total + 1):
        assert schedule(step) == pytest.approx(BASE_LR * reference(step), rel=1e-12), step
    assert schedule(total) == pytest.approx(0.1 * BASE_LR)


def test_linear_with_floor_is_the_affine_map_of_transformers_linear():
    total, warmup, r = 50, 5, 0.2
    schedule = build_schedule("linear", BASE_LR, total, warmup_steps=warmup, min_lr_ratio=r)
    reference = _reference("linear", total, warmup)
    for step in range(total + 1):
        expected = reference(step) if step < warmup else r + (1 - r) * reference(step)
        assert schedule(step) == pytest.approx(BASE_LR * expected, rel=1e-12), step


def test_the_documented_boundary_steps():
    s = build_schedule("cosine", 1.0, 10, warmup_steps=4)
    assert [s(i) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]  # the first update uses lr(0) = 0
    assert s(10) == pytest.approx(0.0, abs=1e-15) and s(1000) == pytest.approx(0.0, abs=1e-15)  # held past the end
    assert build_schedule("constant", 2.0, 10)(0) == 2.0


def test_warmup_ratio_rounds_up_like_transformers_and_steps_win():
    import transformers

    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=0.07, report_to=[])
    assert build_schedule("linear", 1.0, 101, warmup_ratio=0.07).warmup_steps == args.get_warmup_steps(101) == 8
    assert build_schedule("linear", 1.0, 101, warmup_steps=3, warmup_ratio=0.5).warmup_steps == 3


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_array_steps_give_the_same_values_and_compile(name):
    schedule = build_schedule(name, BASE_LR, 60, warmup_steps=7, min_lr_ratio=0.05)
    compiled = mx.compile(lambda step: schedule(step))
    for step in range(0, 61):
        value = compiled(mx.array(step, dtype=mx.int32))
        assert value.dtype == mx.float32 and value.shape == ()
        np.testing.assert_allclose(value.item(), schedule(step), rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="cyclic"), "schedule"),
        (dict(base_lr=0.0), "learning_rate"),
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_ratio=1.0), "warmup_ratio"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    args = dict(name="cosine", base_lr=1e-3, total_steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        build_schedule(**args)


def test_cosine_is_monotone_after_warmup():
    s = build_schedule("cosine", 1.0, 40, warmup_steps=5)
    values = [s(i) for i in range(5, 41)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == 1.0 and math.isclose(values[-1], 0.0, abs_tol=1e-15)
