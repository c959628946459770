"""Training checkpoints: round trip, keep-last-K, and interrupted writes (exception and SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.config import LoRAConfig
from mlx_qlora.errors import UserError
from mlx_qlora.train import checkpoint as ckpt_module
from mlx_qlora.train.checkpoint import (
    CHECKPOINTS_DIR, LATEST_NAME, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint,
)
from mlx_qlora.train.optimizer import AdamW

LORA = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj"), layers=[1])


def _adapters(seed: int = 0) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.1.self_attn.q_proj.lora_A": mx.array(rng.standard_normal((2, 8)).astype(np.float32)),
        "model.layers.1.self_attn.q_proj.lora_B": mx.array(rng.standard_normal((8, 2)).astype(np.float32)),
        "model.layers.1.mlp.down_proj.lora_A": mx.array(rng.standard_normal((2, 12)).astype(np.float32)),
        "model.layers.1.mlp.down_proj.lora_B": mx.array(rng.standard_normal((8, 2)).astype(np.float32)),
    }


def _optimizer_state(params, steps: int = 2):
    opt = AdamW(weight_decay=0.01)
    state = opt.init(params)
    for i in range(steps):
        params, state = opt.update(params, {k: mx.ones_like(v) * (i + 1) for k, v in params.items()}, state, 1e-2)
    return opt, params, state


def _save(run_dir, step, seed=None, keep_last=3):
    adapters = _adapters(step if seed is None else seed)
    _, _, state = _optimizer_state(adapters)
    return save_checkpoint(
        run_dir, step, adapters=adapters, lora_config=LORA, optimizer_state=AdamW.state_dict(state),
        trainer_state={"step": step, "tokens_seen": 100 * step, "data_cursor": {"epoch": 0, "position": step}},
        config={"learning_rate": 1e-3}, base_model="tiny", keep_last=keep_last,
    )


def test_round_trip_returns_everything(tmp_path):
    params = _adapters()
    opt, params, state = _optimizer_state(params, steps=3)
    trainer_state = {"step": 3, "tokens_seen": 1234, "elapsed": 1.5, "best_val_loss": None,
                     "rng": [1, [2, 3]], "data_cursor": {"epoch": 1, "order_seed": 7, "position": 5}}
    path = save_checkpoint(tmp_path, 3, adapters=params, lora_config=LORA, optimizer_state=state,
                           trainer_state=trainer_state, config={"lr": 1e-3, "lora": LORA.to_dict()},
                           base_model="base/model")
    assert path == tmp_path / CHECKPOINTS_DIR / "step-0000003"
    assert latest_checkpoint(tmp_path) == path
    assert (tmp_path / CHECKPOINTS_DIR / LATEST_NAME).read_text().strip() == "step-0000003"

    loaded = load_checkpoint(tmp_path)  # a run folder resolves to its latest checkpoint
    assert loaded["path"] == path and loaded["step"] == 3
    assert loaded["trainer_state"] == trainer_state
    assert loaded["config"] == json.loads(json.dumps({"lr": 1e-3, "lora": LORA.to_dict()}))
    assert loaded["lora_config"] == LORA
    for k, v in params.items():
        assert mx.array_equal(loaded["adapters"][k], v).item()
    # The optimizer state comes back bit-exact and the next update is identical.
    restored = AdamW.load_state_dict(loaded["optimizer"])
    grads = {k: mx.full(v.shape, 0.5) for k, v in params.items()}
    a, sa = opt.update(params, grads, state, 1e-2)
    b, sb = opt.update(loaded["adapters"], grads, restored, 1e-2)
    assert sb["step"].item() == 4
    for k in params:
        assert mx.array_equal(a[k], b[k]).item() and mx.array_equal(sa["exp_avg_sq"][k], sb["exp_avg_sq"][k]).item()


def test_keeps_the_last_k_and_replaces_a_step(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert latest_checkpoint(tmp_path).name == "step-0000040"
    _save(tmp_path, 40, seed=99, keep_last=2)  # the same step again: replaced
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert mx.array_equal(loaded["adapters"]["model.layers.1.mlp.down_proj.lora_A"],
                          _adapters(99)["model.layers.1.mlp.down_proj.lora_A"]).item()
    for step in (50, 60):
        _save(tmp_path, step, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40, 50, 60]
    _save(tmp_path, 5, keep_last=1)  # a lower step (a restarted run) is never the one deleted
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]


def test_exception_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 10)
    real = ckpt_module.atomic_write_json

    def failing(path, obj):
        if path.name == "trainer_state.json":
            raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(ckpt_module, "atomic_write_json", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 20)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == [LATEST_NAME, "step-0000010"]
    assert load_checkpoint(tmp_path)["step"] == 10


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_checkpoint as t
from mlx_qlora.train import checkpoint as c
t._save({run!r}, 10)
real_json, real_text = c.atomic_write_json, c.atomic_write_text
def json_hook(path, obj):
    if {where!r} == "trainer_state" and path.name == "trainer_state.json":
        os.kill(os.getpid(), signal.SIGKILL)  # the adapters and optimizer state are already in the folder
    return real_json(path, obj)
def text_hook(path, text):
    if {where!r} == "latest" and path.name == "latest":
        (path.parent / ".latest.partial.tmp").write_text("step-00")  # a half-written pointer
        os.kill(os.getpid(), signal.SIGKILL)  # the new folder is in place, the pointer not yet replaced
    return real_text(path, text)
c.atomic_write_json, c.atomic_write_text = json_hook, text_hook
t._save({run!r}, 20)
print("not killed")
"""


@pytest.mark.parametrize("where", ["trainer_state", "latest"])
def test_sigkill_during_write_keeps_the_previous_checkpoint(tmp_path, where):
    run = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), run=str(run), where=where)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "not killed" not in result.stdout

    root = run / CHECKPOINTS_DIR
    assert (root / LATEST_NAME).read_text().strip() == "step-0000010"
    assert latest_checkpoint(run) == root / "step-0000010"
    loaded = load_checkpoint(run)
    assert loaded["step"] == 10 and loaded["trainer_state"]["data_cursor"]["position"] == 10
    names = {p.name for p in root.iterdir()}
    if where == "trainer_state":
        assert "step-0000020" not in names and any(n.startswith(".step-0000020") for n in names)
    else:
        assert ".latest.partial.tmp" in names
    # The next save succeeds and clears what the killed one left behind.
    _save(run, 20)
    assert latest_checkpoint(run) == root / "step-0000020"
    assert not any(p.name.startswith(".") for p in root.iterdir())


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    root = tmp_path / CHECKPOINTS_DIR
    (root / LATEST_NAME).write_text("step-0000099\n")
    assert latest_checkpoint(tmp_path) == root / "step-0000020"
    (root / "step-0000020" / "optimizer.safetensors").unlink()  # incomplete: skipped
    (root / LATEST_NAME).unlink()
    assert latest_checkpoint(tmp_path) == root / "step-0000010"
    with pytest.raises(UserError, match="optimizer.safetensors"):
        load_checkpoint(root / "step-0000020")


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / CHECKPOINTS_DIR).mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_bad_trainer_state_fails_before_writing(tmp_path):
    params = _adapters()
    kwargs = dict(adapters=params, lora_config=LORA, optimizer_state={}, config={})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, trainer_state={"rng": object()}, **kwargs)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, 1, trainer_state={"step": 2}, **kwargs)
    assert not (tmp_path / CHECKPOINTS_DIR).exists() or not any((tmp_path / CHECKPOINTS_DIR).iterdir())
