"""How far MLX may queue work ahead of a CUDA GPU, which decides what gradient checkpointing saves.

MLX builds the work of a step on the CPU and hands it to the GPU in batches (CUDA graphs). A buffer
that the step no longer needs is only released when the batch that last read it has run, so while the
CPU is ahead of the GPU, every buffer of the queued batches is still held. On CUDA the queue can cover
most of a training step: then the activations that checkpointing drops are freed no earlier than
without it, and checkpointing saves little memory. MLX closes a batch once its outputs reach
``MLX_MAX_MB_PER_BUFFER`` megabytes and keeps at most ten batches in flight, so a small value bounds the
queued memory, at some cost in speed (``benchmarks/gpu_train.py --checkpointing both`` measures the peak
and tokens/s with and without checkpointing, ``benchmarks/probes/memory_probe.py`` where the peak goes;
``benchmarks/HISTORY.md`` compares values of the bound).

The variable must be set before MLX creates its GPU stream, so ``bound_run_ahead`` is called before
anything runs on the GPU; a value already in the environment is left alone (set it there to choose
another). Only CUDA is touched: Metal's command buffers have their own defaults (not measured here).
This is MLX's own variable, not one of ``mlx_qlora.settings``; that module's table documents it too.
"""

from __future__ import annotations

import os
from typing import Optional

from ..device import on_cuda

ENV = "MLX_MAX_MB_PER_BUFFER"
CHECKPOINTING_MB = 20


def bound_run_ahead(grad_checkpoint: bool) -> Optional[int]:
    """Cap the queued batches at ``CHECKPOINTING_MB`` each when training with checkpointing on CUDA.

    Returns the value in effect when this call set it, else None (nothing changed).
    """
    if not grad_checkpoint or ENV in os.environ or not on_cuda():
        return None
    os.environ[ENV] = str(CHECKPOINTING_MB)
    return CHECKPOINTING_MB
