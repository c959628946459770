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
    gguf_architecture: Optional[str] = None  # None: GGUF export is refused for the family


FAMILIES: dict[str, Family] = {
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", gemma2.read, gemma2.write),
    "gemma3_text": Family("gemma3_text", "Gemma3ForCausalLM", gemma3.read, gemma3.write),
}
