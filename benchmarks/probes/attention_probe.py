#!/usr/bin/env python
"""One-token attention over a static key/value cache: our CUDA kernels (``kernels/cuda/attention.py``)
against MLX's attention with the slot mask (what the static cache needs without the kernel) and MLX's
attention on the filled slots without a mask (what a growing cache does), with the kernel's error
against ``attention_cuda.reference``. Many calls go into one evaluation, as in ``qmv_probe.py``.

  python benchmarks/probes/attention_probe.py            # on a CUDA GPU; elsewhere only the MLX rows
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import compute_dtype, environment, print_table, write_json

import mlx.core as mx

from mlx_qlora.kernels.cuda import attention as attention_cuda
from mlx_qlora.model import build_mask
from mlx_qlora.model.static_cache import slot_positions


def timed_us(fn, repeats: int) -> float:
    mx.eval(fn())
    start = time.perf_counter()
    outs = [fn() for _ in range(repeats)]
    mx.eval(outs)
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", default="32,8,128", help="query heads, key/value heads, head dim")
    p.add_argument("--capacities", default="768,4096")
    p.add_argument("--repeats", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    H, HKV, D = (int(v) for v in args.heads.split(","))
    dtype = compute_dtype()
    scale = D**-0.5
    rows = []
    for C in (int(v) for v in args.capacities.split(",")):
        for offset in (C // 2, C + 7):  # half full; wrapped around
            mx.random.seed(C + offset)
            q = mx.random.normal((1, H, 1, D)).astype(dtype)
            keys = mx.random.normal((1, HKV, C, D)).astype(dtype)
            values = mx.random.normal((1, HKV, C, D)).astype(dtype)
            off = mx.array(offset, dtype=mx.int32)
            mask = build_mask(mx.array([offset]), slot_positions(off, C), window=C)
            n_valid = min(offset + 1, C)
            mx.eval(q, keys, values, mask)
            exact = attention_cuda.reference(q, keys, values, offset, scale)
            row = {"capacity": C, "offset": offset, "filled": n_valid, "dtype": str(dtype).rpartition(".")[2]}
            row["mlx_masked_us"] = timed_us(
                lambda: mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask), args.repeats)
            row["mlx_sliced_us"] = timed_us(lambda: mx.fast.scaled_dot_product_attention(
                q, keys[:, :, :n_valid], values[:, :, :n_valid], scale=scale), args.repeats)
            if attention_cuda.supports_shapes(q.shape, keys.shape, q.dtype, keys.dtype):
                def ours():
                    return attention_cuda.decode_attention(q, keys, values, off, scale)

                row["ours_us"] = timed_us(ours, args.repeats)
                row["ours_max_err"] = mx.abs(ours().astype(mx.float32) - exact).max().item()
                masked = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
                masked = masked.transpose(0, 2, 1, 3).reshape(1, 1, H * D)
                row["mlx_masked_max_err"] = mx.abs(masked.astype(mx.float32) - exact).max().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, [("capacity", "slots", ""), ("offset", "position", ""), ("filled", "filled", ""),
                       ("mlx_masked_us", "MLX masked us", "{:.1f}"), ("mlx_sliced_us", "MLX sliced us", "{:.1f}"),
                       ("ours_us", "ours us", "{:.1f}"), ("ours_max_err", "ours max err", "{:.2g}"),
                       ("mlx_masked_max_err", "MLX masked max err", "{:.2g}")])
    write_json(args.json, {"benchmark": "decode_attention", "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
