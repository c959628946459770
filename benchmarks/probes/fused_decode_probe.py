#!/usr/bin/env python
"""Compiled batch-1 decoding of a Mistral-shaped model two ways in one process: layer by layer in MLX's
operations (fused q/k/v and SwiGLU launches only; MLX's attention with the mask), and each decoder layer in
six launches (``model/fused_decode.py``, ``settings.fused_decode``). Reports ms per token, the
host's share (time inside ``mx.async_eval``) and each path's largest logit difference from the first path
over the same tokens. ``--adapters RANK``: both paths with random LoRA adapters attached on all seven
projections (in the compute dtype, as ``generate.py --adapter`` attaches them), which the six launches add
inside their kernels (``MLX_QLORA_LORA_SCRATCH=0``: with an A-products launch beside each). ``--images
cubin,size``: each path with the kernels launched as cubins and as compressed fatbins
(``MLX_QLORA_KERNEL_IMAGE``), alternated in one process (the logits must not differ).

  python benchmarks/probes/fused_decode_probe.py --preset mistral-7b --layers 32     # on a CUDA GPU
  python benchmarks/probes/fused_decode_probe.py --preset mistral-7b --adapters 16
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import PRESETS, compute_dtype, environment, print_table, write_json

import mlx.core as mx

from gpu_generate import random_adapters, takes_fused_layer
from gpu_train import build_ours
from mlx_qlora import settings
from mlx_qlora.device import on_cuda
from mlx_qlora.generate.decode_step import CompiledDecoder, DecodeState

# name -> fused decoder layers (``settings.fused_decode``)
PATHS = {"mlx attention": False, "six launches": True}


def decode(model, prompt: mx.array, tokens: list[int]) -> tuple[mx.array, float, float]:
    """Feed ``tokens`` after ``prompt``; return the logits of every step, ms per token, host ms per token."""
    cache = model.make_cache()
    mx.eval(model(prompt[None], cache=cache))
    state = DecodeState.from_caches(cache, prompt.size + len(tokens))
    mx.eval(state.arrays)
    decoder = CompiledDecoder(model)
    mx.eval(decoder.step(state, mx.array([[tokens[0]]])))  # trace
    state = DecodeState.from_caches(cache, prompt.size + len(tokens))
    outs, host = [], 0.0
    start = time.perf_counter()
    for t in tokens:
        logits = decoder.step(state, mx.array([[t]]))
        a = time.perf_counter()
        mx.async_eval(logits)
        host += time.perf_counter() - a
        outs.append(logits)
    mx.eval(outs)
    total = time.perf_counter() - start
    return mx.concatenate(outs).astype(mx.float32), total / len(tokens) * 1e3, host / len(tokens) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--paths", help="comma list of the paths to run (default: all): " + ", ".join(PATHS))
    p.add_argument("--adapters", type=int, default=0, metavar="RANK",
                   help="random LoRA adapters of this rank on all seven projections (0: none)")
    p.add_argument("--images", help="comma-separated MLX_QLORA_KERNEL_IMAGE values to run each path with "
                   "(cubin, size, default; default: the setting's), alternated in this process")
    p.add_argument("--json")
    args = p.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    mx.random.seed(0)
    model = build_ours(cfg, compute_dtype(), rank=args.adapters, grad_checkpoint=False)
    if args.adapters:
        random_adapters(model, ("lora_A", "lora_B"), compute_dtype())
    model.eval()
    prompt = mx.random.randint(0, cfg["vocab_size"], (args.prompt_tokens,)).astype(mx.int32)
    tokens = mx.random.randint(0, cfg["vocab_size"], (args.steps,)).tolist()
    chosen = args.paths.split(",") if args.paths else list(PATHS)
    unknown = [n for n in chosen if n not in PATHS]
    if unknown:
        p.error(f"unknown paths {unknown}; choose from {list(PATHS)}")
    images = args.images.split(",") if args.images else [settings.current().kernel_image]
    rows, base = [], None
    for name in chosen:
        fused = PATHS[name]
        if fused and not on_cuda():
            continue  # the kernels need CUDA
        for image in images:
            with settings.override(fused_decode=fused, kernel_image=image):
                logits, ms, host_ms = decode(model, prompt, tokens)
                taken = takes_fused_layer(model, compute_dtype())
            base = logits if base is None else base
            row = {"path": name, "image": image, "adapter_rank": args.adapters, "fused_layer": taken,
                   "ms_per_token": ms, "host_ms_per_token": host_ms, "tokens_per_s": 1e3 / ms,
                   "max_logit_diff": mx.abs(logits - base).max().item(), "max_abs_logit": mx.abs(base).max().item()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, [("path", "path", ""), ("image", "image", ""), ("ms_per_token", "ms/token", "{:.2f}"),
                       ("host_ms_per_token", "host ms/token", "{:.2f}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
                       ("max_logit_diff", "max logit diff", "{:.3g}"), ("max_abs_logit", "max |logit|", "{:.3g}"),
                       ("fused_layer", "fused layer", "{}")])
    write_json(args.json, {"benchmark": "fused_decode", "preset": args.preset, "layers": cfg["num_hidden_layers"],
                           "adapter_rank": args.adapters,
                           "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
