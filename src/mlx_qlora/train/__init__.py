"""Training: loss, AdamW, learning-rate schedules, checkpoints (adapter files: ``mlx_qlora.lora``)."""

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .loss import cross_entropy_loss, loss_sums, shift_for_next_token
from .optimizer import AdamW, clip_grad_norm, global_norm
from .schedule import SCHEDULES, Schedule, build_schedule

__all__ = [
    "AdamW",
    "SCHEDULES",
    "Schedule",
    "build_schedule",
    "clip_grad_norm",
    "cross_entropy_loss",
    "global_norm",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "loss_sums",
    "save_checkpoint",
    "shift_for_next_token",
]
