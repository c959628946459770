"""Our decoder in MLX (Mistral, Llama, Qwen2, Qwen3, Phi-3: ``families/``), with names that match Hugging Face
checkpoints."""

from .args import ModelArgs
from .cache import KVCache
from .loading import build_model, load_model, load_weights, read_config, weight_files
from .mask import build_mask, make_mask
from .mistral import MistralForCausalLM, MistralModel

__all__ = [
    "ModelArgs", "KVCache", "MistralForCausalLM", "MistralModel", "build_model", "load_model",
    "load_weights", "read_config", "weight_files", "build_mask", "make_mask",
]
