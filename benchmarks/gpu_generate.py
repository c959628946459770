#!/usr/bin/env python
"""Batch-1 decoding and prompt speed: ours against mlx-lm's generate_step on the same random model shapes.

Also reports the memory-bandwidth limit of decoding: measured copy bandwidth / bytes of weights read
per token (every parameter except the embedding table, of which one row is read).

With ``--adapters RANK``, every stack decodes with random LoRA adapters (non-zero, on all seven
projections) attached as ``generate.py --adapter`` / ``mlx_lm generate --adapter-path`` attach them: ours
in the compute dtype (on the fused decoder-layer path, ``ours``, or layer by layer, ``ours-unfused``),
mlx-lm's in float32 as its adapter files hold them. Each row says whether our fused decoder layer takes
the model (``fused_layer``).

  python benchmarks/gpu_generate.py --preset tiny
  python benchmarks/gpu_generate.py --preset mistral-7b --json out.json
  python benchmarks/gpu_generate.py --preset qwen3-8b --json out.json   # Qwen3-8B's shapes (qwen3-tiny on a CPU)
  python benchmarks/gpu_generate.py --preset mistral-7b --adapters 16 --stacks ours,ours-unfused,mlx-lm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import (OUR_VARIANTS, PRESETS, compute_dtype, copy_bandwidth_gbs, environment, median, print_table,
                    worker_env, write_json)

import mlx.core as mx
from mlx.utils import tree_flatten


def weight_bytes(model) -> int:
    total = 0
    for name, value in tree_flatten(model.parameters()):
        if "embed_tokens" in name and "lm_head" not in name:
            continue  # one row per token
        total += value.nbytes
    return total


def random_adapters(model, names: tuple[str, str], dtype) -> int:
    """Give every LoRA layer's two matrices (attributes ``names``) random non-zero values in ``dtype``, of
    the size trained adapters have; returns the number of LoRA layers."""
    count = 0
    for _, module in model.named_modules():
        if hasattr(module, names[0]) and hasattr(module, names[1]):
            a, b = getattr(module, names[0]), getattr(module, names[1])
            setattr(module, names[0], (a.shape[-1] ** -0.5 * mx.random.normal(a.shape)).astype(dtype))
            setattr(module, names[1], (0.02 * mx.random.normal(b.shape)).astype(dtype))
            count += 1
    mx.eval(model.parameters())
    return count


def takes_fused_layer(model, dtype) -> bool:
    """Whether our fused decoder layer (``model/fused_decode.py``) runs the first layer's decoding steps."""
    from mlx_qlora.model import fused_decode
    from mlx_qlora.model.static_cache import StaticKVCache

    layer = model.model.layers[0]
    a = layer.self_attn
    buffers = [mx.zeros((1, a.n_kv_heads, 256, a.head_dim), dtype=dtype) for _ in range(2)]
    x = mx.zeros((1, 1, layer.input_layernorm.weight.shape[0]), dtype=dtype)
    return bool(fused_decode.applies(layer, x, StaticKVCache(*buffers, mx.array(0))))


def run_ours(cfg, prompt: mx.array, max_tokens: int, compiled: bool = True, adapter_rank: int = 0):
    """Our ``generate`` (greedy, no EOS): prompt time, then ``max_tokens`` decoding steps."""
    from gpu_train import build_ours
    from mlx_qlora.generate.generator import generate as generate_tokens

    dtype = compute_dtype()
    model = build_ours(cfg, dtype, rank=adapter_rank, grad_checkpoint=False)
    adapted = random_adapters(model, ("lora_A", "lora_B"), dtype)  # as attached: in the compute dtype
    model.eval()
    nbytes = weight_bytes(model)
    fused = takes_fused_layer(model, dtype)
    ids = prompt.tolist()

    def generate():
        # max_tokens + 1 tokens: the first comes from the prompt, each later one from one decoding step
        stats = generate_tokens(model, None, ids, max_tokens=max_tokens + 1, eos_ids=set(), compiled=compiled).stats
        return stats.prompt_seconds, stats.generation_seconds

    return generate, nbytes, fused, adapted


