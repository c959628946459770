"""Qwen2 / Qwen2.5: biases on q, k and v (not o: transformers' ``Qwen2Attention`` always has them), a
sliding window on the layers from ``max_window_layers`` on when ``use_sliding_window`` is set, tied
embeddings on the small sizes."""

from __future__ import annotations

from typing import Any

from .base import Family, no_mlp_bias, qwen_window_config, qwen_windows, silu_only


def read(config: dict[str, Any]) -> dict[str, Any]:
    silu_only(config)
    no_mlp_bias(config)
    return {"qkv_bias": True, "rms_norm_eps": config.get("rms_norm_eps", 1e-6), **qwen_windows(config)}


def write(args) -> dict[str, Any]:
    return qwen_window_config(args)


FAMILY = Family(
    "qwen2", "Qwen2ForCausalLM", read, write, gguf_architecture="qwen2", gguf_permute_qk=False,
    gguf_names={f"blk.{{i}}.attn_{g}.bias": f"model.layers.{{i}}.self_attn.{h}_proj.bias" for g, h in
                  (("q", "q"), ("k", "k"), ("v", "v"))},
)
