#!/usr/bin/env python
"""Which GPU kernels a decoding token or a training step of ours runs, and for how long: MLX's CUDA
kernels recorded by PyTorch's profiler (CUPTI traces every kernel of the process, MLX's too).

Prints per unit (one token, or one step): the number of kernels, the sum of their durations, the time
the GPU was busy (their union: MLX's CUDA graphs run independent kernels side by side), the span from
the first kernel's start to the last one's end and the wall time; then the kernels with the most time.
Durations are inflated a little by the tracing; compare within one run. On the CPU nothing is recorded
(the script still runs, as a smoke test).

  python benchmarks/probes/kernel_profile.py decode --preset mistral-7b --json decode.json   # on a CUDA GPU
  python benchmarks/probes/kernel_profile.py train --preset mistral-7b --seq 2048
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import PRESETS, compute_dtype, environment, print_table, write_json

import mlx.core as mx

from gpu_train import build_ours, step_ours


def _union(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return busy


def summarize(prof, units: int, wall_s: float, top: int) -> tuple[dict, list[dict]]:
    """Totals per unit (ms) and the ``top`` kernels by time, from the profiler's GPU events."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]  # us
    totals = {
        "kernels_per_unit": len(kernels) / units,
        "kernel_sum_ms": sum(e - s for s, e in spans) / units / 1e3,
        "busy_ms": _union(spans) / units / 1e3,
        "span_ms": (max(e for _, e in spans) - min(s for s, _ in spans)) / units / 1e3 if spans else 0.0,
        "wall_ms": wall_s / units * 1e3,
    }
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:100], [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.end - e.time_range.start
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    rows = [{"kernel": name, "calls_per_unit": n / units, "ms_per_unit": us / units / 1e3} for name, (n, us) in ranked]
    return totals, rows


def profile_decode(cfg: dict, prompt_tokens: int, tokens: int):
    from mlx_qlora.generate.decode_step import CompiledDecoder, DecodeState

    model = build_ours(cfg, compute_dtype(), rank=0, grad_checkpoint=False)
    model.eval()
    prompt = mx.random.randint(0, cfg["vocab_size"], (prompt_tokens,)).astype(mx.int32)
    cache = model.make_cache()
    mx.eval(model(prompt[None], cache=cache))
    warm = 16
    state = DecodeState.from_caches(cache, prompt_tokens + warm + tokens)
    mx.eval(state.arrays)
    decoder = CompiledDecoder(model)
    ids = mx.random.randint(0, cfg["vocab_size"], (warm + tokens,)).tolist()

    def run(chunk):
        outs = []
        for t in chunk:
            outs.append(decoder.step(state, mx.array([[t]])))
            mx.async_eval(outs[-1])
        mx.eval(outs)

    run(ids[:warm])
    with profile(activities=_activities()) as prof:
        start = time.perf_counter()
        run(ids[warm:])
        wall = time.perf_counter() - start
    return prof, tokens, wall


def profile_train(cfg: dict, batch: int, seq: int, checkpointing: bool, steps: int):
    from mlx_qlora.train.run_ahead import bound_run_ahead

    bound_run_ahead(checkpointing)
    model = build_ours(cfg, compute_dtype(), rank=16, grad_checkpoint=checkpointing)
    tokens = mx.random.randint(0, cfg["vocab_size"], (batch, seq)).astype(mx.int32)
    run = step_ours(model, tokens, 1024)
    for _ in range(2):
        run()
    with profile(activities=_activities()) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        wall = time.perf_counter() - start
    return prof, steps, wall


def _activities() -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["decode", "train"])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="decode: prompt length")
    p.add_argument("--tokens", type=int, default=16, help="decode: tokens profiled")
    p.add_argument("--batch", type=int, default=1, help="train: sequences per step")
    p.add_argument("--seq", type=int, default=2048, help="train: tokens per sequence")
    p.add_argument("--checkpointing", action="store_true", help="train: gradient checkpointing")
    p.add_argument("--steps", type=int, default=2, help="train: steps profiled")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--json")
    args = p.parse_args()
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the profiler traces CUDA once torch's context exists
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    mx.random.seed(0)
    if args.mode == "decode":
        prof, units, wall = profile_decode(cfg, args.prompt_tokens, args.tokens)
    else:
        prof, units, wall = profile_train(cfg, args.batch, args.seq, args.checkpointing, args.steps)
    totals, rows = summarize(prof, units, wall, args.top)
    unit = "token" if args.mode == "decode" else "step"
    print(f"{args.mode}, {args.preset}, {cfg['num_hidden_layers']} layers, per {unit}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in totals.items()))
    if not rows:
        print("no GPU kernels recorded (needs MLX's CUDA backend)")
    print_table(rows, [("ms_per_unit", f"ms per {unit}", "{:.4f}"), ("calls_per_unit", f"calls per {unit}", "{:.1f}"),
                       ("kernel", "kernel", "")])
    write_json(args.json, {"benchmark": "kernel_profile", "mode": args.mode, "preset": args.preset,
                           "layers": cfg["num_hidden_layers"], "args": vars(args), "environment": environment(),
                           "totals": totals, "rows": rows})


if __name__ == "__main__":
    main()
