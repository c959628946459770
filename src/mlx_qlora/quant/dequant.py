"""The dequantization seam: the full weight of a quantized layer by the fastest exact path of the device.

One function chooses among three paths:

- CUDA, per-row 4-bit: our kernel (``kernels/cuda/dequant.py``; ``settings.dequant``), which reads the
  per-row scales as they are;
- a GPU and a half-precision output: MLX's fused ``mx.dequantize`` on the scales expanded into MLX's
  group layout (it computes in the scales' dtype, so float32 outputs take our own operations, which are
  exact);
- otherwise our own operations (``quantize.dequantize``), which on the CPU were faster than
  ``mx.dequantize``.

``dequant_probe.py`` and ``quantization.py --speed`` measure the paths.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from ..device import device_type
from ..kernels.cuda import dequant as dequant_cuda
from .quantize import dequantize, mlx_group_layout


def dequantize_weight(
    wq: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: Optional[int], dtype: mx.Dtype
) -> mx.array:
    """wq uint32 (out, in * bits / 32), scales/biases (out, n_groups) -> the weight (out, in) in ``dtype``.

    A pure function of arrays and a dtype (the custom matmuls key their caches on it). Dtypes that differ
    from the scales' are reached through float32, so no scale is rounded to a coarser format before it
    multiplies.
    """
    if dequant_cuda.supports(wq, bits, group_size, dtype):
        return dequant_cuda.dequantize(wq, scales, biases, dtype)
    if device_type() == "gpu" and dtype != mx.float32:
        in_features = wq.shape[1] * (32 // bits)
        layout = mlx_group_layout(scales, biases, in_features, group_size)
        if layout is not None:
            mlx_scales, mlx_biases, mlx_size = layout
            return mx.dequantize(wq, mlx_scales, mlx_biases, group_size=mlx_size, bits=bits, dtype=dtype)
    compute = dtype if dtype in (scales.dtype, mx.float32) else mx.float32
    return dequantize(wq, scales, biases, bits, group_size, dtype=compute).astype(dtype)
