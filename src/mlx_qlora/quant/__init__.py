"""The 4-bit format: ``quantize``/``dequantize`` and ``QuantizedLinear``, and the two seams where the fast
paths plug in: ``matmul.py`` (how ``x @ W.T`` runs, the fused q/k/v and gate/up launches) and
``dequant.py`` (how the full weight is restored)."""

from .quantize import dequantize, mlx_group_layout, quantize
from .quantized_linear import QuantizedLinear

__all__ = ["QuantizedLinear", "dequantize", "mlx_group_layout", "quantize"]
