"""``ModelArgs``: the shape and features of our decoder, read from a Hugging Face ``config.json``; the
family-specific fields come from ``families/`` (keyed by ``model_type``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..config import number
from .families import SUPPORTED_MODEL_TYPES, family_of
from .families.base import LAYER_TYPES

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")


@dataclass
class ModelArgs:
    """Decoder hyper-parameters with Hugging Face's names.

    ``model_type`` ``llama`` is Mistral without a sliding window. ``head_dim`` defaults to
    ``hidden_size // num_attention_heads``. ``sliding_window`` None means full causal attention;
    ``layer_types`` (one ``full_attention`` / ``sliding_attention`` per layer, transformers' names) limits
    the window to some layers (None: every layer has it). ``qkv_bias``: biases on q, k and v (Qwen2);
    ``attention_bias``: on q, k, v and o; ``qk_norm``: RMSNorm over each query and key head (Qwen3, Gemma 3).
    The fields after ``hidden_act`` switch on Gemma 2/3's features (``families/gemma2.py``).
    """

    model_type: str = "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "llama3" (Llama 3.1+'s frequency scaling)
    rope_scaling_factor: float = 1.0  # "linear" divides positions by it, "llama3" low frequencies
    rope_low_freq_factor: float = 1.0  # "llama3" only, as its rope_scaling
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_position_embeddings: int = 8192  # "llama3" only
    sliding_window: Optional[int] = 4096
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    qkv_bias: bool = False
    attention_bias: bool = False
    # RMSNorm over head_dim on each head's queries and keys (q_norm, k_norm; Qwen3, Gemma 3), with the
    # model's norm_weight_offset
    qk_norm: bool = False
    layer_types: Optional[tuple[str, ...]] = None  # per layer "sliding_attention" | "full_attention"; None: all sliding
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions that RoPE rotates
    rope_short_factor: Optional[tuple[float, ...]] = None  # "longrope" only: per-frequency divisors
    rope_long_factor: Optional[tuple[float, ...]] = None  # ... past rope_original_max_position_embeddings
    rope_attention_factor: float = 1.0  # "longrope" only: multiplies the rotated dimensions
    # Gemma 2/3's switches; the defaults are Mistral's.
    hidden_act: str = "silu"  # the MLP's gate: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    norm_weight_offset: float = 0.0  # RMSNorm multiplies by (offset + weight), in float32 when not 0
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), in the embeddings' dtype
    query_pre_attn_scalar: Optional[float] = None  # attention scale is its -1/2 power; None: head_dim's
    attn_logit_softcapping: Optional[float] = None  # scores become cap * tanh(scores / cap) before the mask
    final_logit_softcapping: Optional[float] = None  # logits become cap * tanh(logits / cap)
    rope_local_base_freq: Optional[float] = None  # RoPE base of the sliding layers, unscaled; None: rope_theta
    sandwich_norms: bool = False  # norms on the attention's and the MLP's outputs, and before the MLP

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type: {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}: must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window: must be a positive integer or null, got {self.sliding_window!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type: {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dims % 2:
            raise ValueError(f"partial_rotary_factor: {self.partial_rotary_factor} does not rotate an even number "
                             f"of the {self.head_dim} dimensions of a head")
        if self.rope_type == "longrope":
            for key in ("rope_short_factor", "rope_long_factor"):
                factors = getattr(self, key)
                if factors is None or len(factors) != self.rotary_dims // 2:
                    raise ValueError(f"{key[5:]}: expected {self.rotary_dims // 2} numbers (rotated dimensions / 2), "
                                     f"got {factors!r}")
                setattr(self, key, tuple(float(f) for f in factors))
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"layer_types: expected {self.num_hidden_layers} of {', '.join(LAYER_TYPES)}, "
                                 f"got {list(self.layer_types)!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported (supported: {', '.join(HIDDEN_ACTS)})")
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                    "rope_local_base_freq"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key}: must be > 0 or null, got {value!r}")

    @property
    def rotary_dims(self) -> int:
        """How many of a head's dimensions RoPE rotates (the first ones; Phi-4-mini: 3/4 of them)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, index: int) -> Optional[int]:
        """The sliding window of decoder layer ``index`` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[index] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope_theta(self, index: int) -> tuple[float, bool]:
        """``(RoPE base, scaled)`` of decoder layer ``index``: a sliding layer of a model with
        ``rope_local_base_freq`` rotates with that base and without the scaling (Gemma 3)."""
        sliding = self.layer_types is None or self.layer_types[index] == "sliding_attention"
        if self.rope_local_base_freq is not None and sliding:
            return self.rope_local_base_freq, False
        return self.rope_theta, True

    @property
    def n_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed Hugging Face ``config.json``; unknown keys are ignored, bad ones raise ValueError."""
        config = dict(config)
        model_type = config.get("model_type")
        if model_type is None:
            raise ValueError("model_type: missing")
        family = family_of(model_type)
        raw = dict(config)
        config.update(_read_rope(config))
        # the file's own fields: the common RoPE defaults are not every family's (Gemma 3's global base is 1e6)
        config.update(family.read(raw))
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(config.get(key), list):  # some configs list several; the first is the main one
                config[key] = config[key][0] if config[key] else None
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        return cls(**values)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` fields for these arguments."""
        family = family_of(self.model_type)
        config = {
            "architectures": [family.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope_type == "llama3":
            config["rope_scaling"] = {
                "rope_type": "llama3", "factor": self.rope_scaling_factor,
                "low_freq_factor": self.rope_low_freq_factor, "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
        elif self.rope_scaling_factor != 1.0:
            config["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_scaling_factor}
        config.update(family.write(self))
        return config


def _read_rope(config: dict[str, Any]) -> dict[str, Any]:
    """The ``rope_*`` fields of ``ModelArgs`` from ``rope_theta``/``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5, which holds ``rope_theta`` too)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters: expected an object, got {params!r}")
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling: expected an object, got {scaling!r}")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if "rope_theta" in params and "rope_theta" in config and float(params["rope_theta"]) != float(config["rope_theta"]):
        raise ValueError(
            f"rope_theta: {config['rope_theta']} contradicts rope_parameters.rope_theta {params['rope_theta']}"
        )
    section = "rope_parameters" if params.get("rope_type") else "rope_scaling"
    source = params if params.get("rope_type") else scaling
    kind = source.get("rope_type") or source.get("type") or "default"
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first configs' name for it
    if kind not in ROPE_TYPES:
        raise ValueError(f"{section}.rope_type: {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    out: dict[str, Any] = {"rope_theta": number("rope_theta", theta, above=0), "rope_type": kind,
                           "rope_scaling_factor": 1.0}
    if kind == "linear":
        out["rope_scaling_factor"] = number(f"{section}.factor", source.get("factor", 1.0), above=0)
    elif kind == "llama3":
        def value(key: str, **rule):
            if key not in source:
                raise ValueError(f"{section}.{key}: missing (rope_type 'llama3' needs it)")
            return number(f"{section}.{key}", source[key], **rule)

        out["rope_scaling_factor"] = value("factor", above=0)
        out["rope_low_freq_factor"] = value("low_freq_factor", above=0)
        out["rope_high_freq_factor"] = value("high_freq_factor", above=out["rope_low_freq_factor"])
        out["rope_original_max_position_embeddings"] = value("original_max_position_embeddings", integer=True,
                                                             at_least=1)
    elif kind == "longrope":  # Phi-3 128k, Phi-3.5, Phi-4-mini: transformers' _compute_longrope_parameters
        original = source.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        original = number(f"{section}.original_max_position_embeddings", original, integer=True, at_least=1)
        out["rope_original_max_position_embeddings"] = original
        for key in ("short_factor", "long_factor"):
            factors = source.get(key)
            if not isinstance(factors, list):
                raise ValueError(f"{section}.{key}: missing or not a list (rope_type 'longrope' needs it)")
            out[f"rope_{key}"] = tuple(number(f"{section}.{key}", f, above=0) for f in factors)
        factor = source.get("factor") or config.get("max_position_embeddings", 4096) / original
        attention = source.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        out["rope_attention_factor"] = number(f"{section}.attention_factor", attention, above=0)
    partial = source.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    out["partial_rotary_factor"] = number("partial_rotary_factor", partial, above=0, at_most=1)
    return out
