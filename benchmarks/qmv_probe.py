#!/usr/bin/env python
"""Batch-1 ``mx.quantized_matmul`` time for one per-row 4-bit layer expanded to MLX group sizes 32/64/128."""

import json
import time

from common import compute_dtype

import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.quant.quantize import mlx_group_layout


def main():
    dtype = compute_dtype()
    for out_f, in_f in ((14336, 4096), (4096, 14336), (4096, 4096)):
        layer = QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype)
        x = mx.random.normal((1, in_f)).astype(dtype)
        for g in (32, 64, 128):
            scales, biases, _ = mlx_group_layout(layer.scales, layer.biases, in_f, None)
            reps = in_f // g
            scales = mx.contiguous(mx.repeat(layer.scales, reps, axis=1))
            biases = mx.contiguous(mx.repeat(layer.biases, reps, axis=1))
            mx.eval(scales, biases)
            f = lambda: mx.quantized_matmul(x, layer.weight, scales, biases, transpose=True, group_size=g, bits=4)
            for _ in range(10):
                mx.eval(f())
            n = 200
            start = time.perf_counter()
            for _ in range(n):
                y = f()
                mx.eval(y)
            us = (time.perf_counter() - start) / n * 1e6
            nbytes = layer.weight.nbytes + 2 * scales.nbytes
            print(json.dumps({"shape": [out_f, in_f], "group": g, "us": round(us, 1), "GB/s": round(nbytes / us / 1e3, 1)}))


if __name__ == "__main__":
    main()
