"""Phi-3 / Phi-3.5 / Phi-4-mini: q, k and v in one ``qkv_proj`` and gate and up in one ``gate_up_proj``
(LoRA adapts each fused layer as one, as PEFT does), a sliding window on every layer when the config has
one, ``longrope`` scaling (read with the common fields) and partial rotary embeddings (Phi-4-mini).
llama.cpp's ``phi3`` architecture holds the fused layers as ``attn_qkv`` and ``ffn_up``."""

from __future__ import annotations

from typing import Any

from .base import Family, no_mlp_bias, silu_only


def read(config: dict[str, Any]) -> dict[str, Any]:
    silu_only(config)
    no_mlp_bias(config)
    return {"fused_projections": True, "sliding_window": config.get("sliding_window")}


def write(args) -> dict[str, Any]:
    out: dict[str, Any] = {"sliding_window": args.sliding_window, "partial_rotary_factor": args.partial_rotary_factor}
    if args.rope_type == "longrope":
        out["original_max_position_embeddings"] = args.rope_original_max_position_embeddings
        out["rope_scaling"] = {
            "rope_type": "longrope", "short_factor": list(args.rope_short_factor),
            "long_factor": list(args.rope_long_factor), "attention_factor": args.rope_attention_factor,
            "original_max_position_embeddings": args.rope_original_max_position_embeddings,
        }
    return out


FAMILY = Family(
    "phi3", "Phi3ForCausalLM", read, write, lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    gguf_architecture="phi3", gguf_permute_qk=False, gguf_sliding_window=True,
    gguf_names={"blk.{i}.attn_qkv.weight": "model.layers.{i}.self_attn.qkv_proj.weight",
                  "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.gate_up_proj.weight"},
)
