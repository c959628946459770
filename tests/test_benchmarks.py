"""Smoke tests: the GPU benchmark scripts and the probes (``benchmarks/probes/``) run end to end on the CPU
with tiny sizes and write JSON."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PROBES = BENCH / "probes"


def _run(args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=BENCH, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_gpu_train_tiny(tmp_path):
    result, stdout = _run(["gpu_train.py", "--preset", "tiny", "--shapes", "2x32", "--steps", "1", "--warmup", "1"],
                          tmp_path)
    rows = result["rows"]
    assert {(r["stack"], r["grad_checkpoint"]) for r in rows} == {
        ("ours", False), ("ours", True), ("mlx-lm", False), ("mlx-lm", True)}
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_gb"] > 0 and 0 < row["mfu"]
        assert row["speed_vs_mlx_lm"] > 0
    assert "| stack |" in stdout


def test_gpu_generate_tiny(tmp_path):
    result, _ = _run(["gpu_generate.py", "--preset", "tiny", "--prompt-tokens", "16", "--max-tokens", "8",
                      "--repeats", "1", "--stacks", "ours,ours-eager,mlx-lm"], tmp_path)
    stacks = {r["stack"]: r for r in result["rows"]}
    assert set(stacks) == {"ours", "ours-eager", "mlx-lm"}
    for row in stacks.values():
        assert row["decode_tokens_per_s"] > 0 and row["prompt_tokens_per_s"] > 0
        # the 4-bit layers read about a quarter of the bytes of float32 weights, plus the float head
        assert 0 < row["share_of_limit"]


@pytest.mark.slow
def test_gpu_generate_with_adapters_tiny(tmp_path):
    """``--adapters``: every stack decodes with random LoRA adapters attached; off CUDA our fused decoder
    layer is never taken (on a GPU, ``ours`` takes it and ``ours-unfused`` does not)."""
    result, stdout = _run(["gpu_generate.py", "--preset", "tiny", "--prompt-tokens", "16", "--max-tokens", "8",
                           "--repeats", "1", "--adapters", "4", "--stacks", "ours,ours-unfused,mlx-lm"], tmp_path)
    stacks = {r["stack"]: r for r in result["rows"]}
    assert set(stacks) == {"ours", "ours-unfused", "mlx-lm"} and result["adapter_rank"] == 4
    for row in stacks.values():
        assert row["decode_tokens_per_s"] > 0 and row["adapter_rank"] == 4 and row["fused_layer"] is False
        assert row["lora_layers"] == 7 * 4  # all seven projections of the tiny preset's four layers
    assert "LoRA rank 4 on all seven projections" in stdout


def test_probes_run_on_the_cpu():
    for args in (["probes/checkpoint_probe.py", "--blocks", "2", "--dim", "32", "--hidden", "64", "--tokens", "16"],
                 ["probes/memory_probe.py", "--preset", "tiny", "--layers", "1", "--seq", "32", "--checkpointing", "on",
                  "--memory-limit-gb", "1"]):
        proc = subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        assert row["peak_gb"] > 0


def test_qmv_probe_tiny(tmp_path):
    result, stdout = _run(["probes/qmv_probe.py", "--shapes", "64x128", "--rows", "1,2", "--repeats", "1"], tmp_path)
    for row in result["rows"]:
        # MLX's quantized_matmul on the expanded per-row layout agrees with the exact formula
        assert row["mlx_qmm_max_err"] < 1e-4 * max(1.0, row["max_abs_out"])
    assert "| out x in |" in stdout


def test_attention_probe_tiny(tmp_path):
    result, stdout = _run(["probes/attention_probe.py", "--heads", "4,2,32", "--capacities", "32", "--repeats", "1"],
                          tmp_path)
    rows = result["rows"]
    assert [(r["capacity"], r["filled"]) for r in rows] == [(32, 17), (32, 32)]  # half full; wrapped
    assert all(r["mlx_masked_us"] > 0 and r["mlx_sliced_us"] > 0 for r in rows)
    assert "| slots |" in stdout


def test_long_attention_probe_tiny(tmp_path):
    """Past the window, the band of chunks (boolean or additive masks) gives block-wise attention's output;
    causal attention in chunks of 128 queries (three calls) gives one call's."""
    result, stdout = _run(["probes/long_attention_probe.py", "--lengths", "300", "--chunks", "32,64", "--window", "96",
                           "--heads", "4,2,16", "--call-pairs", str(128 * 384)], tmp_path)
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"causal", "causal-chunks C=128", "banded C=32", "banded C=64", "banded-bool C=32", "blockwise"}
    assert rows["causal-chunks C=128"]["max_diff_vs_causal"] < 1e-5
    assert all(r["ms"] > 0 and r["peak_gb"] >= 0 for r in rows.values())
    for name in ("banded C=32", "banded C=64", "banded-bool C=32"):
        assert rows[name]["max_diff_vs_blockwise"] < 1e-5  # float32 on the CPU
    assert "| tokens | path |" in stdout


