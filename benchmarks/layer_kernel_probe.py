#!/usr/bin/env python
"""Where the time of the one-launch decoder layer (``model/layer_kernel.py``) goes: one Mistral-shaped
layer over a static cache, launched many times in a chain (each launch's output is the next one's
input), with all six phases, with the grid-wide barriers only, and with one phase at a time, for one,
two and four blocks per multiprocessor. One MLX addition chained the same way gives the loop's host
floor per operation.

  python benchmarks/layer_kernel_probe.py            # on a CUDA GPU; elsewhere only the host floor
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import PRESETS, compute_dtype, environment, print_table, write_json

import mlx.core as mx

from gpu_train import build_ours
from mlx_qlora.device import on_cuda
from mlx_qlora.model import layer_kernel
from mlx_qlora.model.static_cache import StaticKVCache

PHASES = {"all": 63, "barriers only": 0, "qkv": 1, "attention": 2, "combine": 4, "o_proj": 8, "mlp": 16,
          "down_proj": 32}


def chained_us(fn, x: mx.array, launches: int) -> float:
    mx.eval(fn(x))
    start = time.perf_counter()
    y = x
    for _ in range(launches):
        y = fn(y)
    mx.eval(y)
    return (time.perf_counter() - start) / launches * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mistral-7b")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--capacity", type=int, default=768)
    p.add_argument("--launches", type=int, default=300)
    p.add_argument("--blocks-per-sm", default="1,2,4")
    p.add_argument("--json")
    args = p.parse_args()
    cfg = dict(PRESETS[args.preset], num_hidden_layers=1)
    mx.random.seed(0)
    model = build_ours(cfg, compute_dtype(), rank=0, grad_checkpoint=False)
    model.eval()
    layer = model.model.layers[0]
    cache = model.make_cache()
    mx.eval(model(mx.random.randint(0, cfg["vocab_size"], (1, args.prompt_tokens)), cache=cache))
    static = StaticKVCache.from_cache(cache[0], args.capacity)
    mx.eval(static.keys, static.values)
    x = mx.random.normal((1, 1, cfg["hidden_size"])).astype(compute_dtype())
    rows = [{"path": "one mx.add (host floor)", "blocks_per_sm": 0,
             "us_per_launch": chained_us(lambda y: y + 1, x, args.launches)}]
    print(json.dumps(rows[-1]), flush=True)
    sms = layer_kernel.multiprocessors() if on_cuda() else None
    if sms:
        layer_kernel.counters(layer)
        c = layer_kernel.constants_of(layer)

        def launch(y):
            launch_args = layer_kernel.launch_args(c, 1, args.capacity, y.dtype, layer.self_attn.q_proj.scales.dtype,
                                                   layer_kernel.blocks())
            inputs = layer_kernel.inputs(layer, y, static.keys, static.values, static.offset)
            return layer_kernel._kernel(c)(inputs=inputs, **launch_args)[0]

        for per_sm in [int(b) for b in args.blocks_per_sm.split(",")]:
            os.environ["MLX_QLORA_LAYER_KERNEL_BLOCKS"] = str(per_sm * sms)
            for name, mask in PHASES.items():
                layer_kernel.PHASES = mask
                us = chained_us(launch, x, args.launches)
                rows.append({"path": name, "blocks_per_sm": per_sm, "us_per_launch": us})
                print(json.dumps(rows[-1]), flush=True)
        layer_kernel.PHASES = 63
    print_table(rows, [("path", "phases", ""), ("blocks_per_sm", "blocks/SM", "{}"),
                       ("us_per_launch", "us per launch", "{:.1f}")])
    write_json(args.json, {"benchmark": "layer_kernel", "preset": args.preset, "capacity": args.capacity,
                           "multiprocessors": sms, "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
