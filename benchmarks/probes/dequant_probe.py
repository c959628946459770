#!/usr/bin/env python
"""Dequantizing one per-row 4-bit layer: our CUDA kernel (``kernels/cuda/dequant.py``) against MLX's
``mx.dequantize`` on the layout expanded to groups of 64 (the path training takes without the kernel),
alone and followed by the training-sized matmul (tokens x in -> out), with each path's error against
the exact float32 dequantization. Eight layers are cycled so that the weights come from memory.

  python benchmarks/probes/dequant_probe.py          # on a CUDA GPU; elsewhere only the MLX rows
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
import mlx.nn as nn

from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.kernels.cuda import dequant as dequant_cuda
from mlx_qlora.quant.quantize import dequantize
from mlx_qlora.quant.dequant import dequantize_weight
from mlx_qlora import settings


def timed_us(fn, layers, repeats: int) -> float:
    mx.eval([fn(layer) for layer in layers])
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval([fn(layer) for layer in layers])
    return (time.perf_counter() - start) / (repeats * len(layers)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096,1024x4096", help="comma list of OUTxIN")
    p.add_argument("--tokens", type=int, default=2048, help="rows of the matmul that follows")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--words-per-thread", default=str(settings.current().dequant_words),
                   help="comma list: our kernel once for each number of 32-bit words per thread")
    p.add_argument("--json")
    args = p.parse_args()
    dtype = compute_dtype()
    counts = args.words_per_thread.split(",")
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        layers = [QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype) for _ in range(8)]
        mx.eval([layer.parameters() for layer in layers])
        x = mx.random.normal((args.tokens, in_f)).astype(dtype)
        exact = dequantize(layers[0].weight, layers[0].scales, layers[0].biases, 4, None, mx.float32)
        nbytes = layers[0].weight.nbytes + out_f * in_f * mx.zeros((), dtype=dtype).itemsize
        row = {"shape": shape, "dtype": str(dtype).rpartition(".")[2], "tokens": args.tokens}
        for name, per_thread in [("mlx", None)] + [(f"ours_w{n}", n) for n in counts]:
            knobs = dict(dequant=False) if per_thread is None else dict(dequant=True, dequant_words=int(per_thread))
            with settings.override(**knobs):
                if per_thread is not None and not dequant_cuda.supports(layers[0].weight, 4, None, dtype):
                    continue

                def deq(layer):
                    return dequantize_weight(layer.weight, layer.scales, layer.biases, 4, None, dtype)

                row[f"{name}_us"] = timed_us(deq, layers, args.repeats)
                row[f"{name}_GB_s"] = nbytes / row[f"{name}_us"] / 1e3
                row[f"{name}_matmul_us"] = timed_us(lambda layer: x @ deq(layer).T, layers, args.repeats)
                row[f"{name}_max_err"] = mx.abs(deq(layers[0]).astype(mx.float32) - exact).max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = ["mlx"] + [f"ours_w{n}" for n in counts]
    print_table(rows, [("shape", "out x in", "")]
                + [(f"{n}_us", f"{n} us", "{:.1f}") for n in names]
                + [(f"{n}_GB_s", f"{n} GB/s", "{:.0f}") for n in names]
                + [(f"{n}_matmul_us", f"{n} + matmul us", "{:.1f}") for n in names]
                + [(f"{n}_max_err", f"{n} max err", "{:.2g}") for n in names])
    write_json(args.json, {"benchmark": "dequantize", "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
