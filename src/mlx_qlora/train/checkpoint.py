"""Training checkpoints: complete or absent, never half-written.

Layout inside a run folder::

    checkpoints/
      latest                      # text: the folder name of the newest complete checkpoint
      step-0000100/
        adapter_model.safetensors # the LoRA weights, PEFT's format (see adapters.py)
        adapter_config.json
        optimizer.safetensors     # the optimizer state, flattened (AdamW.state_dict)
        trainer_state.json        # the caller's JSON dict: step, tokens seen, RNG, data cursor, best loss...
        config.json               # the run's resolved configuration

A checkpoint is written into a hidden temporary folder beside its final name and renamed into place in
one step; only then is ``latest`` replaced (also by rename) and are the oldest checkpoints beyond
``keep_last`` deleted. A process killed at any moment therefore leaves the previous checkpoint intact
and ``latest`` pointing at a complete one.

Resuming (``find_resumable``) trusts the folders, not the pointer: it takes the newest checkpoint that is
complete and readable, and says why it passed over any newer one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import LoRAConfig
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text, fsync_path, read_json
from ..lora.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapters, save_adapters
from ..outputs import CHECKPOINT, claim_output

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
RUN_CONFIG_NAME = "config.json"
REQUIRED_FILES = (WEIGHTS_NAME, CONFIG_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME, RUN_CONFIG_NAME)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_INTERRUPTED_DIR = re.compile(r"^\.step-(\d+)\.")  # atomic_dir's temporary or set-aside folder


class CheckpointDamaged(UserError):
    """A checkpoint's files are there but do not hold a usable state (raised by ``find_resumable``'s
    ``validate`` to pass over a checkpoint, where any other ``UserError`` stops the resume)."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` optimizer updates: ``step-0000100``."""
    return f"step-{int(step):07d}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED_FILES)


def _missing_files(path: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (path / name).is_file()]


