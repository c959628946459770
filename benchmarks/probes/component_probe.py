#!/usr/bin/env python
"""Peak memory of the backward pass of each part of one Mistral-7B layer at 1 x 2048 tokens (bf16)."""

import json

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py and gpu_train.py are in benchmarks/

from common import PRESETS

import mlx.core as mx

from gpu_train import build_ours


def probe(name, fn, *args):
    mx.eval(*args)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = mx.grad(lambda *a: fn(*a).astype(mx.float32).sum())(*args)
    mx.eval(out)
    print(json.dumps({"part": name, "extra_peak_gb": (mx.get_peak_memory() - base) / 1e9}), flush=True)


def main():
    cfg = {**PRESETS["mistral-7b"], "num_hidden_layers": 1}
    model = build_ours(cfg, mx.bfloat16, 16, False)
    layer = model.model.layers[0]
    x = mx.random.normal((1, 2048, 4096)).astype(mx.bfloat16)
    probe("mlp", lambda h: layer.mlp(h), x)
    probe("attention", lambda h: layer.self_attn(h, lambda kp: "causal"), x)
    probe("q_proj", lambda h: layer.self_attn.q_proj(h), x)
    q = mx.random.normal((1, 32, 2048, 128)).astype(mx.bfloat16)
    k = mx.random.normal((1, 8, 2048, 128)).astype(mx.bfloat16)
    probe("sdpa", lambda q: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.088, mask="causal"), q)
    probe("rope", lambda q: mx.fast.rope(q, 128, traditional=False, base=10000.0, scale=1.0, offset=0), q)
    probe("rms_norm", lambda h: layer.input_layernorm(h), x)
    from mlx_qlora.train.loss import loss_sums
    h = mx.random.normal((1, 2048, 4096)).astype(mx.bfloat16)
    labels = mx.random.randint(0, 32000, (1, 2048))
    for chunk in (256, 1024):
        probe(f"loss chunk {chunk}", lambda h: loss_sums(h, model.logits_from_hidden, labels, chunk=chunk)[0], h)


if __name__ == "__main__":
    main()
