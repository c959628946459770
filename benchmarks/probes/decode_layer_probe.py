#!/usr/bin/env python
"""GPU time of each kernel of one fused decoder layer (``model/fused_decode.py``) at Mistral-7B shapes,
and of variants of them, from PyTorch's profiler (CUPTI records MLX's kernels): which part of a kernel
costs what. Every case runs ``--calls`` times, cycling ``--copies`` sets of weights so that they come
from memory and not from L2; its time per call is the sum of its kernels' durations, and the gap is the
time between the kernels of a call (the attention's two passes).

  python benchmarks/probes/decode_layer_probe.py --json layer.json        # on a CUDA GPU (nothing recorded elsewhere)
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import PRESETS, compute_dtype, environment, print_table, write_json

import mlx.core as mx
import mlx.nn as nn

from mlx_qlora.device import on_cuda
from mlx_qlora.kernels.cuda import attention as attention_cuda
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.kernels.cuda import qmv as qmv_cuda
from mlx_qlora import settings
from mlx_qlora.kernels.cuda import qmv_plan
from mlx_qlora.kernels.cuda.qmv_source import Variant


def _linear(out_f: int, in_f: int, dtype) -> tuple:
    q = QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype)
    mx.eval(q.parameters())
    return q.parts


def cases(cfg: dict, dtype, copies: int, capacity: int, filled: int) -> dict:
    """name -> (function of the copy index, weight bytes per call)."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    H, HKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = hidden // H
    shapes = dict(q=(H * hd, hidden), k=(HKV * hd, hidden), v=(HKV * hd, hidden), o=(hidden, H * hd),
                  gate=(inter, hidden), up=(inter, hidden), down=(hidden, inter))  # (out, in)
    layers = [{name: _linear(*shape, dtype) for name, shape in shapes.items()} for _ in range(copies)]
    x = mx.random.normal((1, hidden)).astype(dtype)
    act = mx.random.normal((1, inter)).astype(dtype)
    gamma = (1 + 0.1 * mx.random.normal((hidden,))).astype(dtype)
    # The position as 4 int32 (the kernels read element 0): MLX's CUDA allocator serves arrays of at most 8
    # bytes from managed memory, and a 0-d position made on the host cost the kernels that read it about
    # 10 us per call here (not in decoding, where it comes from the GPU; benchmarks/RESULTS.md).
    pos = mx.full((4,), filled - 1, dtype=mx.int32)
    keys = mx.random.normal((1, HKV, capacity, hd)).astype(dtype)
    values = mx.random.normal((1, HKV, capacity, hd)).astype(dtype)
    q4 = mx.random.normal((1, H, 1, hd)).astype(dtype)
    mx.eval(x, act, gamma, pos, keys, values, q4)
    eps, base = cfg["rms_norm_eps"], cfg["rope_theta"]

    def nbytes(*names):
        return sum(a.nbytes for n in names for a in layers[0][n])

    def qkv(variant, extra, per_warp=0):
        shapes = ((1, H * hd),) if variant.cache else None  # k and v go to the cache

        def fn(i):
            w = [layers[i][n] for n in ("q", "k", "v")]
            return qmv_plan.launch(x, w, variant, per_warp=per_warp, shapes=shapes, extra=extra, head_dim=hd,
                                   capacity=capacity)
        return fn, nbytes("q", "k", "v")

    full = Variant(3, norm_eps=eps, rope=(True, True, False), rope_base=base, cache=True)
    out = {
        "qkv (norm, rope, cache)": qkv(full, [gamma, pos, keys, values]),
        "qkv (norm, rope, cache) mma": qkv(full, [gamma, pos, keys, values], qmv_plan.MMA_ROWS),
        "qkv (norm, rope)": qkv(Variant(3, norm_eps=eps, rope=(True, True, False), rope_base=base),
                                [gamma, pos]),
        "qkv (norm)": qkv(Variant(3, norm_eps=eps), [gamma], 2),
        "qkv (rope, cache)": qkv(Variant(3, rope=(True, True, False), rope_base=base, cache=True),
                                 [pos, keys, values]),
        "qkv plain": qkv(Variant(3), [], 2),
        "o + residual": (lambda i: qmv_cuda.matmul_residual(x, layers[i]["o"], x), nbytes("o")),
        "gate/up (norm)": (lambda i: qmv_cuda.swiglu_norm(x, gamma, eps, layers[i]["gate"], layers[i]["up"]),
                           nbytes("gate", "up")),
        "down + residual": (lambda i: qmv_cuda.matmul_residual(act, layers[i]["down"], x), nbytes("down")),
    }

    def attention(**knobs):  # the attention settings of this case (read at each call)
        def fn(i):
            with settings.override(**knobs):
                return attention_cuda.decode_attention(q4, keys, values, pos, hd**-0.5)
        return fn, 0

    s = settings.current()
    default = (f"attention, {s.attention_slots} slots per range, {s.attention_threads // 32} warps, "
               f"runs of {s.attention_unroll}")
    out[default] = attention()
    for slots in (16, 32, 128):
        out[f"attention, {slots} slots per range"] = attention(attention_slots=slots)
    for threads, unroll in ((256, 4), (128, 8), (128, 4), (64, 4)):
        name = f"attention, {threads // 32} warps, runs of {unroll} slots"
        out[name] = attention(attention_threads=threads, attention_unroll=unroll)
    return out


