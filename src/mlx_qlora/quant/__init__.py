"""4-bit quantization, ``QuantizedLinear``, ``LoRALinear``, ``apply_lora`` and checkpoint conversion."""

from .lora import LoRALinear, apply_lora, count_parameters, format_trainable, quantize_model
from .quantize import dequantize, mlx_group_layout, quantize
from .quantized_linear import QuantizedLinear


def convert_checkpoint(*args, **kwargs):
    """See ``mlx_qlora.quant.convert.convert_checkpoint`` (imported on use: it needs the model package)."""
    from .convert import convert_checkpoint as _convert

    return _convert(*args, **kwargs)


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
