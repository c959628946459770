#!/usr/bin/env python
"""Training attention alone: forward + backward of ``mx.fast.scaled_dot_product_attention`` (causal) over a
length that is not a multiple of 128, as MLX runs it (on CUDA: its composed formula for the gradient) and
padded to the next multiple of 128 (``kernels/cuda/sdpa.py``: cuDNN's fused backward), and at that multiple.

Mistral-7B's heads (32 query, 8 key/value, head size 128), batch 1; ``--lengths`` are query rows (2047: a
2048-token row shifted for next-token prediction). Per length: ms per forward + backward (best of
``--trials`` timings of ``--repeats`` queued calls) and the largest difference between the padded and
the unpadded outputs and gradients.

  python benchmarks/probes/sdpa_probe.py --lengths 2047,4095 --json out.json   # on a GPU
"""

from __future__ import annotations

import argparse

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import best_seconds, compute_dtype, environment, print_table, write_json

import mlx.core as mx

from mlx_qlora.kernels.cuda import sdpa


def forward_backward(length: int, pad: bool, heads=(32, 8), head_dim: int = 128, seed: int = 0):
    """A compiled ``(q, k, v) -> (output, (dq, dk, dv))`` and its inputs at ``length`` query rows."""
    mx.random.seed(seed)
    dtype = compute_dtype()
    q = mx.random.normal((1, heads[0], length, head_dim)).astype(dtype)
    k, v = (mx.random.normal((1, heads[1], length, head_dim)).astype(dtype) for _ in range(2))
    cotangent = mx.random.normal(q.shape).astype(dtype)
    mx.eval(q, k, v, cotangent)

    def attention(q, k, v):
        return sdpa.attention(q, k, v, head_dim**-0.5, "causal", pad=pad)

    fn = mx.compile(lambda q, k, v: mx.vjp(attention, [q, k, v], [cotangent]))
    return fn, (q, k, v)


def time_ms(fn, inputs, repeats: int, trials: int) -> tuple[float, list]:
    """ms per call of ``fn(*inputs)`` (``repeats`` calls queued together, best of ``trials``) and its outputs."""
    outs = fn(*inputs)
    mx.eval(outs)
    return best_seconds(lambda: mx.eval([fn(*inputs) for _ in range(repeats)]), trials) / repeats * 1e3, outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2047", help="comma list of query lengths")
    p.add_argument("--repeats", type=int, default=32, help="calls queued per timing (32: one per 7B layer)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        tile = sdpa.padded_length(length)
        plain_ms, (plain_out, plain_grads) = time_ms(*forward_backward(length, False), args.repeats, args.trials)
        padded_ms, (padded_out, padded_grads) = time_ms(*forward_backward(length, True), args.repeats, args.trials)
        tile_ms, _ = time_ms(*forward_backward(tile, False), args.repeats, args.trials)
        diff = max(float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())
                   for a, b in zip(plain_out + plain_grads, padded_out + padded_grads))
        scale = max(float(mx.abs(a.astype(mx.float32)).max()) for a in plain_out + plain_grads)
        rows.append({"length": length, "unpadded_ms": plain_ms, "padded_ms": padded_ms, "tile": tile,
                     "at_tile_ms": tile_ms, "max_diff": diff, "max_abs": scale})
    env = environment()
    print(f"\nattention forward + backward on {env.get('device_name') or env['device']}, MLX {env['mlx']}, "
          f"{compute_dtype()}, 32/8 heads of 128, causal")
    print_table(rows, [("length", "query rows", ""), ("unpadded_ms", "unpadded ms", "{:.3f}"),
                       ("padded_ms", "padded ms", "{:.3f}"), ("tile", "padded to", ""),
                       ("at_tile_ms", "at that length ms", "{:.3f}"), ("max_diff", "largest difference", "{:.3g}"),
                       ("max_abs", "largest value", "{:.3g}")])
    write_json(args.json, {"benchmark": "sdpa_probe", "environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
