"""Per-row 4-bit dequantization as one CUDA kernel (training and prompt processing on NVIDIA GPUs).

Training dequantizes every frozen weight twice per step (forward, and again in the backward pass:
``quant/dequant_matmul.py``), so the speed of ``w[n, k] = s[n] * q[n, k] + b[n]`` counts. MLX's
``mx.dequantize`` needs our one scale per row expanded to one per group of 64 (two more launches per
call). Here each thread reads ``settings.dequant_words`` 32-bit words (8 weights each) and writes each as
one 16-byte store (bfloat16, float16) or two (float32); a warp's loads and stores are contiguous. Values
are computed in float32 (``fmaf(s, q, b)``) and rounded once to the output dtype. The CUDA text is
``dequant.cu``.

``quant/dequant.py`` takes it on CUDA where ``supports`` says so (``settings.dequant``; ``mlx`` takes
MLX's ``mx.dequantize``); ``dequant_probe.py`` times both. The CPU tests check what the kernel computes,
``dequantize`` in float32, against float64, and run its source through a CUDA emulation.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

from ... import settings
from ...device import on_cuda
from .sources import cuda_kernel, sections

_CU = sections("dequant.cu")
HEADER = _CU["header"]
SOURCE = _CU["body"]
_THREADS = 256
_DTYPE_CODES = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}


def supports(wq: mx.array, bits: int, group_size, dtype: mx.Dtype) -> bool:
    """Per-row 4-bit, an output dtype the kernel writes, CUDA, ``settings.dequant`` on."""
    return settings.current().dequant and bits == 4 and group_size is None and dtype in _DTYPE_CODES and on_cuda()


@lru_cache(maxsize=None)
def _kernel():
    return cuda_kernel(
        name="mlx_qlora_dequantize_per_row_4bit",
        input_names=["w", "scales", "biases"],
        output_names=["y"],
        source=SOURCE,
        header=HEADER,
    )


def launch_args(out_features: int, in_features: int, dtype: mx.Dtype) -> dict:
    """The launch of one shape: ``settings.dequant_words`` words per thread, blocks of 256 threads."""
    return _launch_args(out_features, in_features, dtype, settings.current().dequant_words)


@lru_cache(maxsize=None)
def _launch_args(out_features: int, in_features: int, dtype: mx.Dtype, per_thread: int) -> dict:
    per_block = _THREADS * per_thread  # words
    blocks = (out_features * (in_features // 8) + per_block - 1) // per_block
    return dict(
        template=[("DT", _DTYPE_CODES[dtype]), ("N", out_features), ("K", in_features), ("PER", per_thread)],
        grid=(blocks * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(out_features, in_features)],
        output_dtypes=[dtype],
    )


def dequantize(wq: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> mx.array:
    """wq (N, K/8) uint32, per-row scales/biases (N, 1) -> W (N, K) in ``dtype``; see ``supports``."""
    args = launch_args(wq.shape[0], wq.shape[1] * 8, dtype)
    return _kernel()(inputs=[wq, scales, biases], **args)[0]
