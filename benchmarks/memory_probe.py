#!/usr/bin/env python
"""Where training memory goes: peak and active memory of one step, with and without compile and
checkpointing, on a Mistral-7B-shaped model with fewer layers (``--layers``)."""

from __future__ import annotations

import argparse
import json

from common import CHECKPOINTING, PRESETS, compute_dtype, set_memory_limits

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from gpu_train import build_ours


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
    from mlx_qlora.train.optimizer import AdamW
    from mlx_qlora.train.step import make_grad_fn, make_update_fn

    cfg = {**PRESETS[args.preset], "num_hidden_layers": args.layers}
    rows = []
    for compiled in (True,):
        for ckpt in CHECKPOINTING[args.checkpointing]:
            model = build_ours(cfg, compute_dtype(), 16, ckpt, quantize=not args.no_quantize)
            batch = mx.random.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1)).astype(mx.int32)
            mx.eval(batch)
            after_build = mx.get_active_memory() / 1e9
            grad = make_grad_fn(model, args.loss_chunk, False, compile=compiled)
            opt = AdamW()
            update = make_update_fn(opt, 1.0, compile=compiled)
            params = dict(tree_flatten(model.trainable_parameters()))
            state = opt.init(params)
            step_peaks = []
            for i in range(3):
                mx.reset_peak_memory()
                s, n, g = grad(batch, batch)
                mx.eval(s, n, g)  # the gradients first, as the trainer evaluates them
                params, state, _ = update(params, g, state, mx.array(1e-5), n)
                model.update(tree_unflatten(list(params.items())))
                mx.eval(s, params, state)
                step_peaks.append(round(mx.get_peak_memory() / 1e9, 3))
            row = {"loss_chunk": args.loss_chunk, "memory_limit_gb": args.memory_limit_gb, "quantized": not args.no_quantize, "compiled": compiled, "ckpt": ckpt, "layers": args.layers, "after_build_gb": after_build,
                   "peak_gb": max(step_peaks), "step_peaks_gb": step_peaks, "active_gb": mx.get_active_memory() / 1e9}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model, grad, update, params, state, g
            mx.clear_cache()


if __name__ == "__main__":
    main()
