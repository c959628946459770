#!/usr/bin/env python
"""The longest sequence that trains under a memory limit: ours against mlx-lm's LoRA trainer, in the same run.

For each memory limit and each stack, one LoRA step at batch 1 with gradient checkpointing (random weights,
4-bit base, LoRA rank 16 on all seven projections, bfloat16 on a GPU, float32 on the CPU: the setup of
``gpu_train.py``, whose worker runs every try) at a sequence length that doubles from ``--start`` until a
try fails, then bisects between the last length that fitted and the first that did not, to
``--granularity`` tokens. Each try runs in a fresh process under ``mx.set_memory_limit``; it fits when the
process succeeds and its measured ``mx.get_peak_memory()`` is within the limit (a limit does not stop MLX
from allocating past it on every backend, so the measured peak is the judge). The tokens/s reported for a
limit are those of the longest length that fitted. Limits are searched in increasing order, each starting
from the previous limit's longest length; the JSON is rewritten after every try, and ``--resume`` reuses
the tries of an earlier JSON, so that a run can be split across several commands.

  python benchmarks/long_context.py --preset tiny                                      # CPU smoke test
  python benchmarks/long_context.py --preset mistral-7b --json results/long_context_h100.json
  python benchmarks/long_context.py --preset llama3-8b --json results/long_context_llama3_h100.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from common import PRESETS, environment, print_table, worker_env, write_json

HERE = Path(__file__).resolve().parent
# Per preset: memory limits (GB), the first length, the bisection's granularity, the longest length tried.
DEFAULTS = {
    "tiny": dict(limits="0.03", start=256, granularity=256, max_seq=1024),
    "small": dict(limits="0.5,1", start=1024, granularity=512, max_seq=16384),
    "mistral-7b": dict(limits="16,24,48,80", start=2048, granularity=1024, max_seq=262144),
    "llama3-8b": dict(limits="16,24,48,80", start=2048, granularity=1024, max_seq=262144),
}


def try_length(args, stack: str, seq: int, limit_gb: float) -> dict:
    """One training step of ``stack`` on 1 x ``seq`` tokens under ``limit_gb`` in a fresh process."""
    cmd = [sys.executable, str(HERE / "gpu_train.py"), "--preset", args.preset, "--worker", stack, "--batch", "1",
           "--seq", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank),
           "--loss-chunk", str(args.loss_chunk), "--grad-checkpoint", "--memory-limit-gb", str(limit_gb)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(stack), timeout=args.try_timeout)
    except subprocess.TimeoutExpired:
        return {"stack": stack, "seq": seq, "limit_gb": limit_gb, "fits": False, "error": "timeout"}
    row = {"stack": stack, "seq": seq, "limit_gb": limit_gb, "wall_s": time.perf_counter() - start}
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {**row, "fits": False, "error": last[0][-300:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(peak_gb=result["peak_gb"], tokens_per_s=result["tokens_per_s"], step_s=result["step_s"])
    row["fits"] = row["peak_gb"] <= limit_gb
    return row


def longest(args, stack: str, limit_gb: float, floor: int, tries: list, save) -> Optional[dict]:
    """The try of the longest length that fits under ``limit_gb`` (None if not even ``floor`` fits)."""
    cache = {(t["stack"], t["seq"], t["limit_gb"]): t for t in tries}

    def attempt(seq: int) -> dict:
        key = (stack, seq, limit_gb)
        if key not in cache:
            cache[key] = try_length(args, stack, seq, limit_gb)
            tries.append(cache[key])
            save()
            t = cache[key]
            status = f"{t['peak_gb']:.2f} GB, {t['tokens_per_s']:,.0f} tok/s" if "peak_gb" in t else t["error"]
            print(f"{stack:7s} limit {limit_gb:g} GB  {seq:7d} tokens: {'fits' if t['fits'] else 'no'} ({status})",
                  flush=True)
        return cache[key]

    good, bad, seq = None, None, floor
    while seq <= args.max_seq:  # doubling
        t = attempt(seq)
        if not t["fits"]:
            bad = seq
            break
        good, seq = t, seq * 2
    if good is None or bad is None:
        return good
    low, high = good["seq"], bad
    while high - low > args.granularity:  # bisection on multiples of the granularity
        mid = (low + high) // 2 // args.granularity * args.granularity
        if mid in (low, high):
            break
        t = attempt(mid)
        if t["fits"]:
            good, low = t, mid
        else:
            high = mid
    return good


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(DEFAULTS), default="tiny")
    p.add_argument("--limits", help="comma list of memory limits in GB (default: the preset's)")
    p.add_argument("--stacks", default="ours,mlx-lm", help="comma list: ours (or a variant of gpu_train.py) and mlx-lm")
    p.add_argument("--start", type=int, help="the first length tried (default: the preset's)")
    p.add_argument("--granularity", type=int, help="bisection step in tokens (default: the preset's)")
    p.add_argument("--max-seq", type=int, help="the longest length tried (default: the preset's)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per try (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="steps before timing (compilation)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--try-timeout", type=float, default=1800, help="seconds before a try counts as failed")
    p.add_argument("--json", help="write the results here (rewritten after every try)")
    p.add_argument("--resume", action="store_true", help="reuse the tries already in --json")
    args = p.parse_args()
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    limits = sorted(float(x) for x in args.limits.split(","))
    stacks = args.stacks.split(",")
    tries: list = []
    if args.resume and args.json and Path(args.json).exists():
        tries = json.loads(Path(args.json).read_text())["tries"]
    env = environment()
    rows: list = []

    def save(final: bool = False) -> None:
        payload = {"benchmark": "long-context", "preset": args.preset, "config": PRESETS[args.preset],
                   "environment": env, "granularity": args.granularity, "rows": rows, "tries": tries}
        if final:
            write_json(args.json, payload)
        elif args.json:  # quietly, and never half-written
            partial = Path(args.json + ".partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            partial.replace(args.json)

    for stack in stacks:
        floor = args.start
        for limit in limits:
            best = longest(args, stack, limit, floor, tries, save)
            row = {"stack": stack, "limit_gb": limit}
            if best is not None:
                row.update(seq=best["seq"], peak_gb=best["peak_gb"], tokens_per_s=best["tokens_per_s"])
                floor = best["seq"]
            rows.append(row)
            save()
    for row in rows:  # against the peer under the same limit
        peer = next((r for r in rows if r["stack"] == "mlx-lm" and r["limit_gb"] == row["limit_gb"]), None)
        if peer and peer.get("seq") and row.get("seq"):
            row["length_vs_mlx_lm"] = row["seq"] / peer["seq"]
    print(f"\n{args.preset} on {env.get('device_name') or env['device']}, MLX {env['mlx']}; batch 1, gradient "
          f"checkpointing, LoRA r{args.rank} on 7 projections; longest length to {args.granularity} tokens")
    print_table(rows, [("stack", "stack", ""), ("limit_gb", "memory limit GB", "{:g}"),
                       ("seq", "longest sequence", "{:,}"), ("peak_gb", "peak GB", "{:.2f}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("length_vs_mlx_lm", "length vs mlx-lm", "{:.2f}x")])
    save(final=True)


if __name__ == "__main__":
    main()
