"""Gemma 2 (``model_type: gemma2``): the config fields that switch the shared decoder's Gemma features.

Against Mistral, a Gemma 2 layer has RMSNorms that scale by ``1 + weight``, a GeGLU MLP
(``gelu_pytorch_tanh``), embeddings multiplied by sqrt(hidden_size), an attention scale of
``query_pre_attn_scalar ** -0.5``, soft-capped attention scores and final logits (``cap * tanh(x / cap)``),
sliding-window and global layers alternating (``layer_types``), and four norms per layer (the attention's
and the MLP's outputs are normed before the residual sum). Reference: transformers' ``modeling_gemma2.py``.
"""

from __future__ import annotations

from typing import Any

from ...config import number
from .base import Family, gguf_shape_metadata

GELU_TANH = "gelu_pytorch_tanh"
# Shape keys read as they are; transformers' defaults for Gemma 2 where the config omits them.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")


def first_id(value):
    """A token id, or the first of a list of them (Gemma's configs list several end-of-turn ids)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def read_common(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The ``ModelArgs`` fields that Gemma 2 and Gemma 3 read alike; ``defaults``: transformers' config
    defaults of the family for keys the file leaves out."""
    get = lambda key: config.get(key, defaults.get(key))  # noqa: E731
    activation = config.get("hidden_activation") or config.get("hidden_act") or GELU_TANH
    if activation != GELU_TANH:
        raise ValueError(f"hidden_activation: only {GELU_TANH!r} is supported for Gemma, got {activation!r}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{key}: biases in linear layers are not supported")
    if config.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention: only causal (decoder) Gemma models are supported")
    values = {key: get(key) for key in SHAPE_KEYS if get(key) is not None}
    n_layers = values.get("num_hidden_layers", 1)
    layer_types = config.get("layer_types")
    if layer_types is None:
        pattern = int(config.get("sliding_window_pattern", defaults["sliding_window_pattern"]))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    values.update(
        model_type=config["model_type"],
        hidden_act=GELU_TANH,
        rms_norm_eps=number("rms_norm_eps", get("rms_norm_eps"), above=0),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        bos_token_id=first_id(get("bos_token_id")),
        eos_token_id=first_id(get("eos_token_id")),
        query_pre_attn_scalar=number("query_pre_attn_scalar", get("query_pre_attn_scalar"), above=0),
        sliding_window=get("sliding_window"),
        layer_types=list(layer_types),
        attn_logit_softcapping=_cap("attn_logit_softcapping", get("attn_logit_softcapping")),
        final_logit_softcapping=_cap("final_logit_softcapping", get("final_logit_softcapping")),
        norm_weight_offset=1.0,
        scale_embeddings=True,
        sandwich_norms=True,
    )
    return values


def _cap(key: str, value):
    return None if value is None else number(key, value, above=0)


DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, bos_token_id=2,
    eos_token_id=1, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window_pattern=2,
)


def read(config: dict[str, Any]) -> dict[str, Any]:
    """``ModelArgs`` fields of a Gemma 2 ``config.json`` (bad values raise ValueError naming the key)."""
    from ..args import _read_rope  # args imports this package

    values = read_common(config, DEFAULTS)
    values.update(_read_rope(config))
    return values


def rope_scaling(args) -> dict[str, Any]:
    """The ``rope_scaling`` object of ``args``' RoPE (empty for plain RoPE)."""
    if args.rope_type == "llama3":
        return {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                "original_max_position_embeddings": args.rope_original_max_position_embeddings}
    if args.rope_scaling_factor != 1.0:
        return {"rope_type": "linear", "factor": args.rope_scaling_factor}
    return {}


