"""Multimodal checkpoints read as text models: a ``config.json`` whose ``model_type`` names an image-and-text
model (Gemma 3's ``gemma3``, ``Gemma3ForConditionalGeneration``) holds the language model's config in a nested
``text_config`` and its weights under a prefix, beside a vision tower and a projector.

We read the language model alone: ``text_config`` (completed with the top-level fields transformers reads
from there, e.g. the token ids, where ``text_config`` does not set them) is the config of a text family, and
every weight name is mapped by a prefix table kept in the family file; the vision weights are dropped. For
text-only input the language model computes the multimodal model's logits (no image token, no image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Multimodal:
    """A multimodal ``model_type`` whose language model is one of our text families.

    names: checkpoint name prefix -> our prefix (``model.``, ``lm_head.``), or None for a dropped part
    (vision tower, projector); the longest matching prefix wins. top_level: fields read from the top level of
    ``config.json`` where ``text_config`` lacks them.
    """

    model_type: str
    architecture: str
    text_model_type: str
    names: dict[str, Optional[str]]
    top_level: tuple[str, ...] = ()

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The language model's ``config.json`` (``model_type`` the text family's); ValueError naming the key
        when ``text_config`` is missing or of another family."""
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"text_config: a {self.model_type} config needs a text_config object")
        text = dict(text)
        kind = text.setdefault("model_type", self.text_model_type)
        if kind != self.text_model_type:
            raise ValueError(f"text_config.model_type: {kind!r} is not supported in a {self.model_type} config "
                             f"(supported: {self.text_model_type})")
        for key in self.top_level:
            if key in config and key not in text:
                text[key] = config[key]
        text.pop("architectures", None)
        return text

    def rename(self, name: str) -> Optional[str]:
        """A checkpoint tensor name -> ours, or None when the tensor belongs to a dropped part; ValueError for
        a name no prefix of the table matches."""
        prefix = max((p for p in self.names if name.startswith(p)), key=len, default=None)
        if prefix is None:
            raise ValueError(f"tensor {name!r} is not part of a {self.model_type} checkpoint "
                             f"(expected a name starting with {', '.join(self.names)})")
        target = self.names[prefix]
        return None if target is None else target + name[len(prefix):]

    def dropped_part(self, name: str) -> str:
        """The part (the first segment after ``model.``, e.g. ``vision_tower``) a dropped tensor belongs to."""
        parts = name.split(".")
        return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]