def test_dequant_probe_tiny(tmp_path):
    result, stdout = _run(["probes/dequant_probe.py", "--shapes", "64x128", "--tokens", "8", "--repeats", "1"],
                          tmp_path)
    (row,) = result["rows"]
    assert row["mlx_us"] > 0 and row["mlx_max_err"] < 1e-5  # float32 on the CPU: our exact ops
    assert "| out x in |" in stdout


def test_fused_decode_probe_tiny(tmp_path):
    result, stdout = _run(["probes/fused_decode_probe.py", "--prompt-tokens", "8", "--steps", "4", "--adapters", "2",
                           "--images", "cubin,size"], tmp_path)
    rows = result["rows"]  # on the CPU only the default path runs, once per kernel image asked for
    assert [(r["path"], r["image"]) for r in rows] == [("mlx attention", "cubin"), ("mlx attention", "size")]
    for row in rows:
        assert row["ms_per_token"] > 0 and row["max_logit_diff"] == 0
        assert row["adapter_rank"] == 2 and row["fused_layer"] is False
    assert "| path | image |" in stdout


def test_variant_stacks_run_in_their_own_environment(tmp_path):
    """A variant of our stack is our code with its variables set in the worker process (here the
    dequantization kernel, which the CPU does not take, so both rows run the same path)."""
    result, stdout = _run(["gpu_train.py", "--preset", "tiny", "--shapes", "2x32", "--steps", "1", "--warmup", "1",
                           "--checkpointing", "off", "--stacks", "ours,ours-mlx-dequant"], tmp_path)
    assert [r["stack"] for r in result["rows"]] == ["ours", "ours-mlx-dequant"]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert [r["env"] for r in result["rows"]] == [{}, {"MLX_QLORA_DEQUANT": "mlx"}]


def test_kernel_profile_runs_on_the_cpu(tmp_path):
    for mode in (["decode", "--prompt-tokens", "8", "--tokens", "2"], ["train", "--seq", "16", "--steps", "1"]):
        result, stdout = _run(["probes/kernel_profile.py", *mode, "--preset", "tiny", "--layers", "1"], tmp_path)
        assert result["totals"]["wall_ms"] > 0 and result["rows"] == []  # no GPU kernels on the CPU
        assert "no GPU kernels recorded" in stdout


def test_step_probe_tiny(tmp_path):
    result, stdout = _run(["probes/step_probe.py", "--preset", "tiny", "--seq", "32", "--layers", "2", "--steps", "1",
                           "--warmup", "1", "--checkpointing", "--variants", "default,composed+one-eval,wait+unpadded"],
                          tmp_path)
    assert [r["variant"] for r in result["rows"]] == ["default", "composed+one-eval", "wait+unpadded"]
    assert all(r["tokens_per_s"] > 0 and r["layers"] == 2 and r["checkpointing"] for r in result["rows"])
    for r in result["rows"]:  # the host phases are parts of the step: together no longer than it
        phases = [r[k] for k in ("grad_call_ms", "grad_queue_ms", "update_build_ms", "update_queue_ms", "wait_ms")]
        assert all(ms >= 0 for ms in phases) and sum(phases) <= 1.05 * 1e3 * 32 / r["tokens_per_s"] + 1
    assert "| composed+one-eval |" in stdout and "grad queue ms" in stdout


def test_sdpa_probe_tiny(tmp_path):
    result, stdout = _run(["probes/sdpa_probe.py", "--lengths", "5", "--repeats", "1", "--trials", "1"], tmp_path)
    (row,) = result["rows"]
    assert row["length"] == 5 and row["tile"] == 128
    assert row["unpadded_ms"] > 0 and row["padded_ms"] > 0 and row["at_tile_ms"] > 0
    assert row["max_diff"] <= 1e-5 * max(1.0, row["max_abs"])  # float32 on the CPU: padding changes nothing
    assert "| 5 |" in stdout


