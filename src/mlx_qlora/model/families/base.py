"""``Family``: what differs between the model families that share our decoder, kept as data plus two
small functions (config in, config out), and the config readers several families share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ...config import ALL_TARGETS

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    """One ``model_type``.

    read: a Hugging Face ``config.json`` (dict) -> the ``ModelArgs`` fields that are specific to the family
        (``ValueError`` naming the key for what the decoder cannot run); the common fields (sizes, RoPE,
        token ids) are read by ``ModelArgs.from_hf_config``.
    write: ``ModelArgs`` -> the family's own ``config.json`` fields, for a Hugging Face export.
    lora_targets: the projections PEFT's names for this family cover (a LoRA ``target_modules`` list).
    gguf_architecture: llama.cpp's name for the family (``general.architecture``), None when not exported.
    gguf_names: llama.cpp tensor name -> Hugging Face name, beyond the common ones (``gguf/mapping.py``).
    gguf_permute_qk: whether llama.cpp stores q/k rows in its interleaved RoPE order (``llama``) or as
        Hugging Face does (NeoX-style RoPE: ``qwen2``, ``qwen3``, ``phi3``).
    gguf_sliding_window: whether llama.cpp's architecture reads ``<arch>.attention.sliding_window`` (``phi3``).
    gguf_metadata: ``ModelArgs`` -> the whole ``<arch>.*`` metadata, for a family whose keys differ from the
        common ones (Gemma); ValueError when llama.cpp would not compute this model. None: the common keys.
    gguf_norm_shift: added to every norm weight in the GGUF (llama.cpp's Gemma stores ``1 + weight``).
    gguf_config: ``<arch>.*`` metadata -> the Hugging Face config (with what llama.cpp assumes filled in),
        for GGUF import of such a family. None: the common reading.
    """

    model_type: str
    architecture: str
    read: Callable[[dict[str, Any]], dict[str, Any]]
    write: Callable[[Any], dict[str, Any]]
    lora_targets: tuple[str, ...] = ALL_TARGETS
    gguf_architecture: Optional[str] = None
    gguf_names: dict[str, str] = field(default_factory=dict)
    gguf_permute_qk: bool = True
    gguf_sliding_window: bool = False
    gguf_metadata: Optional[Callable[[Any], dict[str, Any]]] = None
    gguf_norm_shift: float = 0.0
    gguf_config: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None


def silu_only(config: dict[str, Any]) -> None:
    """``ValueError`` when the MLP's activation is not SiLU (SwiGLU)."""
    for key in ("hidden_act", "hidden_activation"):
        if config.get(key, "silu") != "silu":
            raise ValueError(f"{key}: only 'silu' is supported, got {config[key]!r}")


def no_mlp_bias(config: dict[str, Any]) -> None:
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias: biases in the MLP's linear layers are not supported")


def qwen_windows(config: dict[str, Any]) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` as transformers' Qwen2/Qwen3 config reads them: no window
    unless ``use_sliding_window``; the window on the layers ``layer_types`` marks ``sliding_attention``,
    by default those at index ``max_window_layers`` and above."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    n_layers = config.get("num_hidden_layers")
    types = config.get("layer_types")
    if types is None:
        first = config.get("max_window_layers", 28)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ValueError(f"max_window_layers: must be an integer >= 0, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"layer_types: expected a list of {' or '.join(LAYER_TYPES)}, got {types!r}")
    if len(types) != n_layers:
        raise ValueError(f"layer_types: {len(types)} entries for {n_layers} layers")
    return {"sliding_window": window, "layer_types": tuple(types)}


def qwen_window_config(args) -> dict[str, Any]:
    """The inverse of ``qwen_windows``: ``use_sliding_window``, ``sliding_window``, ``max_window_layers``
    and ``layer_types`` for transformers."""
    if args.sliding_window is None:
        return {"use_sliding_window": False, "sliding_window": None,
                "max_window_layers": args.num_hidden_layers}
    types = list(args.layer_types or ["sliding_attention"] * args.num_hidden_layers)
    first = next((i for i, t in enumerate(types) if t == "sliding_attention"), len(types))
    return {"use_sliding_window": True, "sliding_window": args.sliding_window, "max_window_layers": first,
            "layer_types": types}


def gguf_shape_metadata(args, arch: str) -> dict[str, Any]:
    """The ``<arch>.*`` keys of a GGUF file that every llama.cpp architecture reads the same way: sizes,
    heads, the RMSNorm epsilon and the RoPE base (``args``: ``ModelArgs``)."""
    return {
        f"{arch}.vocab_size": args.vocab_size,
        f"{arch}.context_length": args.max_position_embeddings,
        f"{arch}.embedding_length": args.hidden_size,
        f"{arch}.block_count": args.num_hidden_layers,
        f"{arch}.feed_forward_length": args.intermediate_size,
        f"{arch}.attention.head_count": args.num_attention_heads,
        f"{arch}.attention.head_count_kv": args.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(args.rms_norm_eps),
        f"{arch}.rope.freq_base": float(args.rope_theta),
    }