def run_mlx_lm(cfg, prompt: mx.array, max_tokens: int, adapter_rank: int = 0):
    from gpu_train import build_mlx_lm
    from mlx_lm.generate import generate_step

    model = build_mlx_lm(cfg, compute_dtype(), rank=adapter_rank, grad_checkpoint=False, lora=adapter_rank > 0)
    adapted = random_adapters(model, ("lora_a", "lora_b"), mx.float32)  # as mlx-lm's adapter files hold them
    model.eval()
    nbytes = weight_bytes(model)

    def generate():
        start = time.perf_counter()
        steps = generate_step(prompt, model, max_tokens=max_tokens + 1)
        next(steps)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in steps:
            pass
        return prompt_s, time.perf_counter() - start

    return generate, nbytes, False, adapted


def worker(args) -> dict:
    cfg = PRESETS[args.preset]
    mx.random.seed(0)
    prompt = mx.random.randint(0, cfg["vocab_size"], (args.prompt_tokens,)).astype(mx.int32)
    if args.stack == "mlx-lm":
        generate, nbytes, fused, adapted = run_mlx_lm(cfg, prompt, args.max_tokens, args.adapters)
    else:
        generate, nbytes, fused, adapted = run_ours(cfg, prompt, args.max_tokens, compiled=args.stack != "ours-eager",
                                           adapter_rank=args.adapters)
    mx.reset_peak_memory()  # count generation, not building the random model
    generate()  # warm-up
    runs = [generate() for _ in range(args.repeats)]
    prompt_s = median([r[0] for r in runs])
    decode_s = median([r[1] for r in runs])
    return {"stack": args.stack, "prompt_tokens_per_s": args.prompt_tokens / prompt_s,
            "decode_tokens_per_s": args.max_tokens / decode_s, "weight_bytes_per_token": nbytes,
            "peak_gb": mx.get_peak_memory() / 1e9, "adapter_rank": args.adapters, "lora_layers": adapted,
            "fused_layer": fused}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--stacks", default="ours,mlx-lm",
                   help="comma-separated: mlx-lm, ours-eager (graph built per token), ours (compiled decoding "
                        "step) or its variants: " + ", ".join(OUR_VARIANTS))
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adapters", type=int, default=0, metavar="RANK",
                   help="decode with random LoRA adapters of this rank on all seven projections (0: none)")
    p.add_argument("--json")
    p.add_argument("--worker", dest="stack", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stack:
        print(json.dumps(worker(args)), flush=True)
        return
    bandwidth = copy_bandwidth_gbs()
    rows = []
    for stack in args.stacks.split(","):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--worker", stack, "--prompt-tokens",
               str(args.prompt_tokens), "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
               "--adapters", str(args.adapters)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(stack))
        if proc.returncode != 0:
            print(f"{stack} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            rows.append({"stack": stack, "error": proc.stderr[-500:]})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["bandwidth_limit_tokens_per_s"] = bandwidth * 1e9 / row["weight_bytes_per_token"]
        row["share_of_limit"] = row["decode_tokens_per_s"] / row["bandwidth_limit_tokens_per_s"]
        rows.append(row)
    peer = next((r for r in rows if r["stack"] == "mlx-lm" and "decode_tokens_per_s" in r), None)
    for row in rows:
        if peer and "decode_tokens_per_s" in row:
            row["decode_vs_mlx_lm"] = row["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
            row["prompt_vs_mlx_lm"] = row["prompt_tokens_per_s"] / peer["prompt_tokens_per_s"]
    env = environment()
    print(f"\n{args.preset} on {env.get('device_name') or env['device']}, MLX {env['mlx']}; batch 1, "
          f"{args.prompt_tokens}-token prompt, {args.max_tokens} tokens greedy; copy bandwidth {bandwidth:.0f} GB/s"
          + (f"; LoRA rank {args.adapters} on all seven projections" if args.adapters else ""))
    print_table(rows, [("stack", "stack", ""), ("prompt_tokens_per_s", "prompt tok/s", "{:,.0f}"),
                       ("decode_tokens_per_s", "decode tok/s", "{:,.1f}"),
                       ("weight_bytes_per_token", "weight bytes/token", "{:,}"),
                       ("bandwidth_limit_tokens_per_s", "limit tok/s", "{:,.0f}"),
                       ("share_of_limit", "of limit", "{:.0%}"), ("decode_vs_mlx_lm", "decode vs mlx-lm", "{:.2f}x"),
                       ("prompt_vs_mlx_lm", "prompt vs mlx-lm", "{:.2f}x"), ("peak_gb", "peak GB", "{:.2f}"),
                       ("fused_layer", "fused layer", "{}")])
    write_json(args.json, {"benchmark": "generate", "preset": args.preset, "environment": env,
                           "adapter_rank": args.adapters,
                           "copy_bandwidth_gbs": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
