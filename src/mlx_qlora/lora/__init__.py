"""LoRA in one place: the layer, attaching it to a model, the adapter files (PEFT's format) and merging.

- ``layer.py``: ``LoRALinear`` (``lora_A`` (r, in), ``lora_B`` (out, r), PEFT's names and initialisation);
- ``matmul.py``: its forward and backward pass with the update inside the base's dense matmul;
- ``apply.py``: ``apply_lora`` wraps a model's decoder projections; parameter counts;
- ``adapters.py``: ``save_adapters`` / ``load_adapters`` in PEFT's file format;
- ``attach.py``: adapters from files attached to a loaded model at run time;
- ``merge.py``: the scale, the delta weight ``scale * B @ A`` and the merged weight, the only copy of them.
"""

from .adapters import load_adapters, save_adapters
from .apply import apply_lora, count_parameters, format_trainable
from .layer import LoRALinear
from .merge import lora_delta, lora_scale, merge_state, merge_weight

__all__ = [
    "LoRALinear", "apply_lora", "count_parameters", "format_trainable", "load_adapters", "save_adapters",
    "lora_delta", "lora_scale", "merge_state", "merge_weight",
]