def read_latest_pointer(run_dir: str | os.PathLike) -> tuple[Optional[str], Optional[str]]:
    """``(name, problem)`` of ``checkpoints/latest``: the checkpoint folder name it holds and None, or None
    and what is wrong with it (missing, unreadable, not text, not a checkpoint name)."""
    pointer = Path(run_dir) / CHECKPOINTS_DIR / LATEST_NAME
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        return None, "is missing"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"holds {len(raw)} byte(s) that are not text"
    if not _STEP_DIR.match(name):
        shown = name if len(name) <= 40 else name[:37] + "..."
        return None, f"holds {shown!r}, not a checkpoint name"
    return name, None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and _is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The folder that ``checkpoints/latest`` names, or None when the run has no checkpoint.

    If the pointer is missing, holds anything but a checkpoint's name, or names an incomplete folder (e.g.
    one removed by hand), the complete checkpoint with the highest step is returned instead.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    name, _ = read_latest_pointer(run_dir)
    if name is not None and _is_complete(root / name):
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _remove_stale_temporaries(root: Path) -> None:
    """Delete what an interrupted write left behind (hidden ``.step-*`` folders, ``.latest.*`` files)."""
    for child in root.iterdir():
        if child.name.startswith(".step-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(f".{LATEST_NAME}.") and child.is_file():
            child.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    adapters: dict[str, mx.array],
    lora_config: LoRAConfig,
    optimizer_state: Any,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    base_model: Optional[str] = None,
    keep_last: Optional[int] = 3,
) -> Path:
    """Write ``checkpoints/step-XXXXXXX/`` atomically, point ``latest`` at it, prune old ones; return it.

    adapters: flat ``{our path: array}`` (see ``save_adapters``). optimizer_state: a flat dict of arrays or
    a tree of arrays (flattened with ``tree_flatten``; ``AdamW.state_dict`` gives the flat form).
    trainer_state: any JSON-serialisable dict; its ``step`` is set to ``step`` (a different value is an
    error). config: the run's configuration (JSON). keep_last: how many checkpoints to keep, the new one
    included (None or 0 keeps all); older ones are deleted only after the new one is complete.
    A checkpoint of the same step is replaced.
    """
    if keep_last is not None and keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    if trainer_state.get("step", step) != step:
        raise ValueError(f"trainer_state['step'] = {trainer_state['step']} but the checkpoint is of step {step}")
    state = {**trainer_state, "step": int(step)}
    # Serialise the JSON first so an unserialisable value fails before anything is written.
    state_text, config_text = json.dumps(state), json.dumps(config)
    del state_text, config_text
    flat_optimizer = dict(tree_flatten(optimizer_state))

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / checkpoint_name(step)
    with claim_output(final, CHECKPOINT, flag="checkpoint").atomic_dir() as tmp:  # same step: replaced
        save_adapters(tmp, adapters, lora_config, base_model)
        mx.save_safetensors(str(tmp / OPTIMIZER_NAME), flat_optimizer)
        fsync_path(tmp / OPTIMIZER_NAME)
        atomic_write_json(tmp / RUN_CONFIG_NAME, config)
        atomic_write_json(tmp / TRAINER_STATE_NAME, state)  # written last: its presence marks completion
        fsync_path(tmp, missing_ok=True)
    fsync_path(root, missing_ok=True)
    atomic_write_text(root / LATEST_NAME, final.name + "\n")
    fsync_path(root, missing_ok=True)

    if keep_last:
        others = [path for s, path in reversed(list_checkpoints(run_dir)) if path != final]
        for path in others[keep_last - 1:]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint folder (or a run folder: its latest checkpoint).

    Returns a dict with ``path`` (the folder), ``step``, ``adapters`` (flat ``{our path: array}``),
    ``lora_config`` (``LoRAConfig``), ``optimizer`` (flat dict of arrays, as saved; rebuild AdamW's state
    with ``AdamW.load_state_dict``), ``trainer_state`` (the dict given to ``save_checkpoint``) and
    ``config``. Raises ``UserError`` naming the folder or file when something is missing or unreadable.
    """
    path = Path(path)
    if (path / CHECKPOINTS_DIR).is_dir() and not (path / TRAINER_STATE_NAME).exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(f"{path}: no complete checkpoint under {CHECKPOINTS_DIR}/")
        path = latest
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise UserError(f"{path}: incomplete checkpoint, {name} is missing")
    adapters, lora_config = load_adapters(path)
    try:
        optimizer = mx.load(str(path / OPTIMIZER_NAME))
    except Exception as e:
        raise UserError(f"{path / OPTIMIZER_NAME}: cannot read safetensors ({e})") from None
    trainer_state = read_json(path / TRAINER_STATE_NAME)
    config = read_json(path / RUN_CONFIG_NAME)
    if not isinstance(trainer_state.get("step"), int) or isinstance(trainer_state["step"], bool):
        raise UserError(f"{path / TRAINER_STATE_NAME}: missing integer 'step'")
    return {
        "path": path,
        "step": trainer_state["step"],
        "adapters": adapters,
        "lora_config": lora_config,
        "optimizer": optimizer,
        "trainer_state": trainer_state,
        "config": config,
    }


def find_resumable(
    run_dir: str | os.PathLike,
    validate: Optional[Callable[[dict[str, Any]], None]] = None,
) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint to resume a run from: the newest one (by step) that is complete and readable.

    Returns ``(checkpoint, notes)``: ``checkpoint`` as ``load_checkpoint`` returns it, and one line per
    newer checkpoint passed over saying why (incomplete, its writing interrupted, unreadable or truncated,
    or refused by ``validate``), plus a line when ``checkpoints/latest`` names another folder or is not a
    checkpoint name (the folders decide; the pointer only follows them). ``validate(checkpoint)`` may raise
    ``CheckpointDamaged`` to pass over a checkpoint; any other ``UserError`` it raises stops the search
    (a setting that no checkpoint of the run could satisfy). ``UserError`` listing every checkpoint and why
    it was passed over when none is usable.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    folders: list[tuple[int, int, Path]] = []  # (step, 1 for a step folder / 0 for an interrupted write, path)
    if root.is_dir():
        for child in root.iterdir():
            for kind, pattern in ((1, _STEP_DIR), (0, _INTERRUPTED_DIR)):
                match = pattern.match(child.name)
                if match and child.is_dir():
                    folders.append((int(match.group(1)), kind, child))
    folders.sort(key=lambda item: (item[0], item[1]), reverse=True)
    passed: list[str] = []
    for step, kind, path in folders:
        where = f"{CHECKPOINTS_DIR}/{path.name}"
        if not kind:
            passed.append(f"{where}: its writing was interrupted (a leftover, removed at the next save)")
            continue
        missing = _missing_files(path)
        if missing:
            passed.append(f"{where}: incomplete, {' and '.join(missing)} missing")
            continue
        try:
            checkpoint = load_checkpoint(path)
        except UserError as e:  # a truncated or corrupt file
            passed.append(f"{where}: unreadable ({e})")
            continue
        try:
            if checkpoint["step"] != step:
                raise CheckpointDamaged(f"{path / TRAINER_STATE_NAME}: holds step {checkpoint['step']}, "
                                        f"not the folder's {step}")
            if validate is not None:
                validate(checkpoint)  # another UserError: a setting of this run, not damage; it stops here
        except CheckpointDamaged as e:
            passed.append(f"{where}: unusable ({e})")
            continue
        notes = [f"passed over the newer {line}" for line in passed]
        pointer, problem = read_latest_pointer(run_dir)
        if problem is not None:
            notes.append(f"{CHECKPOINTS_DIR}/{LATEST_NAME} {problem}: ignored, the checkpoint folders decide")
        elif pointer != path.name:
            notes.append(f"{CHECKPOINTS_DIR}/{LATEST_NAME} names {pointer}: ignored, the checkpoint folders decide")
        return checkpoint, notes
    if not folders:
        raise UserError(f"{run_dir}: no checkpoint to resume from (no {CHECKPOINTS_DIR}/step-* folder)")
    raise UserError(f"{run_dir}: no usable checkpoint to resume from: " + "; ".join(passed))
