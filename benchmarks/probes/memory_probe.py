#!/usr/bin/env python
"""Where training memory goes: peak and active memory of one step (``gpu_train.py``'s, each step waited
for), with and without checkpointing, on a Mistral-7B-shaped model with fewer layers (``--layers``)."""

from __future__ import annotations

import argparse
import json

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import CHECKPOINTING, PRESETS, compute_dtype, set_memory_limits

import mlx.core as mx

from gpu_train import build_ours, step_ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="mistral-7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--no-quantize", action="store_true", help="bf16 base instead of 4-bit (is it the 4-bit path?)")
    p.add_argument("--memory-limit-gb", type=float, help="MLX memory limit: MLX waits for the GPU above it")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    p.add_argument("--cache-limit-gb", type=float, help="cap MLX's buffer cache (0 frees buffers at once)")
    args = p.parse_args()
    set_memory_limits(args.cache_limit_gb, args.memory_limit_gb)
    from mlx_qlora.train.run_ahead import bound_run_ahead

    bound_run_ahead(args.checkpointing != "off")  # as finetune.py and gpu_train.py bound MLX's queue
    cfg = {**PRESETS[args.preset], "num_hidden_layers": args.layers}
    rows = []
    for ckpt in CHECKPOINTING[args.checkpointing]:
        model = build_ours(cfg, compute_dtype(), 16, ckpt, quantize=not args.no_quantize)
        batch = mx.random.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1)).astype(mx.int32)
        mx.eval(batch)
        after_build = mx.get_active_memory() / 1e9
        step = step_ours(model, batch, args.loss_chunk, overlap=False)  # each step's peak on its own
        step_peaks = []
        for i in range(3):
            mx.reset_peak_memory()
            step()
            step_peaks.append(round(mx.get_peak_memory() / 1e9, 3))
        row = {"loss_chunk": args.loss_chunk, "memory_limit_gb": args.memory_limit_gb,
               "quantized": not args.no_quantize, "ckpt": ckpt, "layers": args.layers, "after_build_gb": after_build,
               "peak_gb": max(step_peaks), "step_peaks_gb": step_peaks, "active_gb": mx.get_active_memory() / 1e9}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, step
        mx.clear_cache()


if __name__ == "__main__":
    main()
