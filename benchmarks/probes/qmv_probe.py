#!/usr/bin/env python
"""Few-row 4-bit matmul on one layer: our per-row CUDA kernel (``kernels/cuda/qmv.py``) against MLX's
``quantized_matmul`` on the same weights expanded to group 64, with the kernel's error against the exact
formula. Eight distinct layers are cycled so that the weights come from memory, not from the cache; many
calls go into one evaluation so that launch and synchronisation overheads are not timed per call."""

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

from mlx_qlora.device import on_cuda
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.kernels.cuda import qmv as qmv_cuda
from mlx_qlora.kernels.cuda import qmv_plan
from mlx_qlora.kernels.cuda.qmv_source import Variant
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


def _joined(y):
    return mx.concatenate(y, axis=-1) if isinstance(y, list) else y


def fused_rows(dtype, repeats: int) -> list[dict]:
    """Mistral-7B's q/k/v (one launch for three weights) and gate/up with SwiGLU, one input row: our fused
    kernels against MLX's quantized_matmul per projection (plus the activation)."""
    def layer(out_f, in_f):
        q = QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype)
        mx.eval(q.parameters())
        return q

    out = []
    for name, shapes, swiglu in (("q+k+v", [(4096, 4096), (1024, 4096), (1024, 4096)], False),
                                 ("silu(gate)*up", [(14336, 4096), (14336, 4096)], True)):
        groups = [[layer(*shape) for shape in shapes] for _ in range(4)]  # cycled, so weights come from memory
        for group in groups:
            for q in group:
                q.mlx_layout(dtype)
        x = mx.random.normal((1, shapes[0][1])).astype(dtype)

        def quantized_matmul(q, x):  # MLX's quantized_matmul on the layer's cached expanded layout
            scales, biases, group_size = q.mlx_layout(x.dtype)
            return mx.quantized_matmul(x, q.weight, scales, biases, transpose=True, group_size=group_size, bits=4)

        def mlx_path(group, x):
            ys = [quantized_matmul(q, x) for q in group]
            return nn.silu(ys[0]) * ys[1] if swiglu else ys

        def ours(group, x):
            if swiglu:
                return qmv_cuda.qmv_swiglu(x, *[q.parts for q in group])
            return qmv_cuda.qmv_split(x, [q.parts for q in group])  # three outputs, as MLX's three calls

        if swiglu:
            exact = qmv_cuda.reference_swiglu(x, *[q.parts for q in groups[0]])
        else:
            exact = mx.concatenate([qmv_cuda.reference(x, *q.parts) for q in groups[0]], axis=-1)
        mlx_out = mlx_path(groups[0], x)
        mlx_out = mlx_out if swiglu else mx.concatenate(mlx_out, axis=-1)
        row = {"shape": name, "rows": 1, "dtype": str(dtype).rpartition(".")[2], "per_warp": "fused",
               "mlx_qmm_max_err": mx.abs(mlx_out.astype(mx.float32) - exact).max().item(),
               "ours_max_err": mx.abs(_joined(ours(groups[0], x)).astype(mx.float32) - exact).max().item(),
               "max_abs_out": mx.abs(exact).max().item()}
        row["mlx_qmm_build_us"], row["mlx_qmm_us"] = timed_us(mlx_path, groups, x, repeats)
        row["ours_build_us"], row["ours_us"] = timed_us(ours, groups, x, repeats)
        nbytes = sum(q.weight.nbytes + q.scales.nbytes + q.biases.nbytes for q in groups[0])
        row["ours_GB_s"] = nbytes / row["ours_us"] / 1e3
        row["speedup"] = row["mlx_qmm_us"] / row["ours_us"]
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096,1024x4096", help="comma list of OUTxIN")
    p.add_argument("--rows", default="1,4")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rows-per-warp", default="0",
                   help="comma list of output rows per warp to try (0: the default; 16: the tensor-core body)")
    p.add_argument("--fused", action="store_true", help="also time the fused q/k/v and gate/up kernels")
    p.add_argument("--json")
    args = p.parse_args()
    dtype = compute_dtype()
    per_warp_choices = [int(v) for v in args.rows_per_warp.split(",")]
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

        for m in (int(v) for v in args.rows.split(",")):
            x = mx.random.normal((m, in_f)).astype(dtype)
            exact = qmv_cuda.reference(x, layers[0].weight, layers[0].scales, layers[0].biases)
            base = {"shape": shape, "rows": m, "dtype": str(dtype).rpartition(".")[2],
                    "mlx_qmm_max_err": mx.abs(mlx_qmm(layers[0], x).astype(mx.float32) - exact).max().item(),
                    "max_abs_out": mx.abs(exact).max().item()}
            base["mlx_qmm_build_us"], base["mlx_qmm_us"] = timed_us(mlx_qmm, layers, x, args.repeats)
            for per_warp in per_warp_choices:
                row = dict(base)
                mma_ok = (per_warp != qmv_plan.MMA_ROWS
                          or qmv_plan.takes_mma(m, in_f, (out_f,), Variant(1), dtype))
                if qmv_cuda.supports(x, in_f, 4, None) and (per_warp == 0 or out_f % per_warp == 0) and mma_ok:
                    def ours(layer, x, per_warp=per_warp):
                        x2 = x.reshape(-1, x.shape[-1])
                        return qmv_plan.launch(x2, [(layer.weight, layer.scales, layer.biases)], per_warp=per_warp)[0]

                    launch = qmv_plan.launch_args(m, in_f, (out_f,), Variant(1), dtype, per_warp)
                    row["per_warp"] = dict(launch["template"])["R"]  # 16: the tensor-core body
                    row["ours_build_us"], row["ours_us"] = timed_us(ours, layers, x, args.repeats)
                    row["ours_max_err"] = mx.abs(ours(layers[0], x).astype(mx.float32) - exact).max().item()
                    row["ours_GB_s"] = weight_bytes / row["ours_us"] / 1e3
                    row["speedup"] = row["mlx_qmm_us"] / row["ours_us"]
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    if args.fused and on_cuda():
        rows_out += fused_rows(dtype, args.repeats)
    print_table(rows_out, [("shape", "out x in", ""), ("rows", "rows", ""), ("per_warp", "rows/warp", ""), ("mlx_qmm_us", "MLX qmm us", "{:.1f}"),
                           ("ours_us", "ours us", "{:.1f}"), ("mlx_qmm_build_us", "MLX build us", "{:.1f}"),
                           ("ours_build_us", "ours build us", "{:.1f}"), ("ours_GB_s", "ours GB/s", "{:.0f}"),
                           ("speedup", "speed-up", "{:.2f}x"), ("ours_max_err", "ours max err", "{:.2g}"),
                           ("mlx_qmm_max_err", "MLX max err", "{:.2g}"), ("max_abs_out", "max |y|", "{:.3g}")])
    write_json(args.json, {"benchmark": "qmv", "environment": environment(), "rows": rows_out})


if __name__ == "__main__":
    main()
