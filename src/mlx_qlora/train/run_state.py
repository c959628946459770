"""What a run carries between its checkpoints besides adapters and optimizer state: ``RunState`` (step,
tokens, time, best validation loss, data cursor) as read back from a checkpoint's ``trainer_state.json``, and
``metrics.jsonl`` cut back to a checkpoint's step when a run resumes from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..io import atomic_write_text
from .checkpoint import CheckpointDamaged


@dataclass
class RunState:
    """What a checkpoint must restore besides adapters and optimizer state."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    best_val_loss: Optional[float] = None
    data_cursor: dict[str, Any] = field(default_factory=dict)


_MISSING = object()


def run_state_from(source: Path, saved: dict[str, Any]) -> RunState:
    """The ``RunState`` of a checkpoint's ``trainer_state.json``; ``CheckpointDamaged`` naming the file and key
    when a value is missing or of the wrong kind."""
    def check(key: str, value: Any, ok: bool, expected: str) -> None:
        if not ok:
            found = "missing" if value is _MISSING else f"{value!r}"
            raise CheckpointDamaged(f"{source}: {key} is {found}, expected {expected}")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    values = {key: saved.get(key, _MISSING) for key in ("tokens_seen", "elapsed", "best_val_loss", "data_cursor")}
    check("tokens_seen", values["tokens_seen"], count(values["tokens_seen"]), "a whole number >= 0")
    check("elapsed", values["elapsed"], number(values["elapsed"]) and values["elapsed"] >= 0, "seconds >= 0")
    best = None if values["best_val_loss"] is _MISSING else values["best_val_loss"]
    check("best_val_loss", best, best is None or number(best), "a number or null")
    cursor = values["data_cursor"]
    check("data_cursor", cursor, isinstance(cursor, dict), "an object")
    for key in ("epoch", "position"):
        check(f"data_cursor.{key}", cursor.get(key, _MISSING), count(cursor.get(key)), "a whole number >= 0")
    return RunState(step=saved["step"], tokens_seen=values["tokens_seen"], elapsed=float(values["elapsed"]),
                    best_val_loss=best, data_cursor=cursor)


def trim_metrics(path: Path, step: int) -> tuple[int, int]:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` and drop those after it, and any line that is not a
    JSON record with a step (rewritten atomically, only when something is dropped). Returns
    ``(rows dropped, unreadable lines dropped)``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0, 0
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    kept, dropped, unreadable = [], 0, 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            row_step = record["step"]
            if not isinstance(row_step, int) or isinstance(row_step, bool):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        if row_step > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped or unreadable:
        atomic_write_text(path, "".join(kept))
    return dropped, unreadable