def test_decode_layer_probe_tiny(tmp_path):
    """Builds every case (the kernels need CUDA: on the CPU nothing is timed and the table is empty)."""
    result, stdout = _run(["probes/decode_layer_probe.py", "--preset", "tiny", "--copies", "2", "--calls", "2",
                           "--capacity", "64", "--filled", "30"], tmp_path)
    assert result["args"]["capacity"] == 64 and "| case |" in stdout
    assert result["rows"] or "nothing to time here" in stdout
    assert all(row["kernel_us"] > 0 for row in result["rows"])


def test_decode_sweep_tiny(tmp_path):
    """One profile per setting (nothing is recorded on the CPU: the parts are zero there)."""
    result, stdout = _run(["probes/decode_sweep.py", "--preset", "tiny", "--layers", "1", "--tokens", "2",
                           "--settings", "default; MLX_QLORA_QMV_UNROLL=2 MLX_QLORA_ATTENTION_UNROLL=8"], tmp_path)
    assert [r["setting"] for r in result["rows"]] == ["default", "MLX_QLORA_QMV_UNROLL=2 MLX_QLORA_ATTENTION_UNROLL=8"]
    for row in result["rows"]:
        assert row["wall_ms"] > 0 and row["busy_ms"] >= row["gate_up"] >= 0
    assert "| setting |" in stdout
    bad = subprocess.run([sys.executable, "probes/decode_sweep.py", "--settings", "default;UNROLL"], cwd=BENCH,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "'UNROLL' is not NAME=VALUE" in bad.stderr


def test_probes_find_their_helpers_from_their_folder():
    """Each probe imports ``common`` (some ``gpu_train`` too) from ``benchmarks/`` by itself: run in a process
    where neither is importable beforehand (``main`` is not called: ``run_name`` is not ``__main__``)."""
    code = ("import runpy, sys\n"
            "bench = sys.argv[1]\n"
            "for path in sys.argv[2:]:\n"
            "    sys.path[:] = [p for p in sys.path if p not in ('', bench)]\n"
            "    for name in ('common', 'gpu_train'):\n"
            "        sys.modules.pop(name, None)\n"
            "    runpy.run_path(path, run_name='probe')\n")
    probes = sorted(str(p) for p in PROBES.glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH), *probes], cwd=BENCH.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_probes_readme_lists_every_probe():
    listed = set(re.findall(r"^\| `(\w+\.py)` \|", (PROBES / "README.md").read_text(), flags=re.MULTILINE))
    assert listed == {p.name for p in PROBES.glob("*.py")}


