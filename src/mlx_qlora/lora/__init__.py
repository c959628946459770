"""LoRA in one place: the layer, attaching it to a model, the adapter files (PEFT's format) and merging.

- ``layer.py``: ``LoRALinear`` (``lora_A`` (r, in), ``lora_B`` (out, r), PEFT's names and initialisation);
- ``matmul.py``: its forward and backward pass with the update inside the base's dense matmul;
- ``apply.py``: ``apply_lora`` wraps a model's decoder projections; parameter counts;
- ``adapters.py``: ``save_adapters`` / ``load_adapters`` in PEFT's file format;
- ``attach.py``: adapters from files attached to a loaded model at run time;
- ``merge.py``: the delta weight ``scale * B @ A`` and the merged weight, the only copy of them.

The contract every part keeps (and anything that adds another adapter kind must keep):

- An adapter wraps one frozen decoder projection ``base`` (``nn.Linear`` or ``QuantizedLinear``) at the
  projection's Hugging Face path, ``model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj``, and
  computes ``base(x) + scale * (x @ lora_A.T) @ lora_B.T`` for x (..., in) -> (..., out).
- Its only trainable arrays are ``lora_A`` (r, in) and ``lora_B`` (out, r). So the adapters of a model, in
  memory, are one flat dict ``{"model.layers.0.self_attn.q_proj.lora_A": A, ...}``: the keys of
  ``tree_flatten(model.trainable_parameters())``, what training updates and checkpoints, what
  ``save_adapters`` writes and ``load_adapters`` returns, what ``merge_state`` merges. A PEFT file key is
  the same path with ``base_model.model.`` before it and ``.weight`` after it.
- ``scale`` is ``config.lora_scale(alpha, r, use_rslora)`` (``alpha / r``, or ``alpha / sqrt(r)`` with
  rsLoRA, PEFT's rule), reached as ``LoRAConfig.scale``; nothing else computes it.
- The update as a weight is ``lora_delta(A, B, scale)`` = ``scale * B @ A`` (out, in), and a merged weight
  is ``merge_weight(W, A, B, scale)`` = ``W + scale * B @ A``, formed in float32 and cast once; both
  ``LoRALinear.fuse`` and ``merge_state`` (export) use them.
- A ``LoRAConfig`` (rank, alpha, dropout, targets, layers, use_rslora) describes a set of adapters; it is
  what ``apply_lora`` takes and what ``adapter_config.json`` stores in PEFT's field names.
"""

from .adapters import load_adapters, save_adapters
from .apply import apply_lora, count_parameters, format_trainable
from .layer import LoRALinear
from .merge import lora_delta, lora_scale, merge_state, merge_weight

__all__ = [
    "LoRALinear", "apply_lora", "count_parameters", "format_trainable", "load_adapters", "save_adapters",
    "lora_delta", "lora_scale", "merge_state", "merge_weight",
]
