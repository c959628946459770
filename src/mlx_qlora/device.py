"""Which backend MLX computes on now: the CPU, a GPU, and whether that GPU is a CUDA one."""

from __future__ import annotations

import os

import mlx.core as mx


def device_type() -> str:
    """``"gpu"`` when MLX's default device is a GPU (Metal or CUDA), else ``"cpu"``."""
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def on_cuda() -> bool:
    """True when the default device is a CUDA GPU."""
    try:
        return device_type() == "gpu" and mx.cuda.is_available()
    except AttributeError:  # an MLX without the mx.cuda namespace
        return False


def cuda_toolkit() -> str:
    """The CUDA toolkit folder MLX falls back on for its kernels' headers: ``$CUDA_HOME``, ``$CUDA_PATH`` or
    ``/usr/local/cuda`` (``kernels/cuda/nvrtc.py`` looks there as MLX does)."""
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
