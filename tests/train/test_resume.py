"""Resuming a run says what it does: the checkpoint it continues from and why it passed over newer ones,
falling back to the newest complete, readable checkpoint (still bit-exact), no metric row twice, one-line
errors for settings that cannot hold, a broken run_config.json or a run moved away from its paths, and
training data longer than the model's context refused at the start."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlx_qlora.cli import finetune
from mlx_qlora.config import DataConfig, LoRAConfig, TrainConfig
from mlx_qlora.data.prepare import prepare_dataset
from mlx_qlora.errors import UserError
from mlx_qlora.lora.adapters import load_adapters
from mlx_qlora.train.checkpoint import CHECKPOINTS_DIR, LATEST_NAME, checkpoint_name
from mlx_qlora.train.run_config import resume_config
from mlx_qlora.train.run_state import trim_metrics
from mlx_qlora.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "dolly_sample.jsonl"
STOP_AT = 13  # the interrupted run saves checkpoints 5, 10 and 13 (the stop)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dirs):
    """The tiny 4-bit model and prepared data (as ``test_trainer.py``), a reference run of 20 steps and the
    same run stopped after step 13."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    prepare_dataset(SAMPLE, tiny_model_dirs["full"] / "tokenizer.model", data,
                    DataConfig(max_seq_len=96, val_fraction=0.1))
    ws = {"root": root, "quant": tiny_model_dirs["quant"], "data": data}
    Trainer(_config(ws, root / "reference"), progress=False).train()

    class Stop:
        def on_step_end(self, trainer, step, metrics):
            return step == STOP_AT

    stopped = Trainer(_config(ws, root / "stopped"), progress=False, callbacks=[Stop()]).train()
    assert stopped["step"] == STOP_AT
    return {**ws, "reference": root / "reference", "stopped": root / "stopped"}


def _config(ws, out, **overrides) -> TrainConfig:
    values = dict(model=str(ws["quant"]), data=str(ws["data"]), out=str(out), batch_size=4, iters=20,
                  learning_rate=3e-3, warmup_steps=3, eval_every=1000, save_every=5, log_every=1,
                  lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1), seed=3, keep_last=5)
    values.update(overrides)
    return TrainConfig(**values)


