"""Gemma 3, text only (``model_type: gemma3_text``): Gemma 2's features (``gemma2.py``) plus RMSNorm on each
head's queries and keys (``q_norm``/``k_norm``, the ``1 + weight`` kind), global layers every
``sliding_window_pattern`` layers (``layer_types``), and a RoPE base of its own for the sliding layers
(``rope_local_base_freq``, never scaled; the global layers' RoPE may be linearly scaled). No soft-capping
unless the config asks for it. Reference: transformers' ``modeling_gemma3.py`` (``Gemma3ForCausalLM``).
"""

from __future__ import annotations

from typing import Any

from ...config import number
from .base import Family
from .gemma2 import GGUF_NAMES as GEMMA2_GGUF_NAMES
from .gemma2 import check_llama_cpp, common_gguf_config, common_gguf_metadata, read_common, write_common
from .multimodal import Multimodal

DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6, bos_token_id=2,
    eos_token_id=1, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=None, attn_logit_softcapping=None, sliding_window_pattern=6,
)
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' defaults


def _read_ropes(config: dict[str, Any]) -> dict[str, Any]:
    """The global layers' RoPE fields and ``rope_local_base_freq``, from transformers 5's per-layer-type
    ``rope_parameters`` or from ``rope_theta``/``rope_scaling``/``rope_local_base_freq`` (transformers 4)."""
    from ..args import _read_rope  # args imports this package

    params = config.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = params.get("sliding_attention") or {}
        full.setdefault("rope_theta", GLOBAL_THETA)
        full.setdefault("rope_type", "default")
        try:
            out = _read_rope({"rope_parameters": full})
        except ValueError as e:
            raise ValueError(str(e).replace("rope_parameters.", "rope_parameters.full_attention.", 1)) from None
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.sliding_attention.rope_type: {local['rope_type']!r} is not "
                             "supported (supported: default)")
        local_theta = local.get("rope_theta", LOCAL_THETA)
        key = "rope_parameters.sliding_attention.rope_theta"
    else:
        flat = dict(config)
        if not (isinstance(params, dict) and "rope_theta" in params):
            flat.setdefault("rope_theta", GLOBAL_THETA)
        out = _read_rope(flat)
        local_theta = config.get("rope_local_base_freq", LOCAL_THETA)
        key = "rope_local_base_freq"
    out["rope_local_base_freq"] = number(key, local_theta, above=0)
    return out


def read(config: dict[str, Any]) -> dict[str, Any]:
    """``ModelArgs`` fields of a Gemma 3 text ``config.json`` (bad values raise ValueError naming the key)."""
    values = read_common(config, DEFAULTS)
    values.update(_read_ropes(config))
    values["qk_norm"] = True
    # transformers' Gemma 3 attention never applies attn_logit_softcapping (the published configs set it to
    # null): neither do we, so that a config that sets it still gives the reference's logits
    values["attn_logit_softcapping"] = None
    return values


def write(args) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a Gemma 3 text ``ModelArgs`` (transformers 4's RoPE keys, which
    transformers 5 reads too)."""
    config = write_common(args, "Gemma3ForCausalLM")
    config["rope_local_base_freq"] = args.rope_local_base_freq
    return config


GGUF_NAMES = {
    **GEMMA2_GGUF_NAMES,
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}


def gguf_metadata(args) -> dict[str, Any]:
    """``gemma3.*`` metadata, as llama.cpp's converter writes it (ValueError: llama.cpp would differ: it
    fixes the local layers' RoPE base at 10000 and applies no final soft-capping)."""
    check_llama_cpp(args, pattern=6, largest_layers=62)
    if args.rope_local_base_freq != LOCAL_THETA:
        raise ValueError(f"rope_local_base_freq: llama.cpp's gemma3 uses {LOCAL_THETA:g} for the local layers")
    if args.final_logit_softcapping is not None:
        raise ValueError("final_logit_softcapping: llama.cpp's gemma3 does not soft-cap the logits")
    meta = common_gguf_metadata(args, "gemma3")
    if args.rope_type == "linear":
        meta["gemma3.rope.scaling.type"] = "linear"
        meta["gemma3.rope.scaling.factor"] = float(args.rope_scaling_factor)
    return meta


def gguf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face config of a ``gemma3`` GGUF (llama.cpp's local RoPE base, linear scaling if any)."""
    config = common_gguf_config(meta, "gemma3", "gemma3_text", "Gemma3ForCausalLM", 6, 62,
                                {**DEFAULTS, "rope_theta": GLOBAL_THETA})
    config["rope_local_base_freq"] = LOCAL_THETA
    scaling = meta.get("gemma3.rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["gemma3.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise ValueError(f"gemma3.rope.scaling.type: {scaling!r} is not supported (supported: linear)")
    return config


FAMILY = Family(
    "gemma3_text", "Gemma3ForCausalLM", read, write, gguf_architecture="gemma3", gguf_names=GGUF_NAMES,
    gguf_permute_qk=False, gguf_sliding_window=True, gguf_metadata=gguf_metadata, gguf_norm_shift=1.0,
    gguf_config=gguf_config,
)

# The multimodal release (4B, 12B, 27B: ``model_type: gemma3``, ``Gemma3ForConditionalGeneration``), read as its
# language model. Checkpoint prefixes: transformers 4.50-4.x and the published files (``language_model.model.``;
# transformers 5.23's save_pretrained still writes these) and transformers 5's modules (``model.language_model.``).
MULTIMODAL_NAMES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
    "lm_head.": "lm_head.",
    "vision_tower.": None,
    "multi_modal_projector.": None,
    "model.vision_tower.": None,
    "model.multi_modal_projector.": None,
}
MULTIMODAL = Multimodal(
    "gemma3", "Gemma3ForConditionalGeneration", "gemma3_text", MULTIMODAL_NAMES,
    top_level=("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"),
)
