#!/usr/bin/env python
"""QLoRA training speed and memory: ours against mlx-lm's LoRA trainer on the same shapes, side by side.

A Mistral-shaped model with random weights, 4-bit base (ours: per-row; mlx-lm: its group size 64),
LoRA rank 16 on all seven projections, bfloat16 compute on a GPU (float32 on the CPU), all tokens learned.
Every configuration runs in its own process so that peak memory is its own.

  python benchmarks/gpu_train.py --preset tiny                      # CPU smoke test
  python benchmarks/gpu_train.py --preset mistral-7b --json out.json # on a GPU
  python benchmarks/gpu_train.py --preset qwen3-8b --json out.json   # Qwen3-8B's shapes (qwen3-tiny on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from common import (CHECKPOINTING, OUR_VARIANTS, PRESETS, REAL_PRESETS, compute_dtype, environment,
                    matmul_peak_tflops, median, on_gpu, param_count, print_table, set_memory_limits, timed, worker_env, write_json)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_ours(cfg: dict, dtype, rank: int, grad_checkpoint: bool, quantize: bool = True):
    """Random model of the preset (Mistral, or Qwen3's q/k norms), per-row 4-bit projections (unless
    ``quantize`` is False); LoRA on all seven projections when ``rank`` > 0."""
    from mlx_qlora.config import LoRAConfig
    from mlx_qlora.model import MistralForCausalLM, ModelArgs
    from mlx_qlora.model.loading import PROJECTIONS
    from mlx_qlora.quant import QuantizedLinear
    from mlx_qlora.lora import apply_lora

    model = MistralForCausalLM(ModelArgs(**cfg))
    model.set_dtype(dtype)
    for layer in (model.model.layers if quantize else []):  # layer by layer: full precision never all exists
        swaps = []
        for name in PROJECTIONS:
            parent, leaf = name.split(".")
            swaps.append((name, QuantizedLinear.from_linear(getattr(layer, parent)[leaf], bits=4, dtype=dtype)))
        layer.update_modules(tree_unflatten(swaps))
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    if not rank:
        return model
    apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    model.model.grad_checkpoint = grad_checkpoint
    model.train()
    mx.eval(model.parameters())
    return model


def step_ours(model, batch: mx.array, chunk: int, world=None, grads_first: bool = True, wait_for_grads: bool = False,
              overlap: Optional[bool] = None, phases: Optional[list] = None):
    """One optimizer step on ``batch``; with a ``world`` of several ranks, gradients are summed across ranks.

    As the trainer does on a GPU, each call queues its step and then waits for the previous call's step
    (``overlap``, default: on a GPU; False: for its own), so the GPU does not wait while the host builds a step.
    ``grads_first=False`` evaluates the gradients and the update together; ``wait_for_grads`` waits for the
    gradients before building the update instead of only queueing them (``probes/step_probe.py`` compares).
    With a ``phases`` list, each step appends its host times in seconds: the gradient function's call,
    queueing its graph (``mx.async_eval``), building the update, queueing it, and the final wait for the GPU."""
    from mlx_qlora.train.distributed import all_sum_step
    from mlx_qlora.train.flat import FLAT, FlatLayout
    from mlx_qlora.train.optimizer import AdamW
    from mlx_qlora.train.params import TrainableSlots
    from mlx_qlora.train.step import make_grad_fn, make_update_fn

    grad = make_grad_fn(model, chunk=chunk, packed=False)
    optimizer = AdamW()
    slots = TrainableSlots(model)
    layout = FlatLayout(slots.get())
    update = make_update_fn(optimizer, max_grad_norm=1.0, layout=layout)
    flat = layout.concat(slots.get())
    state = {"flat": flat, "opt": optimizer.init({FLAT: flat}), "previous": None}
    overlap = on_gpu() if overlap is None else overlap
    lr = mx.array(1e-5)

    def run():
        t = [time.perf_counter()]
        loss_sum, n, grads = grad(batch, batch)
        t.append(time.perf_counter())
        # The gradients are queued in an evaluation of their own before the update is built, as the trainer
        # does (train/trainer.py): in one evaluation with the update, MLX holds more of the optimizer's arrays
        # at the backward pass's peak. Not waiting for them lets the host build the update meanwhile.
        if grads_first:
            (mx.eval if wait_for_grads else mx.async_eval)(loss_sum, n, grads)
        t.append(time.perf_counter())
        if world is not None and world.distributed:
            grads, loss_sum, n, _ = all_sum_step(world, grads, loss_sum, n, batch.size)
        state["flat"], params, state["opt"], _ = update(state["flat"], grads, state["opt"], lr, n)
        slots.set(params)
        t.append(time.perf_counter())
        mx.async_eval(loss_sum, state["flat"], params, state["opt"])
        t.append(time.perf_counter())
        wait_for = state["previous"] if overlap and state["previous"] is not None else loss_sum
        wait_for.item()
        state["previous"] = loss_sum
        t.append(time.perf_counter())
        if phases is not None:
            phases.append([b - a for a, b in zip(t, t[1:])])

    return run


def build_mlx_lm(cfg: dict, dtype, rank: int, grad_checkpoint: bool, lora: bool = True):
    """mlx-lm's model of the preset's family (its llama model serves Mistral; qwen3 its own), quantized by
    mlx-lm (group 64), with its LoRA layers."""
    from mlx_lm.models import llama, qwen3
    from mlx_lm.tuner.trainer import grad_checkpoint as mlx_lm_grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    family = {"qwen3": qwen3}.get(cfg["model_type"], llama)
    args = family.ModelArgs.from_dict({**cfg, "model_type": cfg["model_type"] if family is qwen3 else "llama"})
    model = family.Model(args)
    model.set_dtype(dtype)
    for layer in model.layers:
        nn.quantize(layer, group_size=64, bits=4)
        mx.eval(layer.parameters())
    nn.quantize(model, group_size=64, bits=4)  # embeddings and head too, as mlx-lm's converter does
    mx.eval(model.parameters())
    if not lora:
        return model
    model.freeze()
    keys = [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": keys})
    if grad_checkpoint:
        mlx_lm_grad_checkpoint(model.layers[0])
    model.train()
    mx.eval(model.parameters())
    return model


def step_mlx_lm(model, batch: mx.array, chunk: int):
    from functools import partial

    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    optimizer = optim.Adam(learning_rate=1e-5)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    lengths = mx.array([[0, batch.shape[1]]] * batch.shape[0])
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, toks), grads = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss, toks

    def run():
        loss, toks = step(batch, lengths)
        mx.eval(state, loss, toks)

    return run


def worker(args) -> dict:
    cfg = PRESETS[args.preset]
    dtype = compute_dtype()
    set_memory_limits(args.cache_limit_gb, args.memory_limit_gb)
    ours = args.stack in OUR_VARIANTS
    if ours:
        from mlx_qlora.train.run_ahead import bound_run_ahead

        bound_run_ahead(args.grad_checkpoint)  # what finetune.py does
    build, make_step = (build_ours, step_ours) if ours else (build_mlx_lm, step_mlx_lm)
    world = None
    if args.distributed:
        from mlx_qlora.train.distributed import init_world

        world = init_world()
        mx.random.seed(world.rank)  # each rank its own rows of the global batch
    start = time.perf_counter()
    model = build(cfg, dtype, args.rank, args.grad_checkpoint)
    build_s = time.perf_counter() - start
    batch = mx.random.randint(0, cfg["vocab_size"], (args.batch, args.seq + 1)).astype(mx.int32)
    mx.eval(batch)
    mx.reset_peak_memory()
    step = make_step(model, batch, args.loss_chunk, world) if world else make_step(model, batch, args.loss_chunk)
    times = timed(step, steps=args.steps, warmup=args.warmup)
    ranks = world.size if world else 1
    tokens = args.batch * args.seq * ranks  # every rank trains on its own batch: weak scaling
    step_s = median(times)
    if world is not None and world.rank != 0:
        return None
    return {"stack": args.stack, "ranks": ranks, "batch": args.batch, "seq": args.seq,
            "grad_checkpoint": args.grad_checkpoint, "memory_limit_gb": args.memory_limit_gb,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_gb": mx.get_peak_memory() / 1e9,
            "build_s": build_s, "steps": args.steps,
            "env": {k: os.environ.get(k) for k in OUR_VARIANTS.get(args.stack, {})}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--shapes", default=None, help="comma list of BxL (default: 4x512,1x2048; tiny: 4x128,1x256)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    p.add_argument("--stacks", default="ours,mlx-lm",
                   help="comma list of mlx-lm and ours or its variants: " + ", ".join(OUR_VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--cache-limit-gb", type=float, help="cap MLX's buffer cache in each worker")
    p.add_argument("--memory-limits", default="none",
                   help="comma list of MLX memory limits in GB to run each configuration under ('none': MLX's "
                        "default); a limit makes MLX wait for the GPU instead of running ahead of it")
    p.add_argument("--memory-limit-gb", type=float, help=argparse.SUPPRESS)
    p.add_argument("--worker", dest="stack", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpoint", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=0,
                   help="also run ours data-parallel on this many GPUs (mlx.launch, NCCL) and report the scaling")
    args = p.parse_args()
    if args.stack:
        result = worker(args)
        if result is not None:
            if args.result_file:
                Path(args.result_file).write_text(json.dumps(result))
            print(json.dumps(result), flush=True)
        return
    if args.ranks > 1:
        scaling(args)
        return

    cfg = PRESETS[args.preset]
    shapes = args.shapes or ("4x512,1x2048" if args.preset in REAL_PRESETS else "4x128,1x256")
    ckpts = CHECKPOINTING[args.checkpointing]
    peak = matmul_peak_tflops()
    n_params = param_count(cfg, with_embeddings=False)
    rows = []
    for shape in shapes.split(","):
        b, l = (int(x) for x in shape.lower().split("x"))
        for ckpt, limit, stack in itertools.product(ckpts, args.memory_limits.split(","), args.stacks.split(",")):
            cmd = [sys.executable, __file__, "--preset", args.preset, "--worker", stack, "--batch", str(b),
                   "--seq", str(l), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rank", str(args.rank), "--loss-chunk", str(args.loss_chunk)]
            if ckpt:
                cmd.append("--grad-checkpoint")
            if args.cache_limit_gb is not None:
                cmd += ["--cache-limit-gb", str(args.cache_limit_gb)]
            if limit != "none":
                cmd += ["--memory-limit-gb", limit]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(stack))
            if proc.returncode != 0:
                print(f"{stack} {shape} ckpt={ckpt} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                rows.append({"stack": stack, "batch": b, "seq": l, "grad_checkpoint": ckpt, "memory_limit_gb": limit, "error": proc.stderr[-500:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            flops_per_token = 4 * n_params + 6 * cfg["num_hidden_layers"] * l * cfg["hidden_size"]
            row["tflops"] = row["tokens_per_s"] * flops_per_token / 1e12
            row["mfu"] = row["tflops"] / peak
            rows.append(row)
            print(f"{stack:7s} {b}x{l} ckpt={ckpt!s:5s} {row['tokens_per_s']:9.0f} tok/s  "
                  f"{row['peak_gb']:6.2f} GB (limit {limit})  MFU {100 * row['mfu']:.1f}%", flush=True)
    for row in rows:  # ratio against the peer on the same shape and checkpointing
        peer = next((r for r in rows if r["stack"] == "mlx-lm" and r["batch"] == row["batch"]
                     and r["seq"] == row["seq"] and r["grad_checkpoint"] == row["grad_checkpoint"]
                     and r.get("memory_limit_gb") == row.get("memory_limit_gb")
                     and "tokens_per_s" in r), None)
        if peer and "tokens_per_s" in row:
            row["speed_vs_mlx_lm"] = row["tokens_per_s"] / peer["tokens_per_s"]
            row["memory_vs_mlx_lm"] = row["peak_gb"] / peer["peak_gb"]
    env = environment()
    print(f"\n{args.preset} on {env.get('device_name') or env['device']}, MLX {env['mlx']}; "
          f"measured matmul peak {peak:.3g} TFLOP/s; {n_params:,} matmul parameters")
    print_table(rows, [("stack", "stack", ""), ("batch", "batch", ""), ("seq", "seq", ""),
                       ("grad_checkpoint", "checkpointing", ""), ("memory_limit_gb", "memory limit GB", ""),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"),
                       ("peak_gb", "peak GB", "{:.2f}"), ("mfu", "MFU", "{:.1%}"),
                       ("speed_vs_mlx_lm", "speed vs mlx-lm", "{:.2f}x"),
                       ("memory_vs_mlx_lm", "memory vs mlx-lm", "{:.2f}x")])
    write_json(args.json, {"benchmark": "train", "preset": args.preset, "environment": env,
                           "matmul_peak_tflops": peak, "matmul_params": n_params, "rows": rows})


def scaling(args) -> None:
    """Tokens/s of ours on 1 GPU and on ``args.ranks`` GPUs (same per-GPU batch), and the efficiency."""
    import os
    import tempfile

    rows = []
    shapes = args.shapes or "4x512"
    for shape in shapes.split(","):
        b, l = (int(x) for x in shape.lower().split("x"))
        for ranks in (1, args.ranks):
            result_file = Path(tempfile.mkdtemp()) / "result.json"
            worker_cmd = [__file__, "--preset", args.preset, "--worker", "ours", "--batch", str(b), "--seq", str(l),
                          "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank),
                          "--loss-chunk", str(args.loss_chunk), "--result-file", str(result_file)]
            if ranks == 1:
                cmd = [sys.executable, *worker_cmd]
            else:
                backend = "nccl" if on_gpu() else "ring"  # ring: a CPU smoke test on one machine
                cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n",
                       str(ranks), "--backend", backend, "--", sys.executable, *worker_cmd, "--distributed"]
            env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}  # never NVLink multicast on shared hosts
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0 or not result_file.exists():
                print(f"{ranks} GPU(s) {shape} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(result_file.read_text())
            rows.append(row)
            print(f"ours {ranks} GPU(s) {shape}/GPU: {row['tokens_per_s']:,.0f} tok/s, {row['peak_gb']:.2f} GB per GPU",
                  flush=True)
    for row in rows:
        single = next((r for r in rows if r["ranks"] == 1 and r["batch"] == row["batch"] and r["seq"] == row["seq"]), None)
        if single:
            row["scaling_efficiency"] = row["tokens_per_s"] / (row["ranks"] * single["tokens_per_s"])
    env = environment()
    print(f"\n{args.preset} on {env.get('device_name') or env['device']}, MLX {env['mlx']}; data parallel, "
          f"same batch per GPU (weak scaling), gradients summed with NCCL")
    print_table(rows, [("ranks", "GPUs", ""), ("batch", "batch/GPU", ""), ("seq", "seq", ""),
                       ("tokens_per_s", "tokens/s (all GPUs)", "{:,.0f}"), ("peak_gb", "peak GB per GPU", "{:.2f}"),
                       ("scaling_efficiency", "scaling efficiency", "{:.0%}")])
    write_json(args.json, {"benchmark": "train-scaling", "preset": args.preset, "environment": env, "rows": rows})


if __name__ == "__main__":
    main()
