"""The 4-bit format: ``quantize``/``dequantize`` and ``QuantizedLinear``."""

from .quantize import dequantize, mlx_group_layout, quantize
from .quantized_linear import QuantizedLinear

__all__ = ["QuantizedLinear", "dequantize", "mlx_group_layout", "quantize"]
