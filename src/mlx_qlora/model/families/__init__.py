"""The model families this decoder loads, one small file each, and the registry ``FAMILIES`` keyed by
``config.json``'s ``model_type``.

Every family runs through the one decoder (``model/mistral.py`` + ``model/layers.py``), whose features
are switched by ``ModelArgs`` fields (``qkv_bias``, ``attention_bias``, ``qk_norm``, ``layer_types``,
``fused_projections``, ``partial_rotary_factor``, the RoPE type; Gemma's ``norm_weight_offset``,
``hidden_act``, ``scale_embeddings``, ``query_pre_attn_scalar``, the soft-caps, ``sandwich_norms`` and
``rope_local_base_freq``); a family file says how its Hugging Face config maps onto those fields and back
(for export), and names its architecture, its PEFT target modules and its GGUF architecture and tensors.
"""

from __future__ import annotations

from .base import Family
from .multimodal import Multimodal
from . import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (mistral.FAMILY, llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                         phi3.FAMILY, gemma2.FAMILY, gemma3.FAMILY)}
# multimodal model types whose language model we load as a text model (``multimodal.py``)
MULTIMODAL: dict[str, Multimodal] = {m.model_type: m for m in (gemma3.MULTIMODAL,)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values()) + tuple(m.architecture for m in MULTIMODAL.values())


def family_of(model_type) -> Family:
    """The ``Family`` of a ``model_type``; ``ValueError`` naming the key and listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type: {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"multimodal, as text models: {', '.join(MULTIMODAL)})")
    return FAMILIES[model_type]


def multimodal_of(config: dict) -> Multimodal | None:
    """The ``Multimodal`` entry of a parsed ``config.json``, or None for a text model's config."""
    return MULTIMODAL.get(config.get("model_type"))


def text_config(config: dict) -> dict:
    """The text model's config of a parsed ``config.json``: the language model's for a multimodal one
    (``Multimodal.text_config``), ``config`` itself otherwise."""
    multimodal = multimodal_of(config)
    return config if multimodal is None else multimodal.text_config(config)


__all__ = ["ARCHITECTURES", "FAMILIES", "Family", "MULTIMODAL", "Multimodal", "SUPPORTED_MODEL_TYPES", "family_of",
           "multimodal_of", "text_config"]
