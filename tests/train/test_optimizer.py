"""AdamW and gradient clipping against torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ (float32)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qlora.train.flat import FlatLayout
from mlx_qlora.train.optimizer import AdamW, clip_grad_norm
from mlx_qlora.train.schedule import build_schedule

SHAPES = {
    "model.layers.0.self_attn.q_proj.lora_A": (4, 24),
    "model.layers.0.self_attn.q_proj.lora_B": (32, 4),
    "model.layers.1.mlp.down_proj.lora_A": (4, 40),
    "model.layers.1.mlp.down_proj.lora_B": (24, 4),
}


def _random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in SHAPES.items()}


@pytest.mark.parametrize(
    "betas, eps, weight_decay, base_lr",
    [((0.9, 0.999), 1e-8, 0.1, 1e-2), ((0.8, 0.95), 1e-6, 0.0, 3e-3)],
)
def test_adamw_matches_torch_100_steps_with_warmup_cosine(betas, eps, weight_decay, base_lr):
    import torch
    import transformers

    steps, warmup = 100, 10
    init = _random_params()
    rng = np.random.default_rng(1)
    grads = [{k: (rng.standard_normal(s) * rng.uniform(0.01, 3.0)).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(steps)]

    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    torch_opt = torch.optim.AdamW(list(torch_params.values()), lr=base_lr, betas=betas, eps=eps,
                                  weight_decay=weight_decay, foreach=False)
    torch_sched = transformers.get_cosine_schedule_with_warmup(torch_opt, warmup, steps)

    opt = AdamW(betas=betas, eps=eps, weight_decay=weight_decay)
    schedule = build_schedule("cosine", base_lr, steps, warmup_steps=warmup)
    params = {k: mx.array(v) for k, v in init.items()}
    state = opt.init(params)
    update = mx.compile(opt.update)

    for step in range(steps):
        assert schedule(step) == pytest.approx(torch_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[step][k])
        torch_opt.step()
        torch_sched.step()
        lr = mx.array(schedule(step), dtype=mx.float32)
        params, state = update(params, {k: mx.array(v) for k, v in grads[step].items()}, state, lr)
        mx.eval(params, state)

    assert state["step"].item() == steps
    for k, p in torch_params.items():
        ours = np.array(params[k])
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, p.detach().numpy(), rtol=0, atol=1e-6, err_msg=k)
        torch_state = torch_opt.state[p]
        np.testing.assert_allclose(np.array(state["exp_avg"][k]), torch_state["exp_avg"].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.array(state["exp_avg_sq"][k]), torch_state["exp_avg_sq"].numpy(),
                                   rtol=1e-6, atol=1e-7)
    # The parameters moved far more than the tolerance, so the comparison is meaningful.
    assert max(np.abs(np.array(params[k]) - init[k]).max() for k in init) > 0.05


def _run(opt, params, grads, state, lrs):
    for g, lr in zip(grads, lrs):
        params, state = opt.update(params, g, state, mx.array(lr, dtype=mx.float32))
    mx.eval(params, state)
    return params, state


def test_state_dict_round_trip_resumes_bit_exactly(tmp_path):
    opt = AdamW(weight_decay=0.01)
    params = {k: mx.array(v) for k, v in _random_params().items()}
    rng = np.random.default_rng(2)
    grads = [{k: mx.array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()} for _ in range(8)]
    lrs = [1e-3 * (i + 1) for i in range(8)]

    full_params, full_state = _run(opt, params, grads, opt.init(params), lrs)

    half_params, half_state = _run(opt, params, grads[:4], opt.init(params), lrs[:4])
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), AdamW.state_dict(half_state))
    restored = AdamW.load_state_dict(mx.load(str(tmp_path / "opt.safetensors")))
    assert restored["step"].item() == 4 and restored["step"].dtype == mx.int32
    resumed_params, resumed_state = _run(opt, half_params, grads[4:], restored, lrs[4:])

    for k in SHAPES:
        assert mx.array_equal(resumed_params[k], full_params[k]).item(), k
        assert mx.array_equal(resumed_state["exp_avg_sq"][k], full_state["exp_avg_sq"][k]).item(), k


def test_nested_trees_and_float_lr_give_the_same_update():
    opt = AdamW(weight_decay=0.05)
    flat = {k: mx.array(v) for k, v in _random_params().items()}
    rng = np.random.default_rng(3)
    grads = {k: mx.array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
    new_flat, _ = opt.update(flat, grads, opt.init(flat), mx.array(1e-2))

    nested = tree_unflatten(list(flat.items()))  # {"model": {"layers": [...]}} as a module tree looks
    nested_grads = tree_unflatten(list(grads.items()))
    new_nested, state = opt.update(nested, nested_grads, opt.init(nested), 1e-2)
    assert set(state["exp_avg"]) == set(SHAPES)
    for k, v in tree_flatten(new_nested):
        assert mx.array_equal(v, new_flat[k]).item(), k


def test_low_precision_parameters_keep_float32_state():
    opt = AdamW(weight_decay=0.1)
    p32 = {k: mx.array(v) for k, v in _random_params().items()}
    p16 = {k: v.astype(mx.bfloat16) for k, v in p32.items()}
    grads = {k: mx.ones(s, dtype=mx.bfloat16) for k, s in SHAPES.items()}
    state = opt.init(p16)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(state["exp_avg"]))
    new16, state = opt.update(p16, grads, state, 1e-2)
    assert all(v.dtype == mx.bfloat16 for v in new16.values())
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(state["exp_avg_sq"]))
    # The arithmetic is float32 on the upcast parameter, rounded once at the end.
    ref, _ = opt.update({k: v.astype(mx.float32) for k, v in p16.items()},
                        {k: g.astype(mx.float32) for k, g in grads.items()}, opt.init(p16), 1e-2)
    for k in SHAPES:
        assert mx.array_equal(new16[k], ref[k].astype(mx.bfloat16)).item(), k


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="beta2"):
        AdamW(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW(weight_decay=-1.0)


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e4])
def test_clip_grad_norm_matches_torch(max_norm):
    import torch

    rng = np.random.default_rng(4)
    grads = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in SHAPES.items()}
    tensors = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.from_numpy(g.copy())
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)

    clipped, norm = clip_grad_norm({k: mx.array(v) for k, v in grads.items()}, max_norm)
    np.testing.assert_allclose(norm.item(), torch_norm.item(), rtol=1e-6)
    for t, k in zip(tensors, SHAPES):
        np.testing.assert_allclose(np.array(clipped[k]), t.grad.numpy(), rtol=1e-6, atol=1e-8, err_msg=k)
    total = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    assert (total > max_norm) == (max_norm < 1e4)  # both the clipping and the pass-through cases are exercised


@pytest.mark.parametrize("max_norm", [None, 0, 0.0])
def test_clip_disabled_returns_gradients_unchanged_and_the_norm(max_norm):
    g = {"a": mx.array([3.0, 4.0]), "b": [mx.array([[12.0]])]}
    clipped, norm = clip_grad_norm(g, max_norm)
    assert clipped is g
    assert norm.item() == pytest.approx(13.0)


def test_clip_inside_compile_with_nonfinite_norm():
    clip = mx.compile(lambda g: clip_grad_norm(g, 1.0))
    clipped, norm = clip({"a": mx.array([float("inf"), 1.0])})
    assert not np.isfinite(norm.item())
    clipped, norm = clip({"a": mx.array([30.0, 40.0])})
    np.testing.assert_allclose(np.array(clipped["a"]), [0.6, 0.8], rtol=1e-6)


def test_update_fn_matches_torch_clip_and_adamw_over_steps():
    """``make_update_fn`` (one float32 vector for all tensors) against torch: grad sums divided by the learned
    token count, clipped by global norm, then AdamW, for 20 steps; the low-precision parameter comes back in
    its own dtype with float32 moments."""
    import torch

    from mlx_qlora.train.step import make_update_fn

    steps, n_tokens, max_norm, lr = 20, 37, 1.0, 5e-3
    init = _random_params(5)
    rng = np.random.default_rng(6)
    sums = [{k: (rng.standard_normal(s) * n_tokens * rng.uniform(0.005, 0.08)).astype(np.float32)
             for k, s in SHAPES.items()} for _ in range(steps)]
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    torch_opt = torch.optim.AdamW(list(torch_params.values()), lr=lr, weight_decay=0.01, foreach=False)
    clipped_steps = 0
    for g in sums:
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(g[k] / n_tokens)
        clipped_steps += float(torch.nn.utils.clip_grad_norm_(list(torch_params.values()), max_norm)) > max_norm
        torch_opt.step()

    opt = AdamW(weight_decay=0.01)
    params = {k: mx.array(v) for k, v in init.items()}
    layout = FlatLayout(params)
    update = make_update_fn(opt, max_grad_norm=max_norm, layout=layout)
    flat, flat_state = layout.concat(params), layout.flat_state(opt.init(params))
    for g in sums:
        flat, params, flat_state, norm = update(flat, {k: mx.array(v) for k, v in g.items()}, flat_state,
                                                mx.array(lr, dtype=mx.float32), mx.array(n_tokens))
        mx.eval(flat, params, flat_state, norm)
    state = layout.tensor_state(flat_state)
    assert mx.array_equal(flat, layout.concat(params))  # the views and the vector agree
    assert 0 < clipped_steps < steps  # both the clipped and the unclipped case occur
    assert list(params) == list(SHAPES) and state["step"].item() == steps
    for k, p in torch_params.items():
        assert params[k].shape == SHAPES[k] and params[k].dtype == mx.float32
        np.testing.assert_allclose(np.array(params[k]), p.detach().numpy(), rtol=0, atol=2e-6, err_msg=k)
        np.testing.assert_allclose(np.array(state["exp_avg"][k]), torch_opt.state[p]["exp_avg"].numpy(),
                                   rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(np.array(state["exp_avg_sq"][k]), torch_opt.state[p]["exp_avg_sq"].numpy(),
                                   rtol=1e-5, atol=1e-9, err_msg=k)
    assert max(np.abs(np.array(params[k]) - init[k]).max() for k in init) > 0.05

    # A bfloat16 parameter among float32 ones: each step's update is the per-tensor one, rounded to bfloat16
    # every step (the flat vector keeps the rounded value, not a float32 master copy).
    mixed = {**{k: mx.array(v) for k, v in init.items()}}
    first = next(iter(SHAPES))
    mixed[first] = mixed[first].astype(mx.bfloat16)
    layout = FlatLayout(mixed)
    update = make_update_fn(opt, max_grad_norm=max_norm, layout=layout)
    flat, flat_state = layout.concat(mixed), layout.flat_state(opt.init(mixed))
    per_tensor, state = dict(mixed), opt.init(mixed)
    for g in sums[:3]:
        g = {k: mx.array(v) for k, v in g.items()}
        flat, new, flat_state, _ = update(flat, g, flat_state, mx.array(lr, dtype=mx.float32), mx.array(n_tokens))
        per_tensor, state = opt.update(per_tensor, clip_grad_norm({k: v / n_tokens for k, v in g.items()},
                                                                  max_norm)[0], state, mx.array(lr, dtype=mx.float32))
        assert new[first].dtype == mx.bfloat16 and layout.tensor_state(flat_state)["exp_avg"][first].dtype == mx.float32
        for k in SHAPES:
            np.testing.assert_allclose(np.array(new[k].astype(mx.float32)),
                                       np.array(per_tensor[k].astype(mx.float32)), rtol=0, atol=1e-6, err_msg=k)


def test_flat_state_names_a_parameter_without_moments():
    params = {k: mx.array(v) for k, v in _random_params().items()}
    state = AdamW().init({k: v for k, v in params.items() if not k.endswith("down_proj.lora_B")})
    with pytest.raises(KeyError, match="down_proj.lora_B"):
        FlatLayout(params).flat_state(state)


def test_flat_layout_round_trips_parameters_and_state():
    """concat/split and flat_state/tensor_state are inverses; the order is the layout's, whatever the tree's."""
    params = {k: mx.array(v) for k, v in _random_params(2).items()}
    layout = FlatLayout(params)
    shuffled = dict(reversed(list(params.items())))
    flat = layout.concat(shuffled)
    assert flat.shape == (sum(v.size for v in params.values()),) and flat.dtype == mx.float32
    assert list(layout.split(flat)) == list(params)
    assert all(mx.array_equal(layout.split(flat)[k], v) for k, v in params.items())
    state = {"step": mx.array(3), "exp_avg": {k: v * 2 for k, v in shuffled.items()},
             "exp_avg_sq": {k: v * v for k, v in shuffled.items()}}
    back = layout.tensor_state(layout.flat_state(state))
    assert back["step"].item() == 3
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(mx.array_equal(back[key][k], state[key][k]) for k in params)
