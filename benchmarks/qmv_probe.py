#!/usr/bin/env python
"""Few-row 4-bit matmul on one layer: our per-row CUDA kernel (``quant/qmv_cuda.py``) against MLX's
``quantized_matmul`` on the same weights expanded to group 64, with the kernel's error against the exact
formula. Eight distinct layers are cycled so that the weights come from memory, not from the cache; many
calls go into one evaluation so that launch and synchronisation overheads are not timed per call."""

from __future__ import annotations

import argparse
import json
import time

from common import compute_dtype, environment, print_table, write_json

import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.quant import QuantizedLinear, qmv_cuda
from mlx_qlora.quant.quantize import mlx_group_layout


def timed_us(fn, layers, x, repeats: int) -> tuple[float, float]:
    """(microseconds per call to build the graph, microseconds per call to run it)."""
    mx.eval([fn(layer, x) for layer in layers])
    calls = repeats * len(layers)
    start = time.perf_counter()
    outs = [fn(layer, x) for _ in range(repeats) for layer in layers]
    built = time.perf_counter()
    mx.eval(outs)
    return (built - start) / calls * 1e6, (time.perf_counter() - built) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096,1024x4096", help="comma list of OUTxIN")
    p.add_argument("--rows", default="1,4")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    dtype = compute_dtype()
    rows_out = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        layers = [QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype) for _ in range(8)]
        mx.eval([layer.parameters() for layer in layers])
        expanded = []
        for layer in layers:
            scales, biases, group = mlx_group_layout(layer.scales, layer.biases, in_f, None)
            expanded.append((mx.contiguous(scales.astype(dtype)), mx.contiguous(biases.astype(dtype)), group))
        mx.eval(expanded)
        by_id = {id(layer): e for layer, e in zip(layers, expanded)}
        weight_bytes = layers[0].weight.nbytes + layers[0].scales.nbytes + layers[0].biases.nbytes

        def mlx_qmm(layer, x):
            s, b, g = by_id[id(layer)]
            return mx.quantized_matmul(x, layer.weight, s, b, transpose=True, group_size=g, bits=4)

        def ours(layer, x):
            return qmv_cuda.qmv(x, layer.weight, layer.scales, layer.biases, None)

        for m in (int(v) for v in args.rows.split(",")):
            x = mx.random.normal((m, in_f)).astype(dtype)
            exact = qmv_cuda.reference(x, layers[0].weight, layers[0].scales, layers[0].biases)
            row = {"shape": shape, "rows": m, "dtype": str(dtype).rpartition(".")[2],
                   "mlx_qmm_build_us": 0.0, "mlx_qmm_us": 0.0,
                   "mlx_qmm_max_err": mx.abs(mlx_qmm(layers[0], x).astype(mx.float32) - exact).max().item()}
            row["mlx_qmm_build_us"], row["mlx_qmm_us"] = timed_us(mlx_qmm, layers, x, args.repeats)
            if qmv_cuda.supports(x, in_f, 4, None):
                row["ours_build_us"], row["ours_us"] = timed_us(ours, layers, x, args.repeats)
                row["ours_max_err"] = mx.abs(ours(layers[0], x).astype(mx.float32) - exact).max().item()
                row["ours_GB_s"] = weight_bytes / row["ours_us"] / 1e3
                row["speedup"] = row["mlx_qmm_us"] / row["ours_us"]
            row["max_abs_out"] = mx.abs(exact).max().item()
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows_out, [("shape", "out x in", ""), ("rows", "rows", ""), ("mlx_qmm_us", "MLX qmm us", "{:.1f}"),
                           ("ours_us", "ours us", "{:.1f}"), ("mlx_qmm_build_us", "MLX build us", "{:.1f}"),
                           ("ours_build_us", "ours build us", "{:.1f}"), ("ours_GB_s", "ours GB/s", "{:.0f}"),
                           ("speedup", "speed-up", "{:.2f}x"), ("ours_max_err", "ours max err", "{:.2g}"),
                           ("mlx_qmm_max_err", "MLX max err", "{:.2g}"), ("max_abs_out", "max |y|", "{:.3g}")])
    write_json(args.json, {"benchmark": "qmv", "environment": environment(), "rows": rows_out})


if __name__ == "__main__":
    main()
