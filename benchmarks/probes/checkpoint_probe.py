#!/usr/bin/env python
"""Peak memory of one training step of a stack of Mistral-7B-sized MLP blocks (4096 -> 14336 -> 4096 at
2048 tokens, bf16 on a GPU), without checkpointing, with ``mx.checkpoint`` and with ours
(``model/recompute.py``), optionally under an MLX memory limit (which makes MLX wait for the GPU instead
of queueing work ahead of it). Each block's weights are trained, so they and their gradients add
~0.47 GB per block on top of the activations."""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import compute_dtype, set_memory_limits

import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.model.recompute import checkpoint


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        h = self.up(x)
        return x + self.down(nn.gelu(h) * nn.silu(h))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--mode", choices=["none", "mx", "ours"], default="ours")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=14336)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--memory-limit-gb", type=float)
    args = p.parse_args()
    set_memory_limits(0, args.memory_limit_gb)
    dtype = compute_dtype()
    blocks = [Block(args.dim, args.hidden) for _ in range(args.blocks)]
    for block in blocks:
        block.set_dtype(dtype)
    mx.eval([b.parameters() for b in blocks])

    def loss(params, x):
        for block, p in zip(blocks, params):
            def run(q, h, block=block):
                block.update(q)
                return block(h)

            if args.mode == "none":
                x = run(p, x)
            else:
                x = (mx.checkpoint(run) if args.mode == "mx" else checkpoint(run))(p, x)
        return x.astype(mx.float32).sum()

    grad = mx.compile(mx.value_and_grad(loss))
    params = [b.trainable_parameters() for b in blocks]
    x = mx.random.normal((args.tokens, args.dim)).astype(dtype)
    mx.eval(x)
    for _ in range(3):
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(grad(params, x))
        step_ms = (time.perf_counter() - start) * 1e3
    print(json.dumps({"blocks": args.blocks, "mode": args.mode, "memory_limit_gb": args.memory_limit_gb,
                      "step_ms": round(step_ms, 1), "peak_gb": round(mx.get_peak_memory() / 1e9, 6)}))


if __name__ == "__main__":
    main()
