"""Llama 1-3.x: Mistral's layer without a sliding window (Llama 3.1+'s RoPE scaling is read with the
common fields, ``args._read_rope``)."""

from __future__ import annotations

from typing import Any

from .base import Family, no_mlp_bias, silu_only


def read(config: dict[str, Any]) -> dict[str, Any]:
    silu_only(config)
    no_mlp_bias(config)
    if config.get("attention_bias"):
        raise ValueError("attention_bias: biases in linear layers are not supported")
    if config.get("sliding_window") is not None:
        raise ValueError("sliding_window: model_type 'llama' has no sliding window; use 'mistral'")
    return {"sliding_window": None}


def write(args) -> dict[str, Any]:
    return {}


FAMILY = Family("llama", "LlamaForCausalLM", read, write, gguf_architecture="llama")
