"""The model families beyond Mistral/Llama, keyed by ``config.json``'s ``model_type``.

A family is data plus two small functions: how its Hugging Face config becomes ``ModelArgs`` fields
(``read``) and how ``ModelArgs`` become its config again for export (``write``). The decoder itself is
shared (``model/mistral.py``, ``model/layers.py``): a family only switches its features on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import gemma2, gemma3


@dataclass(frozen=True)
class Family:
    """One ``model_type``: its Hugging Face architecture name and its config reading and writing."""

    model_type: str
    architecture: str  # config.json's "architectures" entry, the transformers class
    read: Callable[[dict[str, Any]], dict[str, Any]]  # Hugging Face config -> ModelArgs fields
    write: Callable[[Any], dict[str, Any]]  # ModelArgs -> Hugging Face config
    gguf_architecture: Optional[str] = None  # llama.cpp's architecture name; None: GGUF export is refused
    gguf_names: Optional[dict[str, str]] = None  # llama.cpp tensor name -> Hugging Face name ("{i}": layer)
    # ModelArgs -> "<architecture>.*" metadata; ValueError when llama.cpp would not compute this model
    gguf_metadata: Optional[Callable[[Any], dict[str, Any]]] = None
    gguf_norm_shift: float = 0.0  # added to every norm weight in the GGUF (llama.cpp's Gemma stores 1 + w)
    # "<architecture>.*" metadata -> Hugging Face config (what llama.cpp assumes filled in), for GGUF import
    gguf_config: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None


FAMILIES: dict[str, Family] = {
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", gemma2.read, gemma2.write, "gemma2", gemma2.GGUF_NAMES,
                     gemma2.gguf_metadata, 1.0, gemma2.gguf_config),
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM", gemma3.read, gemma3.write, "gemma3",
                          gemma3.GGUF_NAMES, gemma3.gguf_metadata, 1.0, gemma3.gguf_config),
}