def timed(fn, copies: int, calls: int) -> tuple[float, float, int]:
    """(us of kernels per call, us of gaps per call, kernels per call). Each call is evaluated alone: calls
    in one evaluation are independent, and MLX's CUDA graphs would run them side by side."""
    mx.eval([fn(i % copies) for i in range(copies)])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            mx.eval(fn(i % copies))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return float("nan"), float("nan"), 0
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    per_call = len(kernels) // calls
    kernels.sort(key=lambda e: e.time_range.start)
    gaps = sum(kernels[j + 1].time_range.start - kernels[j].time_range.end
               for j in range(len(kernels) - 1) if (j + 1) % per_call)
    return busy / calls, gaps / calls, per_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="mistral-7b")
    p.add_argument("--copies", type=int, default=6, help="weight sets cycled (more than L2 holds)")
    p.add_argument("--calls", type=int, default=120)
    p.add_argument("--capacity", type=int, default=768, help="cache slots")
    p.add_argument("--filled", type=int, default=600, help="filled slots (the position + 1)")
    p.add_argument("--only", help="comma list of case-name prefixes")
    p.add_argument("--json")
    args = p.parse_args()
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the profiler traces CUDA once torch's context exists
    mx.random.seed(0)
    dtype = compute_dtype()
    rows = []
    if not on_cuda():
        print("the kernels need MLX's CUDA backend: nothing to time here")
        args.only = "-"
    for name, (fn, nbytes) in cases(PRESETS[args.preset], dtype, args.copies, args.capacity, args.filled).items():
        if args.only and not any(name.startswith(s) for s in args.only.split(",")):
            continue
        try:
            us, gap, n = timed(fn, args.copies, args.calls)
        except ValueError as e:  # a variant the shapes do not take
            print(f"{name}: {e}")
            continue
        row = {"case": name, "kernel_us": us, "gap_us": gap, "kernels": n,
               "GB_s": nbytes / us / 1e3 if nbytes and us == us else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows, [("case", "case", ""), ("kernel_us", "kernel us", "{:.2f}"), ("gap_us", "gap us", "{:.2f}"),
                       ("kernels", "kernels", ""), ("GB_s", "weights GB/s", "{:.0f}")])
    write_json(args.json, {"benchmark": "decode_layer_probe", "environment": environment(), "args": vars(args),
                           "rows": rows})


if __name__ == "__main__":
    main()
