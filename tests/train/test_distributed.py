"""Data-parallel training: 2 ranks on the ring backend (``mlx.launch -n 2`` on localhost) give the losses
and adapters of 1 process on the same global batch, through accumulation, an epoch boundary, a rank
left without rows by a final partial batch, and a resume on 2 ranks or on 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_qlora.config import DataConfig, LoRAConfig, TrainConfig
from mlx_qlora.data.dataset import PreparedDataset
from mlx_qlora.data.prepare import prepare_dataset
from mlx_qlora.errors import UserError
from mlx_qlora.lora.adapters import load_adapters
from mlx_qlora.train.checkpoint import latest_checkpoint
from mlx_qlora.train.distributed import World, rank_seed
from mlx_qlora.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "dolly_sample.jsonl"
FINETUNE = ROOT / "scripts" / "finetune.py"
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dirs):
    """The tiny 4-bit model and a small prepared data set whose train and validation splits both end in a
    batch of one row, so that with 2 ranks rank 1 gets no rows of it."""
    root = tmp_path_factory.mktemp("distributed")
    full, quant = tiny_model_dirs["full"], tiny_model_dirs["quant"]
    records = root / "records.jsonl"
    records.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:55]) + "\n", encoding="utf-8")
    data = root / "data"
    prepare_dataset(records, full / "tokenizer.model", data, DataConfig(max_seq_len=96, val_fraction=0.1))
    n_train, n_val = len(PreparedDataset(data, "train")), len(PreparedDataset(data, "validation"))
    assert (n_train % GLOBAL_BATCH, n_val % GLOBAL_BATCH) == (1, 1), (n_train, n_val)  # the premise above
    assert n_train // GLOBAL_BATCH + 1 < 12  # 6 steps x 2 micro-batches cross the end of the epoch
    return {"root": root, "quant": quant, "data": data}


def _flags(ws, out: Path, iters: int) -> list[str]:
    # A constant schedule after the warm-up: --iters only says where to stop, so a run stopped at step 3
    # and resumed to step 6 follows the same learning rates as one run of 6 steps.
    return ["--model", str(ws["quant"]), "--data", str(ws["data"]), "--out", str(out),
            "--batch-size", str(GLOBAL_BATCH), "--grad-accum", "2", "--iters", str(iters),
            "--schedule", "constant", "--warmup-steps", "2", "--learning-rate", "3e-3", "--lora-rank", "4",
            "--lora-alpha", "8", "--seed", "3", "--eval-every", "3", "--eval-batches", "100",
            "--log-every", "1", "--save-every", "1000", "--no-progress"]


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are free on localhost (the ring backend's ranks listen on both)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free consecutive ports on localhost")


def _launch(args: list[str], ranks: int, tmp: Path) -> str:
    """Run finetune.py as 1 plain process, or as ``ranks`` processes under ``mlx.launch`` (ring backend on
    localhost); return the output, failing the test on a non-zero exit or after 120 s."""
    script = [sys.executable, str(FINETUNE), *args]
    if ranks == 1:
        cmd = script
    else:
        launcher = Path(sys.executable).with_name("mlx.launch")
        launch = [str(launcher)] if launcher.exists() else [
            sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
        cmd = [*launch, "--backend", "ring", "-n", str(ranks), "-p", str(_free_port_pair()), "--", *script]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_RANK", "MLX_HOSTFILE"))}
    env["TMPDIR"] = str(tmp)  # where the launcher's scripts put their small temporary files
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in 120 s:\n{output}")
    assert proc.returncode == 0, output
    return output


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in _records(run_dir) if key in r}


def _adapters(run_dir: Path) -> dict[str, np.ndarray]:
    params, _ = load_adapters(run_dir)
    return {k: np.array(v) for k, v in params.items()}


def _assert_same_run(got: Path, expected: Path, steps: range) -> None:
    """Losses and validation losses equal to float32 rounding (relative 1e-6), token counts exactly."""
    for key in ("loss", "val_loss"):
        a, b = _by_step(got, key), _by_step(expected, key)
        assert set(b) >= set(a) and set(a) >= {s for s in b if s in steps}, (key, sorted(a), sorted(b))
        for step in a:
            np.testing.assert_allclose(a[step], b[step], rtol=1e-6, atol=0, err_msg=f"{key} at step {step}")
    for key in ("tokens", "learned_tokens", "val_tokens"):
        a, b = _by_step(got, key), _by_step(expected, key)
        assert a == {s: v for s, v in b.items() if s in a}, key


@pytest.mark.slow  # four training runs in fresh processes, two of them on two ranks
def test_two_ranks_equal_one_process_through_accumulation_and_resume(workspace, tmp_path):
    single = tmp_path / "single"
    _launch(_flags(workspace, single, iters=6), ranks=1, tmp=tmp_path)

    two = tmp_path / "two"
    output = _launch(_flags(workspace, two, iters=3), ranks=2, tmp=tmp_path)
    assert "done: step 3/3" in output and "on 2 ranks" in output
    assert output.count("trainable:") == 1  # rank 1 prints nothing of its own
    records = _records(two)
    # Rank 0 alone writes: one record per step and per evaluation, in order.
    assert [(r["step"], "loss" in r) for r in records] == [(0, False), (1, True), (2, True), (3, True), (3, False)]
    for r in records[1:4]:
        assert r["world_size"] == 2
        assert len(r["tokens_per_sec_per_rank"]) == 2 and len(r["peak_memory_gb_per_rank"]) == 2
        assert r["peak_memory_gb"] == max(r["peak_memory_gb_per_rank"]) > 0
        assert r["tokens_per_sec"] > 0
    assert json.loads((two / "run_config.json").read_text())["world_size"] == 2
    assert latest_checkpoint(two).name == "step-0000003"
    _assert_same_run(two, single, range(0, 4))

    # Resume the 2-rank run on 2 ranks and, separately, on 1 process: both end where the single run ends.
    on_two, on_one = tmp_path / "on_two", tmp_path / "on_one"
    shutil.copytree(two, on_two)
    shutil.copytree(two, on_one)
    _launch(["--resume", str(on_two), "--iters", "6", "--no-progress"], ranks=2, tmp=tmp_path)
    _launch(["--resume", str(on_one), "--iters", "6", "--no-progress"], ranks=1, tmp=tmp_path)

    expected = _adapters(single)
    before = _adapters(two)
    assert max(np.abs(expected[k] - before[k]).max() for k in expected) > 1e-3  # steps 4-6 changed them
    for resumed in (on_two, on_one):
        _assert_same_run(resumed, single, range(0, 7))
        assert sorted(_by_step(resumed, "loss")) == [1, 2, 3, 4, 5, 6]
        summary = json.loads((resumed / "summary.json").read_text())
        assert summary["step"] == 6
        assert summary["tokens_seen"] == json.loads((single / "summary.json").read_text())["tokens_seen"]
        got = _adapters(resumed)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6, err_msg=f"{resumed.name} {key}")
    assert "world_size" not in _records(on_one)[-1]  # the 1-process part logs as a single process


def test_ranks_that_disagree_stop_together_with_one_message(workspace, tmp_path):
    """Started by hand through the variables mlx.launch sets (MLX_RANK, MLX_HOSTFILE): ranks given
    different seeds would train apart, so both stop before training, naming the difference."""
    port = _free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = []
    for rank in (0, 1):
        args = _flags(workspace, tmp_path / "run", iters=2)
        args[args.index("--seed") + 1] = str(rank + 1)
        procs.append(subprocess.Popen([sys.executable, str(FINETUNE), *args], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the ranks did not stop")
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 2, output
        assert output.strip() == ("error: distributed run: seed differs between ranks (rank 0: 1, rank 1: 2); "
                                  "every rank needs the same model, data, flags and checkpoint")
    assert not (tmp_path / "run").exists()  # nothing was written


def test_global_batch_must_split_evenly_over_ranks(workspace, tmp_path):
    config = TrainConfig(model=str(workspace["quant"]), data=str(workspace["data"]), out=str(tmp_path / "run"),
                         batch_size=3, iters=1, lora=LoRAConfig(rank=2))
    with pytest.raises(UserError, match="batch_size: .* 3 rows .* 2 ranks"):
        Trainer(config, progress=False, world=World(rank=0, size=2))  # fails before any collective call


def test_rank_zero_keeps_the_single_process_seed():
    assert rank_seed(12345, 0) == 12345  # so a 1-process run draws the dropout masks it always drew
    seeds = {rank_seed(12345, r) for r in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
