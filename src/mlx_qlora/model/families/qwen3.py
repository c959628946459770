"""Qwen3 (dense): RMSNorm over each query and key head before RoPE (``self_attn.q_norm``/``k_norm``),
``head_dim`` independent of hidden / heads (128 when the config omits it, as transformers), biases on
all four attention projections only with ``attention_bias``; windows as Qwen2."""

from __future__ import annotations

from typing import Any

from .base import Family, no_mlp_bias, qwen_window_config, qwen_windows, silu_only


def read(config: dict[str, Any]) -> dict[str, Any]:
    silu_only(config)
    no_mlp_bias(config)
    return {"qk_norm": True, "attention_bias": bool(config.get("attention_bias", False)),
            "head_dim": config.get("head_dim") or 128, "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
            **qwen_windows(config)}


def write(args) -> dict[str, Any]:
    return {"attention_bias": args.attention_bias, **qwen_window_config(args)}


FAMILY = Family(
    "qwen3", "Qwen3ForCausalLM", read, write, gguf_architecture="qwen3", gguf_permute_qk=False,
    gguf_names={"blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
                  "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight"},
)