def _stopped_copy(ws, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(ws["stopped"], run)
    return run


def _rows(run: Path) -> list[tuple]:
    """``(step, loss, val_loss)`` of every row of ``metrics.jsonl``, in order (timings left out)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


def _train_steps(run: Path) -> list[int]:
    return [step for step, loss, _ in _rows(run) if loss is not None]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage(run: Path, how: str) -> None:
    """Make checkpoint 13 unusable in one of the ways a kill, a full disk or a hand can."""
    ckpt = run / CHECKPOINTS_DIR / checkpoint_name(STOP_AT)
    if how == "incomplete":
        (ckpt / "optimizer.safetensors").unlink()
    elif how == "interrupted write":  # killed before the rename: only the hidden temporary folder exists
        ckpt.rename(ckpt.with_name(f".{ckpt.name}.k3j2x.tmp"))
    elif how == "truncated adapters":
        _truncate(ckpt / "adapter_model.safetensors")
    elif how == "truncated optimizer":
        _truncate(ckpt / "optimizer.safetensors")
    elif how == "bad trainer state":
        state = json.loads((ckpt / "trainer_state.json").read_text())
        del state["data_cursor"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    elif how == "NaN moment":
        import mlx.core as mx

        arrays = dict(mx.load(str(ckpt / "optimizer.safetensors")))
        key = next(k for k in sorted(arrays) if k.startswith("exp_avg_sq."))
        arrays[key] = mx.full(arrays[key].shape, float("nan"))
        mx.save_safetensors(str(ckpt / "optimizer.safetensors"), arrays)


REASONS = {
    "incomplete": "incomplete, optimizer.safetensors missing",
    "interrupted write": "its writing was interrupted",
    "truncated adapters": r"unreadable \(.*adapter_model.safetensors: cannot read safetensors",
    "truncated optimizer": r"unreadable \(.*optimizer.safetensors: cannot read safetensors",
    "bad trainer state": r"unusable \(.*trainer_state.json: data_cursor is missing",
    "NaN moment": r"unusable \(.*optimizer.safetensors: exp_avg_sq\.model\.layers\..* holds NaN or Inf",
}


@pytest.mark.parametrize("how", list(REASONS))
def test_resume_falls_back_past_a_damaged_checkpoint_bit_exactly(workspace, tmp_path, capsys, how):
    """Checkpoint 13 damaged: the resume says so, continues from 10, drops metric rows 11-13 (trained again)
    and ends with the losses and adapters of the run that was never stopped."""
    run = _stopped_copy(workspace, tmp_path)
    _damage(run, how)
    capsys.readouterr()
    trainer = Trainer(_config(workspace, run), resume=True, progress=False)
    out, err = capsys.readouterr()
    assert trainer.state.step == 10 and trainer.resumed_from.name == "step-0000010"
    assert f"from {CHECKPOINTS_DIR}/step-0000010 (step 10 of 20)" in out
    assert all(line.startswith("note: ") for line in err.splitlines())  # one line per note
    assert re.search(rf"passed over the newer {CHECKPOINTS_DIR}/\.?step-0000013\S*: {REASONS[how]}", err), err
    assert "metrics.jsonl: dropped 3 row(s) after step 10" in err
    assert _train_steps(run) == list(range(1, 11))
    assert (run / CHECKPOINTS_DIR / LATEST_NAME).read_text() == "step-0000010\n"

    assert trainer.train()["step"] == 20
    assert _train_steps(run) == list(range(1, 21))  # every step once
    assert _rows(run) == _rows(workspace["reference"])  # and every loss: exact float equality on the CPU
    a, _ = load_adapters(workspace["reference"])
    b, _ = load_adapters(run)
    for key in a:
        np.testing.assert_array_equal(np.array(a[key]), np.array(b[key]), err_msg=key)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"step-0000099\n", b"../../etc\n", b""])
def test_garbage_in_latest_is_ignored_with_a_note(workspace, tmp_path, capsys, content):
    """The checkpoint folders decide: whatever ``latest`` holds, the run continues from the newest complete
    one (13) with a one-line note, and ``latest`` names it again."""
    run = _stopped_copy(workspace, tmp_path)
    (run / CHECKPOINTS_DIR / LATEST_NAME).write_bytes(content)
    capsys.readouterr()
    trainer = Trainer(_config(workspace, run), resume=True, progress=False)
    err = capsys.readouterr().err
    assert trainer.state.step == STOP_AT
    assert f"note: {CHECKPOINTS_DIR}/{LATEST_NAME} " in err and "ignored, the checkpoint folders decide" in err
    assert (run / CHECKPOINTS_DIR / LATEST_NAME).read_text() == "step-0000013\n"
    assert _train_steps(run) == list(range(1, 14))  # nothing dropped


def test_a_newer_complete_checkpoint_than_latest_is_used(workspace, tmp_path, capsys):
    """Killed after checkpoint 13 was renamed into place but before ``latest`` was replaced: 13 is complete,
    so the run continues from it."""
    run = _stopped_copy(workspace, tmp_path)
    (run / CHECKPOINTS_DIR / LATEST_NAME).write_text("step-0000010\n")
    capsys.readouterr()
    assert Trainer(_config(workspace, run), resume=True, progress=False).state.step == STOP_AT
    assert f"{CHECKPOINTS_DIR}/{LATEST_NAME} names step-0000010: ignored" in capsys.readouterr().err


def test_no_usable_checkpoint_is_one_line_listing_each(workspace, tmp_path):
    run = _stopped_copy(workspace, tmp_path)
    for step in (5, 10, 13):
        _truncate(run / CHECKPOINTS_DIR / checkpoint_name(step) / "adapter_model.safetensors")
    before = _snapshot(run)
    with pytest.raises(UserError) as error:
        Trainer(_config(workspace, run), resume=True, progress=False)
    message = str(error.value)
    assert "\n" not in message and "no usable checkpoint to resume from" in message
    assert all(f"step-00000{s:02d}: unreadable" in message for s in (5, 10, 13))
    assert _snapshot(run) == before


def test_trim_metrics_drops_later_rows_and_torn_lines_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(6)] + ['{"step": 7, "lo']
    path.write_text("\n".join(lines))
    assert trim_metrics(path, 3) == (2, 1)
    assert path.read_text() == "\n".join(lines[:4]) + "\n"
    inode = path.stat().st_ino
    assert trim_metrics(path, 3) == (0, 0) and path.stat().st_ino == inode  # nothing to drop: not rewritten
    assert trim_metrics(tmp_path / "absent.jsonl", 3) == (0, 0)
    os.chmod(path, 0)
    if not os.access(path, os.R_OK):  # root reads anyway
        with pytest.raises(UserError, match="metrics.jsonl: cannot read"):
            trim_metrics(path, 3)


@pytest.mark.parametrize("overrides, match", [
    (dict(iters=5), r"already did 13 steps \(checkpoints/step-0000013\), more than iters 5; to train further "
                    r"give --iters above 13"),
    (dict(iters=None, epochs=0.1), r"already did 13 steps .*, more than epochs 0.1 makes \(\d+ steps of \d+ per "
                                   r"epoch\)"),
    (dict(max_time="0.01s"), r"already did 13 steps .* in \d+s, all of max_time 0.01s"),
])
def test_settings_that_cannot_hold_are_refused_before_anything_changes(workspace, tmp_path, overrides, match):
    run = _stopped_copy(workspace, tmp_path)
    before = _snapshot(run)
    with pytest.raises(UserError, match=match):
        Trainer(_config(workspace, run, **overrides), resume=True, progress=False)
    assert _snapshot(run) == before


def test_iters_below_the_steps_done_on_the_command_line(workspace, tmp_path, capsys):
    """``finetune.py --resume RUN --iters 5`` on a run at step 13: exit 2, one line, the run untouched; with
    --iters 13 there is nothing left to do, and it says so."""
    run = _stopped_copy(workspace, tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        finetune.main(["--resume", str(run), "--iters", "5", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "more than iters 5" in err
    assert _snapshot(run) == before
    finetune.main(["--resume", str(run), "--iters", str(STOP_AT), "--no-progress"])
    out, err = capsys.readouterr()
    assert f"done: step {STOP_AT}/{STOP_AT}" in out and "nothing left to train" in err


def test_examples_longer_than_the_model_context_are_refused_at_the_start(workspace, tmp_path):
    model = tmp_path / "short-context"
    shutil.copytree(workspace["quant"], model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (model / "config.json").write_text(json.dumps(config))
    lengths = np.diff(_offsets(workspace["data"]))
    run = tmp_path / "run"
    with pytest.raises(UserError) as error:
        Trainer(_config(workspace, run, model=str(model)), progress=False)
    message = str(error.value)
    assert message.startswith(f"{workspace['data']}: the longest train example (index {int(lengths.argmax())}) "
                              f"has {int(lengths.max())} tokens, more than the model's context of 64")
    assert f"max_position_embeddings in {model / 'config.json'}" in message and "--max-seq-len 64" in message
    assert not run.exists()


def _offsets(data: Path) -> list[int]:
    from safetensors.numpy import load_file

    return load_file(str(data / "train.safetensors"))["offsets"].tolist()


def test_run_config_stores_absolute_paths(workspace, tmp_path, monkeypatch):
    """Started with relative --model/--data/--out, the run records them absolute (run_config.json, the
    checkpoints' config.json, the adapters' base model), so it resumes from any directory."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(workspace["data"], work / "data")
    os.symlink(workspace["quant"], work / "model")
    monkeypatch.chdir(work)
    Trainer(_config(workspace, "run", model="model", data="data", iters=2, save_every=2), progress=False).train()
    record = json.loads((work / "run" / "run_config.json").read_text())
    assert record["model"] == str(Path(workspace["quant"]).resolve())  # through the link
    assert (record["data"], record["out"]) == (str((work / "data").resolve()), str((work / "run").resolve()))
    saved = json.loads((work / "run" / CHECKPOINTS_DIR / "step-0000002" / "config.json").read_text())
    assert (saved["model"], saved["data"], saved["out"]) == (record["model"], record["data"], record["out"])
    adapter_config = json.loads((work / "run" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == record["model"]

    monkeypatch.chdir(tmp_path)
    config = resume_config(work / "run", {"iters": 4})
    assert (config.model, config.data, config.iters) == (record["model"], record["data"], 4)
    assert Trainer(config, resume=True, progress=False).train()["step"] == 4


def _old_run(tmp_path: Path, out: str = "runs/r") -> Path:
    """A project folder with a model, data and a run whose run_config.json (as written before paths were
    stored absolute) holds them as typed, from the project folder."""
    project = tmp_path / "project"
    for folder in ("models/m", "data/d", "runs/r"):
        (project / folder).mkdir(parents=True)
    record = {"model": "models/m", "data": "data/d", "out": out, "iters": 30,
              "lora": {"rank": 4}, "template": "dolly", "total_steps": 30, "data_meta": {}}
    (project / "runs/r/run_config.json").write_text(json.dumps(record))
    return project


def test_relative_paths_of_an_older_run_config_are_still_found(tmp_path, monkeypatch):
    project = _old_run(tmp_path)
    monkeypatch.chdir(project)  # as before: from the folder the run was started in
    config = resume_config("runs/r", {})
    assert (config.model, config.data) == (str(project / "models/m"), str(project / "data/d"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # from elsewhere: the stored out tells where the run was started
    config = resume_config(project / "runs" / "r", {})
    assert (config.model, config.data, config.out) == (str(project / "models/m"), str(project / "data/d"),
                                                       str(project / "runs" / "r"))
    assert resume_config(project / "runs/r", {"model": "mine"}).model == "mine"  # a flag wins


def test_relative_paths_not_found_are_one_line(tmp_path, monkeypatch):
    project = _old_run(tmp_path, out="/somewhere/else")  # the start folder cannot be told
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"run_config.json: model 'models/m' is relative and not found from "
                                        r".*; resume from the directory the run was started in, or give --model"):
        resume_config(project / "runs/r", {})
    record = json.loads((project / "runs/r/run_config.json").read_text())
    record.update(model=str(tmp_path / "gone"), data=str(project / "data/d"))
    (project / "runs/r/run_config.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"run_config.json: model .*gone is not found; give --model"):
        resume_config(project / "runs/r", {})


@pytest.mark.parametrize("text, match", [
    ('{"iters": 30,', r"run_config.json, line 1, column \d+: not valid JSON"),
    ("[1, 2]", r"run_config.json: expected an object at the top level"),
    ('{"batch_size": "four"}', r'run_config.json: batch_size is "four", expected a whole number'),
    ('{"learning_rate": true}', r"run_config.json: learning_rate is true, expected a number"),
    ('{"iters": 2.5}', r"run_config.json: iters is 2.5, expected a whole number or null"),
    ('{"lora": 5}', r"run_config.json: lora is 5, expected an object"),
    ('{"lora": {"rank": "x"}}', r'run_config.json: lora.rank is "x", expected a whole number'),
    ('{"lora": {"layers": [0, "1"]}}', r'run_config.json: lora.layers is \[0, "1"\], expected a list of whole'),
    ('{"model": 7}', r"run_config.json: model is 7, expected a string"),
    ('{"batch_sise": 4}', r"run_config.json: unknown TrainConfig key\(s\): batch_sise"),
    ('{"iters": 0}', r"run_config.json: iters must be >= 1"),
    ('{"lora": {"dropout": 2}}', r"run_config.json: lora dropout must be in \[0, 1\)"),
])
def test_an_invalid_run_config_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, match):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(text)
    with pytest.raises(UserError, match=match):
        resume_config(run, {})
    with pytest.raises(SystemExit) as exit_:  # the command: exit 2, one line, no traceback
        finetune.main(["--resume", str(run)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["other out", "config file", "not a run", "no folder"])
def test_resume_arguments_that_cannot_work_are_one_line(tmp_path, capsys, case):
    run = _old_run(tmp_path) / "runs/r"
    argv, match = {
        "other out": (["--resume", str(run), "--out", str(tmp_path / "other")], "name different folders"),
        "config file": (["--resume", str(run), "--config", str(tmp_path / "c.yaml")],
                        "a resumed run takes its settings from"),
        "not a run": (["--resume", str(tmp_path)], "run_config.json: not found; --resume needs a run folder"),
        "no folder": (["--resume", str(tmp_path / "nothing")], "nothing: run folder not found"),
    }[case]
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        finetune.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and match in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert _snapshot(tmp_path) == before
