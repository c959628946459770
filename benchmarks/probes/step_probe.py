#!/usr/bin/env python
"""Forms of our training step side by side, each in its own process: tokens/s and peak memory.

Variants (``--variants``, comma list; ``+`` combines):
- ``default``: the step as ``gpu_train.py`` and the trainer run it;
- ``composed``: LoRA layers compute the adapter's sum outside the base matmul (MLX's operations, the form
  that dropout still takes) instead of in the matmuls' epilogue (``lora/matmul.py``);
- ``one-eval``: the gradients and the optimizer update evaluated together, instead of the gradients first
  as the trainer does;
- ``wait``: the gradients waited for before the update is built, instead of only queued (the host then
  cannot build the update while the GPU runs the backward pass);
- ``serial``: each step waited for before the next is built, instead of the next queued first;
- ``unpadded``: attention over the real 2047 query rows (``settings.sdpa_pad`` off), so that MLX
  differentiates it through its composed formula instead of cuDNN's fused backward (``kernels/cuda/sdpa.py``).

Besides tokens/s and peak memory, each row gives the host's time per step (median, ms): calling the
compiled gradient function, queueing its graph (``mx.async_eval``: MLX encodes every operation for the
GPU here), building and queueing the update, and the wait for the GPU at the end (for the previous
step, or with ``serial`` for this one). When the GPU waits for the host, the first four add up to the step.

The model is Mistral-7B-shaped with ``--layers`` layers (random weights, 4-bit, LoRA r16 on all seven
projections); ``--memory-limit-gb`` makes MLX wait for the GPU above it (1: the step runs serialized).
MLX's buffer cache is always off here (``gpu_train.py --cache-limit-gb 0``), so the peak is what is in use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import PRESETS, compute_dtype, environment, median, print_table, set_memory_limits, timed, write_json

PHASES = ("grad_call_ms", "grad_queue_ms", "update_build_ms", "update_queue_ms", "wait_ms")
VARIANTS = ("default", "composed", "one-eval", "wait", "serial", "unpadded")


def worker(args) -> dict:
    import mlx.core as mx

    from gpu_train import build_ours, step_ours
    from mlx_qlora import settings
    from mlx_qlora.lora.layer import LoRALinear
    from mlx_qlora.train.run_ahead import bound_run_ahead

    parts = set(args.worker.split("+"))
    set_memory_limits(0, args.memory_limit_gb)
    bound_run_ahead(args.checkpointing)
    if "composed" in parts:
        LoRALinear._fused = lambda self, x: None
    unpadded = {"sdpa_pad": False} if "unpadded" in parts else {}  # attention over the real length
    with settings.override(**unpadded):
        cfg = {**PRESETS[args.preset], "num_hidden_layers": args.layers or PRESETS[args.preset]["num_hidden_layers"]}
        model = build_ours(cfg, compute_dtype(), 16, args.checkpointing)
        batch = mx.random.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1)).astype(mx.int32)
        mx.eval(batch)
        built = mx.get_active_memory() / 1e9
        mx.reset_peak_memory()
        phases = []
        step = step_ours(model, batch, args.loss_chunk, grads_first="one-eval" not in parts,
                         wait_for_grads="wait" in parts, overlap="serial" not in parts, phases=phases)
        seconds = median(timed(step, steps=args.steps, warmup=args.warmup))
    timed_phases = phases[args.warmup:]
    ms = {name: 1e3 * median([p[i] for p in timed_phases]) for i, name in enumerate(PHASES)}
    return {**ms, "variant": args.worker, "layers": cfg["num_hidden_layers"], "batch": args.batch, "seq": args.seq,
            "checkpointing": args.checkpointing, "memory_limit_gb": args.memory_limit_gb, "built_gb": built,
            "peak_gb": mx.get_peak_memory() / 1e9, "tokens_per_s": args.batch * args.seq / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--variants", default="default,composed,one-eval")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--memory-limit-gb", type=float)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the list of variants this many times")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    variants = args.variants.split(",")
    for v in variants:
        if not set(v.split("+")) <= set(VARIANTS):
            p.error(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    passed = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--loss-chunk", str(args.loss_chunk)]
    passed += ["--layers", str(args.layers)] if args.layers else []
    passed += ["--checkpointing"] if args.checkpointing else []
    passed += ["--memory-limit-gb", str(args.memory_limit_gb)] if args.memory_limit_gb is not None else []
    rows = []
    for _ in range(args.repeats):
        for v in variants:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--worker", v],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"variant {v} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[0][len("RESULT "):]))
    env = environment()
    print(f"\n{args.preset} on {env.get('device_name') or env['device']}, MLX {env['mlx']}; {args.batch} x {args.seq}, "
          f"checkpointing {args.checkpointing}")
    print_table(rows, [("variant", "variant", ""), ("layers", "layers", ""), ("tokens_per_s", "tokens/s", "{:,.0f}"),
                       ("peak_gb", "peak GB", "{:.2f}"), ("built_gb", "after build GB", "{:.2f}"),
                       ("grad_call_ms", "grad call ms", "{:.1f}"), ("grad_queue_ms", "grad queue ms", "{:.1f}"),
                       ("update_build_ms", "update build ms", "{:.1f}"),
                       ("update_queue_ms", "update queue ms", "{:.1f}"), ("wait_ms", "wait ms", "{:.1f}")])
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
