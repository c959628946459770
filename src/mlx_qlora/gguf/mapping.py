"""What maps between llama.cpp's GGUF and a Hugging Face checkpoint, kept as data: tensor names,
config keys, and the row order of the query and key projections.

Row order: llama.cpp applies rotary embeddings to adjacent pairs of a head's dimensions (0, 1), (2, 3),
..., Hugging Face's Llama to the two halves (0, head_dim / 2), (1, head_dim / 2 + 1), .... llama.cpp's
converter therefore reorders the rows of ``q_proj`` and ``k_proj`` head by head, so that both give the
same attention. ``to_gguf_rows`` applies that reordering, ``from_gguf_rows`` undoes it.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

# llama.cpp tensor name -> Hugging Face name; "{i}" is the decoder layer.
TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# GGUF metadata key (after "<architecture>.") -> Hugging Face config.json key.
CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# llama.cpp architecture -> the family a GGUF of it is read as (Mistral models are written as "llama" by
# llama.cpp); each family adds its own tensors (``Family.gguf_names``: Qwen2's q/k/v biases, Qwen3's
# q/k norms, Gemma's extra norms) to the table above. Gemma's GGUFs are read by their family
# (``Family.gguf_config``), not through this table.
IMPORT_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
ARCHITECTURES = tuple(IMPORT_FAMILIES)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_TO_HF = [(_pattern(g), h) for g, h in TENSOR_NAMES.items()]
_TO_GGUF = [(_pattern(h), g) for g, h in TENSOR_NAMES.items()]


def family_tables(family) -> tuple[list, list]:
    """``(to Hugging Face, to GGUF)`` rename tables: ``family.gguf_names`` first (Phi-3's ``ffn_up`` is its
    fused gate_up_proj), then the common names."""
    extra = family.gguf_names if family is not None else {}
    return ([(_pattern(g), h) for g, h in extra.items()] + _TO_HF,
            [(_pattern(h), g) for g, h in extra.items()] + _TO_GGUF)


def _rename(name: str, table) -> Optional[str]:
    for pattern, target in table:
        match = pattern.match(name)
        if match:
            return target.replace("{i}", match.group(1)) if match.groups() else target
    return None


def hf_name(gguf_name: str, family=None) -> Optional[str]:
    """The Hugging Face name of a llama.cpp tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None when the table (with ``family``'s own tensors)
    has no entry."""
    return _rename(gguf_name, family_tables(family)[0])


def gguf_name(hf: str, family=None) -> Optional[str]:
    """The llama.cpp name of a Hugging Face tensor name, or None when the table (with ``family``'s own
    tensors) has no entry."""
    return _rename(hf, family_tables(family)[1])


def _heads_of(name: str, n_heads: int, n_kv_heads: int) -> Optional[int]:
    """How many heads the rows of ``name`` (a Hugging Face name) hold when they must be reordered."""
    if name.endswith("self_attn.q_proj.weight"):
        return n_heads
    if name.endswith("self_attn.k_proj.weight"):
        return n_kv_heads
    return None


def to_gguf_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a (n_heads * head_dim, in) projection in llama.cpp's order: within each head, row
    ``2 * j + s`` is Hugging Face row ``s * head_dim / 2 + j`` (s in {0, 1}, j < head_dim / 2)."""
    out_features = weight.shape[0]
    half = out_features // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def from_gguf_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``to_gguf_rows``: llama.cpp's row order back to Hugging Face's."""
    out_features = weight.shape[0]
    half = out_features // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def reorder_from_gguf(name: str, weight: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """``weight`` (Hugging Face ``name``) with llama.cpp's q/k row order undone; other tensors unchanged."""
    heads = _heads_of(name, n_heads, n_kv_heads)
    return weight if heads is None else from_gguf_rows(weight, heads)


def reorder_to_gguf(name: str, weight: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """``weight`` (Hugging Face ``name``) with q/k rows in llama.cpp's order; other tensors unchanged."""
    heads = _heads_of(name, n_heads, n_kv_heads)
    return weight if heads is None else to_gguf_rows(weight, heads)

