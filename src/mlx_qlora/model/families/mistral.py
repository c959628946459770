"""Mistral: a sliding window on every layer (``sliding_window``, none when it is null)."""

from __future__ import annotations

from typing import Any

from .base import Family, no_mlp_bias, silu_only


def read(config: dict[str, Any]) -> dict[str, Any]:
    silu_only(config)
    no_mlp_bias(config)
    if config.get("attention_bias"):
        raise ValueError("attention_bias: biases in linear layers are not supported")
    window = None if config.get("use_sliding_window") is False else config.get("sliding_window")
    return {"sliding_window": window}


def write(args) -> dict[str, Any]:
    return {"sliding_window": args.sliding_window}


FAMILY = Family("mistral", "MistralForCausalLM", read, write, gguf_architecture="llama")
