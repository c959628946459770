"""The commands never destroy what the user has: an output path that holds anything but an output of the same
kind written by us (a source folder, a model folder, a plain file, the command's input) is refused with one
line and exit status 2 before any work starts, and the user's files are byte-for-byte unchanged afterwards.
Our own outputs are replaced (a training run only with --overwrite, and then the old run is gone, not mixed
with the new one); a killed write's temporary is removed by the next run of the same output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)

from mlx_qlora import cli
from mlx_qlora.config import DataConfig
from mlx_qlora.data.prepare import prepare_dataset
from mlx_qlora.model.loading import model_args_from_config, read_config
from support import write_adapters

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "dolly_sample.jsonl"


def tree(root: Path) -> dict[str, object]:
    """Every file (its bytes) and folder (None) under ``root``, hidden ones included."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def run(capsys, command: str, *argv) -> tuple[int, list[str]]:
    """Run a command in this process as its script does: (exit status, lines of standard error)."""
    capsys.readouterr()
    try:
        code = cli.command_module(command).main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.splitlines()


def refused(capsys, root: Path, command: str, *argv) -> str:
    """Run a command that must refuse: exit 2, one line, nothing under ``root`` changed; the message."""
    before = tree(root)
    code, err = run(capsys, command, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert tree(root) == before
    return err[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dirs):
    """The tiny 4-bit model, data prepared with its tokenizer, and adapters for it (a run folder)."""
    root = tmp_path_factory.mktemp("outputs")
    quant = tiny_model_dirs["quant"]
    data = root / "data"
    prepare_dataset(SAMPLE, quant / "tokenizer.model", data, DataConfig(max_seq_len=96, val_fraction=0.1))
    args = model_args_from_config(read_config(quant))
    adapters = write_adapters(root / "adapters", args, template="dolly", targets=("q_proj", "v_proj"))
    return {"model": quant, "full": tiny_model_dirs["full"], "data": data, "adapters": adapters,
            "tokenizer": quant / "tokenizer.model"}


def user_folder(path: Path) -> Path:
    """A folder of the user's: files of their own, a sub-folder, a hidden file."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "code.py").write_text("print('mine')\n")
    (path / ".hidden").write_bytes(b"\x00\x01")
    return path


# --- prepare_data.py -----------------------------------------------------------------------------------------


def test_prepare_into_the_source_folder_is_refused(ws, tmp_path, capsys, monkeypatch):
    """The issue's example: `prepare_data.py --dataset src/dolly_sample.jsonl --out src` deleted src/."""
    src = user_folder(tmp_path / "src")
    shutil.copy(SAMPLE, src / "dolly_sample.jsonl")
    monkeypatch.chdir(tmp_path)
    message = refused(capsys, tmp_path, "prepare", "--dataset", "src/dolly_sample.jsonl", "--tokenizer",
                      ws["tokenizer"], "--out", "src", "--no-progress")
    assert message == ("src: holds the input src/dolly_sample.jsonl, which writing the prepared data folder here "
                       "would delete; choose another --out")


def test_prepare_into_a_model_folder_or_a_foreign_folder_is_refused(ws, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(ws["model"], model)
    message = refused(capsys, tmp_path, "prepare", "--dataset", SAMPLE, "--tokenizer", ws["tokenizer"],
                      "--out", model, "--no-progress")
    assert message == (f"{model}: not a prepared data folder written by mlx-qlora (it is a model folder of "
                       "mlx-qlora); nothing was changed: give --out a new or empty folder")
    hf = tmp_path / "hf"
    shutil.copytree(ws["full"], hf)
    assert "(it has no meta.json and holds 'config.json' and 3 more)" in refused(
        capsys, tmp_path, "prepare", "--dataset", SAMPLE, "--tokenizer", ws["tokenizer"], "--out", hf)
    mine = user_folder(tmp_path / "mine")
    assert "(it has no meta.json and holds '.hidden' and 2 more)" in refused(
        capsys, tmp_path, "prepare", "--dataset", SAMPLE, "--tokenizer", ws["tokenizer"], "--out", mine)


def test_prepare_into_a_file_is_refused_every_time(ws, tmp_path, capsys):
    """The file used to become a folder, the original hidden as .some_file.txt.old, and a rerun crashed."""
    file = tmp_path / "some_file.txt"
    file.write_text("my file")
    for _ in range(2):
        assert refused(capsys, tmp_path, "prepare", "--dataset", SAMPLE, "--tokenizer", ws["tokenizer"],
                       "--out", file) == f"{file}: is a file, not a prepared data folder; choose another --out (the file is left as it is)"
    assert [p.name for p in tmp_path.iterdir()] == ["some_file.txt"]


def test_prepare_replaces_its_own_output_but_not_what_the_user_added(ws, tmp_path, capsys):
    out = tmp_path / "data"
    args = ("--dataset", SAMPLE, "--tokenizer", ws["tokenizer"], "--out", out, "--no-progress", "--max-seq-len")
    assert run(capsys, "prepare", *args, 96)[0] == 0
    assert run(capsys, "prepare", *args, 128)[0] == 0  # ours: replaced
    assert json.loads((out / "meta.json").read_text())["max_seq_len"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary or old copy left
    (out / "my-analysis.ipynb").write_text("{}")
    assert refused(capsys, tmp_path, "prepare", *args, 96) == (
        f"{out}: not a prepared data folder written by mlx-qlora (it also holds 'my-analysis.ipynb', which is not "
        "part of one); nothing was changed: give --out a new or empty folder")


# --- convert_weights.py, merge_adapters.py ---------------------------------------------------------------------


def test_convert_overwrite_never_replaces_a_foreign_folder(ws, tmp_path, capsys):
    foreign = user_folder(tmp_path / "foreign")
    (foreign / "config.json").write_text('{"model_type": "mine"}')
    for extra in ((), ("--overwrite",)):
        assert "not a model folder written by mlx-qlora" in refused(
            capsys, tmp_path, "convert", "--hf-path", ws["full"], "--mlx-path", foreign, *extra)
    hf = tmp_path / "hf"
    shutil.copytree(ws["full"], hf)
    assert refused(capsys, tmp_path, "convert", "--hf-path", hf, "--mlx-path", hf, "--overwrite") == (
        f"{hf}: is the input {hf}; choose another --mlx-path")
    assert "holds the input" in refused(capsys, tmp_path, "convert", "--hf-path", hf, "--mlx-path", tmp_path,
                                        "--overwrite")


def test_merge_refuses_foreign_outputs_and_replaces_its_own(ws, tmp_path, capsys):
    common = ("--model", ws["model"], "--adapter", ws["adapters"], "--no-check")
    foreign = user_folder(tmp_path / "foreign")
    assert "not a model folder written by mlx-qlora (it has no mlx_qlora.json and holds" in refused(
        capsys, tmp_path, "merge", *common, "--out", foreign)
    assert refused(capsys, tmp_path, "merge", *common, "--out", ws["model"]) == (
        f"{ws['model']}: is the input {ws['model']}; choose another --out")
    theirs = tmp_path / "model.gguf"
    theirs.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))  # a GGUF file that is not an export of ours
    assert refused(capsys, tmp_path, "merge", *common, "--out", tmp_path / "merged", "--gguf", theirs) == (
        f"{theirs}: not a GGUF file written by mlx-qlora (it has no metadata key mlx_qlora.exported); nothing was "
        "changed: choose another --gguf")
    assert "another output of this command" in refused(
        capsys, tmp_path, "merge", *common, "--out", tmp_path / "merged", "--gguf", tmp_path / "merged" / "m.gguf")
    assert "another output of this command" in refused(
        capsys, tmp_path, "merge", *common, "--out", tmp_path / "merged", "--quantize", "--quantized-out",
        tmp_path / "merged")
    shutil.rmtree(foreign)
    theirs.unlink()

    out, gguf = tmp_path / "merged", tmp_path / "merged.gguf"
    for _ in range(2):  # the second run replaces the first's folder, 4-bit copy and GGUF file
        code, err = run(capsys, "merge", *common, "--out", out, "--quantize", "--gguf", gguf, "--gguf-type", "f32")
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged-4bit", "merged.gguf"]
    assert "merged" in json.loads((out / "mlx_qlora.json").read_text())
    assert json.loads((tmp_path / "merged-4bit" / "mlx_qlora.json").read_text())["template"] == "dolly"


# --- finetune.py ---------------------------------------------------------------------------------------------


def _train(capsys, ws, out, *extra):
    code, err = run(capsys, "finetune", "--model", ws["model"], "--data", ws["data"], "--out", out, "--batch-size",
                    4, "--lora-rank", 2, "--log-every", 1, "--eval-every", 1000, "--no-progress", *extra)
    assert code == 0, err


def test_finetune_on_a_finished_run_needs_resume_or_overwrite(ws, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(capsys, ws, run_dir, "--iters", 4, "--save-every", 2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]
    assert refused(capsys, tmp_path, "finetune", "--model", ws["model"], "--data", ws["data"], "--out", run_dir,
                   "--iters", 3) == (
        f"{run_dir}: holds a finished training run (step 4 of 4); continue it with --resume {run_dir}, or give "
        "--overwrite to start a new run there (the old one's checkpoints, metrics and adapters are deleted)")
    assert refused(capsys, tmp_path, "finetune", "--resume", run_dir, "--overwrite") == (
        "--resume continues the run and --overwrite replaces it: give one of them")

    _train(capsys, ws, run_dir, "--iters", 3, "--save-every", 3, "--overwrite")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000003"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the new run's rows only, once each
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3]  # the base model's, and at the end
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 3
    assert json.loads((run_dir / "run_config.json").read_text())["total_steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_finetune_refuses_a_file_or_a_foreign_folder_before_loading_anything(ws, tmp_path, capsys):
    """The --out check comes first: with a model path that does not exist, the error is still about --out."""
    file = tmp_path / "run.txt"
    file.write_text("notes")
    missing = tmp_path / "no-model"
    assert refused(capsys, tmp_path, "finetune", "--model", missing, "--data", ws["data"], "--out", file) == (
        f"{file}: is a file, not a training run folder; choose another --out (the file is left as it is)")
    mine = user_folder(tmp_path / "mine")
    assert "not a training run folder written by mlx-qlora" in refused(
        capsys, tmp_path, "finetune", "--model", missing, "--data", ws["data"], "--out", mine, "--overwrite")
    assert refused(capsys, tmp_path, "finetune", "--model", missing, "--data", ws["data"], "--out",
                   ws["data"].parent, "--overwrite") == (
        f"{ws['data'].parent}: holds the input {ws['data']}, which writing the training run folder here would "
        "delete; choose another --out")


# --- evaluate.py, demo.py ------------------------------------------------------------------------------------


def test_evaluate_refuses_foreign_outputs_and_replaces_its_own(ws, tmp_path, capsys):
    common = ("--model", ws["model"], "--data", ws["data"], "--max-examples", 2, "--max-tokens", 2, "--no-progress")
    file = tmp_path / "eval.txt"
    file.write_text("mine")
    assert refused(capsys, tmp_path, "evaluate", *common, "--out", file) == (
        f"{file}: is a file, not an evaluation folder; choose another --out (the file is left as it is)")
    adapters = tmp_path / "adapters"
    shutil.copytree(ws["adapters"], adapters)
    assert refused(capsys, tmp_path, "evaluate", *common, "--adapter", adapters, "--out", adapters) == (
        f"{adapters}: is the input {adapters}; choose another --out")
    out = adapters / "eval"  # inside the adapters' run folder, as the README does
    for _ in range(2):
        code, err = run(capsys, "evaluate", *common, "--adapter", adapters, "--out", out)
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["generations.jsonl", "results.json", "results.md"]
    assert sorted(p.name for p in adapters.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "eval", "run_config.json"]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    (mine / "data").mkdir()  # one of the names the demo writes
    assert "not a demo folder written by mlx-qlora" in refused(capsys, tmp_path, "demo", "--out", mine)
    assert refused(capsys, tmp_path, "demo", "--out", ROOT / "data") == (
        f"{ROOT / 'data'}: holds the input {ROOT / 'data' / 'sample'}, which writing the demo folder here would "
        "delete; choose another --out")


# --- interrupted writes, the scripts themselves ----------------------------------------------------------------

KILL_DURING_CONVERT = """
import os, signal, sys
sys.argv = ["convert_weights.py", *sys.argv[1:]]
import mlx_qlora.convert as convert
write = convert._write_tensor
def write_then_die(f, tensor, *rest):
    write(f, tensor, *rest)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # mid-write, after the first tensor
convert._write_tensor = write_then_die
from mlx_qlora.cli.convert import main
main()
"""


def test_a_convert_killed_mid_write_leaves_a_temporary_that_the_next_run_removes(ws, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "model-4bit"
    argv = ["--hf-path", str(ws["full"]), "--mlx-path", str(out), "--dtype", "float32"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_CONVERT, *argv], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model-4bit.") and left[0].endswith(".tmp")  # the killed write's
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), *argv], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model-4bit"]


def test_the_script_prints_one_line_and_no_traceback(ws, tmp_path):
    file = tmp_path / "some_file.txt"
    file.write_text("my file")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--tokenizer",
                           str(ws["tokenizer"]), "--out", str(file)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {file}: is a file, not a prepared data folder; choose another --out (the file is left as it is)"]
    assert [p.name for p in tmp_path.iterdir()] == ["some_file.txt"] and file.read_text() == "my file"
