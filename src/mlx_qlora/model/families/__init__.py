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
from . import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3

FAMILIES: dict[str, Family] = {f.model_type: f for f in (mistral.FAMILY, llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                         phi3.FAMILY, gemma2.FAMILY, gemma3.FAMILY)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values())


def family_of(model_type) -> Family:
    """The ``Family`` of a ``model_type``; ``ValueError`` naming the key and listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type: {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return FAMILIES[model_type]


__all__ = ["ARCHITECTURES", "FAMILIES", "Family", "SUPPORTED_MODEL_TYPES", "family_of"]