def write_common(args, architecture: str) -> dict[str, Any]:
    """The Hugging Face config fields that Gemma 2 and Gemma 3 write alike."""
    config = {
        "architectures": [architecture],
        "model_type": args.model_type,
        **{key: getattr(args, key) for key in SHAPE_KEYS},
        "hidden_activation": GELU_TANH,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "query_pre_attn_scalar": args.query_pre_attn_scalar,
        "sliding_window": args.sliding_window,
        "layer_types": list(args.layer_types),
        "attn_logit_softcapping": args.attn_logit_softcapping,
        "final_logit_softcapping": args.final_logit_softcapping,
        "attention_bias": False,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
    }
    scaling = rope_scaling(args)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def write(args) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a Gemma 2 ``ModelArgs``."""
    return write_common(args, "Gemma2ForCausalLM")


# llama.cpp's names of the Gemma 2 tensors that differ from Llama's (``gguf/mapping.py``'s table): the
# sandwich norms; no lm_head (llama.cpp's Gemma always ties it)
GGUF_NAMES = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}


def check_llama_cpp(args, pattern: int, largest_layers: int) -> None:
    """ValueError naming the key when llama.cpp would compute ``args`` differently from transformers.

    llama.cpp's Gemma graphs fix what the GGUF cannot say: tied embeddings, a global layer every ``pattern``
    layers, and the attention scale (head_dim's, or hidden_size / heads' for the largest model, which it
    recognises by its ``largest_layers`` layers), so a model that differs there is refused."""
    expected = [("sliding_attention" if (i + 1) % pattern else "full_attention") for i in range(args.num_hidden_layers)]
    if list(args.layer_types) != expected:
        raise ValueError(f"layer_types: llama.cpp's {args.model_type.split('_')[0]} has a global layer every "
                         f"{pattern} layers")
    if not args.tie_word_embeddings:
        raise ValueError("tie_word_embeddings: llama.cpp's Gemma reads the head from the embeddings")
    if args.sliding_window is None:
        raise ValueError("sliding_window: llama.cpp's Gemma needs the local layers' window")
    scalar = (args.hidden_size // args.num_attention_heads if args.num_hidden_layers == largest_layers
              else args.head_dim)
    if args.query_pre_attn_scalar != scalar:
        raise ValueError(f"query_pre_attn_scalar: llama.cpp scales attention by {scalar} ** -0.5 for this shape, "
                         f"the model by {args.query_pre_attn_scalar} ** -0.5")
    if args.rope_type != "default" and not (args.rope_type == "linear" and args.model_type == "gemma3_text"):
        raise ValueError(f"rope_type: {args.rope_type!r} is not written to a {args.model_type} GGUF")


def common_gguf_metadata(args, arch: str) -> dict[str, Any]:
    """The ``<arch>.*`` shape keys of a Gemma GGUF."""
    return {
        **gguf_shape_metadata(args, arch),
        f"{arch}.attention.key_length": args.head_dim,
        f"{arch}.attention.value_length": args.head_dim,
        f"{arch}.attention.sliding_window": args.sliding_window,
    }


def gguf_metadata(args) -> dict[str, Any]:
    """``gemma2.*`` metadata, as llama.cpp's converter writes it (ValueError: llama.cpp would differ)."""
    check_llama_cpp(args, pattern=2, largest_layers=46)
    if args.attn_logit_softcapping is None or args.final_logit_softcapping is None:
        raise ValueError("attn_logit_softcapping: llama.cpp's gemma2 always soft-caps scores and logits")
    return {**common_gguf_metadata(args, "gemma2"),
            "gemma2.attn_logit_softcapping": float(args.attn_logit_softcapping),
            "gemma2.final_logit_softcapping": float(args.final_logit_softcapping)}


def common_gguf_config(meta: dict[str, Any], arch: str, model_type: str, architecture: str, pattern: int,
                       largest_layers: int, defaults: dict[str, Any]) -> dict[str, Any]:
    """A Gemma's Hugging Face config from its GGUF metadata, with what llama.cpp fixes for the family (the
    layer pattern, the attention scale, tied embeddings) written out; KeyError names a missing key."""

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"{arch}.{key}")
        return value

    n_layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", defaults["head_dim"]))
    return {
        "architectures": [architecture], "model_type": model_type,
        "hidden_size": hidden, "num_hidden_layers": n_layers, "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim, "max_position_embeddings": int(get("context_length", defaults["max_position_embeddings"])),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", defaults["rms_norm_eps"])),
        "rope_theta": float(get("rope.freq_base", defaults.get("rope_theta", 10000.0))),
        "sliding_window": int(get("attention.sliding_window", defaults["sliding_window"])),
        "query_pre_attn_scalar": hidden // heads if n_layers == largest_layers else head_dim,
        "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)],
        "hidden_activation": GELU_TANH, "tie_word_embeddings": True,
    }


def gguf_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face config of a ``gemma2`` GGUF (llama.cpp's defaults for absent soft-caps)."""
    config = common_gguf_config(meta, "gemma2", "gemma2", "Gemma2ForCausalLM", 2, 46, DEFAULTS)
    config["attn_logit_softcapping"] = float(meta.get("gemma2.attn_logit_softcapping", 50.0))
    config["final_logit_softcapping"] = float(meta.get("gemma2.final_logit_softcapping", 30.0))
    return config


FAMILY = Family(
    "gemma2", "Gemma2ForCausalLM", read, write, gguf_architecture="gemma2", gguf_names=GGUF_NAMES,
    gguf_permute_qk=False, gguf_sliding_window=True, gguf_metadata=gguf_metadata, gguf_norm_shift=1.0,
    gguf_config=gguf_config,
)
