"""4-bit quantization, ``QuantizedLinear``, ``LoRALinear``, ``apply_lora`` and checkpoint conversion."""

from .convert import convert_checkpoint
from .lora import LoRALinear, apply_lora, count_parameters, format_trainable, quantize_model
from .quantize import dequantize, mlx_group_layout, quantize
from .quantized_linear import QuantizedLinear

__all__ = [
    "QuantizedLinear",
    "LoRALinear",
    "apply_lora",
    "convert_checkpoint",
    "count_parameters",
    "dequantize",
    "format_trainable",
    "mlx_group_layout",
    "quantize",
    "quantize_model",
]
