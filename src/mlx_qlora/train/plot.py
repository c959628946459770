"""The loss curve of a run (``loss.png``), drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def plot_losses(metrics_file: Path, out_file: Path) -> Optional[Path]:
    """Plot training and validation loss from ``metrics.jsonl``; skipped when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = [], []
    if not Path(metrics_file).exists():
        return None
    for line in Path(metrics_file).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill: the plot does without it
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_file.with_name(f".{out_file.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_file)
    return out_file