@pytest.mark.slow
def test_user_path_tiny(tmp_path):
    """The README's scripts and mlx-lm's commands, each in its own process, on a random tiny checkpoint with
    the real Mistral tokenizer: every measured number is there and positive (three steps: a steady rate
    needs two logged windows after the first)."""
    result, stdout = _run(["user_path.py", "--preset", "tiny", "--steps", "3", "--batch-size", "1", "--grad-accum",
                           "1", "--long-records", "40", "--max-tokens", "4", "--chat-tokens", "3",
                           "--ours-batching", "tokens,rows", "--work", str(tmp_path / "work")], tmp_path)
    assert set(result["datasets"]) == {"sample", "long"}
    long = result["datasets"]["long"]["train_token_lengths"]
    assert 200 <= long["min"] <= long["max"] <= 1000  # the generated records are as long as promised
    assert {(r["label"], r["dataset"]) for r in result["train"]} == {
        (s, d) for s in ("ours (tokens)", "ours (rows)", "mlx-lm") for d in ("sample", "long")}
    for row in result["train"]:  # the README's batching: a token budget, said in the run's second line
        if row["label"] == "ours (tokens)":
            assert "--max-batch-tokens 256" in row["command"] and row["first_lines"][1].startswith("batches: up to 256")
    for row in result["train"]:
        assert row["steps"] == 3 and row["tokens"] > 0 and row["wall_s"] > row["first_step_s"] > 0
        assert row["steady_tokens_per_s"] > 0 and row["end_to_end_tokens_per_s"] > 0
        assert row["steady_vs_mlx_lm"] > 0
        assert row["peak_gb"] is None if row["stack"] == "mlx-lm" else row["peak_gb"] > 0
    assert {(r["stack"], r["adapter"]) for r in result["generate"]} == {
        (s, a) for s in ("ours", "mlx-lm") for a in (False, True)}
    for row in result["generate"]:
        assert row["generated_tokens"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["wall_s"] > row["first_token_s"] > 0
    (chat,) = result["chat"]
    assert chat["turns"] == 3 and chat["session_decode_tokens_per_s"] > 0
    assert chat["turn3_decode_tokens_per_s"] is None or chat["turn3_decode_tokens_per_s"] > 0
    assert chat["warm_benchmark_tokens_per_s"] > 0  # the yardstick, gpu_generate.py in the same command
    assert chat["turn3_decode_tokens_per_s"] is None or chat["turn3_vs_warm"] == pytest.approx(
        chat["turn3_decode_tokens_per_s"] / chat["warm_benchmark_tokens_per_s"])
    assert "| sample | ours (tokens) |" in stdout and "| long | mlx-lm |" in stdout


@pytest.mark.slow  # seven training tries in fresh processes, about 50 s
def test_long_context_tiny(tmp_path):
    result, stdout = _run(["long_context.py", "--preset", "tiny"], tmp_path)
    rows = {r["stack"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "mlx-lm"} and "| longest sequence |" in stdout
    for stack, row in rows.items():
        tries = [t for t in result["tries"] if t["stack"] == stack]
        fitted = [t["seq"] for t in tries if t["fits"]]
        assert all(t["peak_gb"] <= t["limit_gb"] for t in tries if t["fits"])
        assert row["seq"] == max(fitted) and row["tokens_per_s"] > 0  # the longest length that fitted
        # the search ended at a length that did not fit, or at the longest length it may try
        assert row["seq"] == 1024 or any(not t["fits"] and t["seq"] - row["seq"] <= 256 for t in tries)


@pytest.mark.slow
def test_qwen3_preset_runs_beside_mlx_lm_qwen3(tmp_path):
    """The Qwen3 presets build our decoder with q/k norms and mlx-lm's own qwen3 model (about 30 s)."""
    result, _ = _run(["gpu_train.py", "--preset", "qwen3-tiny", "--shapes", "2x32", "--steps", "1", "--warmup", "1",
                      "--checkpointing", "off"], tmp_path)
    assert {r["stack"] for r in result["rows"]} == {"ours", "mlx-lm"}
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    result, _ = _run(["gpu_generate.py", "--preset", "qwen3-tiny", "--prompt-tokens", "16", "--max-tokens", "8",
                      "--repeats", "1", "--stacks", "ours,mlx-lm"], tmp_path)
    assert all(r["decode_tokens_per_s"] > 0 for r in result["rows"])


def test_nf4_reference_levels_and_round_trip():
    """benchmarks/nf4.py, the NF4 peer of the rounding table: its levels follow the definition (16 values,
    -1 and 1 at the ends, an exact zero, 8 above and 7 below it, each positive one the N(0, 1) quantile of
    its probability over the last one's), and the round trip gives each weight its block's nearest level."""
    from statistics import NormalDist

    import numpy as np

    sys.path.insert(0, str(BENCH))
    try:
        from nf4 import OFFSET, nf4_levels, nf4_roundtrip
    finally:
        sys.path.remove(str(BENCH))
    levels = nf4_levels()
    assert len(levels) == 16 and levels[0] == -1 and levels[-1] == 1 and np.all(np.diff(levels) > 0)
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7 and 0.0 in levels
    ppf = NormalDist().inv_cdf
    np.testing.assert_allclose(levels[8:], [ppf(p) / ppf(OFFSET) for p in np.linspace(0.5, OFFSET, 9)[1:]],
                               rtol=1e-12)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 128)).astype(np.float32)
    restored = nf4_roundtrip(w, 64)
    blocks = w.reshape(4, 2, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    nearest = np.abs((blocks / absmax)[..., None] - levels).argmin(-1)
    np.testing.assert_allclose(restored.reshape(4, 2, 64), levels[nearest] * absmax, rtol=1e-6)


def test_launch_cost_probe_needs_cuda():
    """On the CPU the probe times nothing: it says why and fails."""
    proc = subprocess.run([sys.executable, "probes/launch_cost_probe.py", "--pad-kb", "0"], cwd=BENCH,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs MLX's CUDA backend" in proc.stderr
