"""Resolve a run's configuration: defaults < ``--config`` file (YAML or JSON) < command-line flags; or, to
resume a run, the settings saved in its ``run_config.json`` < command-line flags."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

from ..config import LoRAConfig, TrainConfig, duration_seconds
from ..errors import UserError
from ..io import read_json

# Flags of finetune.py that set a field of the nested LoRA config.
LORA_FLAGS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
              "lora_targets": "targets", "lora_layers": "layers", "use_rslora": "use_rslora"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping from ``path``, with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    if path.suffix.lower() == ".json":
        values = read_json(path, expect=None)
    else:
        import yaml

        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception as e:
            raise UserError(f"{path}: cannot be parsed ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise UserError(f"{path}: key {bad[0]!r} is not a setting name")
    return {k.replace("-", "_"): v for k, v in values.items()}


def _lora_section(value: Any, source: str) -> dict[str, Any]:
    """The nested ``lora:`` settings (None: none), or a ``UserError`` when it is not a mapping."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: lora must be a mapping of LoRA settings (rank, alpha, ...), got {value!r}")
    return dict(value)


def resolve_config(flags: dict[str, Any], config_file: Optional[str] = None) -> TrainConfig:
    """Merge the config file and the flags that were given (None means not given) into a ``TrainConfig``."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    source = config_file or "command line"
    lora = _lora_section(values.pop("lora", None), source)
    for flag, key in LORA_FLAGS.items():
        if flag in values:
            lora[key] = values.pop(flag)
    flags = dict(flags)
    lora.update(_lora_section(flags.pop("lora", None), source))  # a saved run's nested LoRA settings
    for name, value in flags.items():
        if value is None:
            continue
        if name in LORA_FLAGS:
            lora[LORA_FLAGS[name]] = value
        else:
            values[name] = value
    try:
        values["lora"] = LoRAConfig.from_dict(lora)
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {e}") from None


def parse_duration(text: Optional[str]) -> Optional[float]:
    """``"2h"``, ``"30m"``, ``"90s"``, ``"1.5h"`` or a number of seconds -> seconds (None stays None)."""
    try:
        return duration_seconds(text)
    except ValueError as e:
        raise UserError(str(e)) from None


RUN_CONFIG_NAME = "run_config.json"
# Keys of a saved run_config.json that are records of the run, not settings to resume with.
RECORD_ONLY = ("data_meta", "template", "total_steps", "world_size")
# Settings that name files; runs written before they were stored absolute hold them as typed.
PATH_KEYS = ("model", "data")


def resume_config(run_dir: str | os.PathLike, flags: dict[str, Any]) -> TrainConfig:
    """The configuration to resume the run in ``run_dir`` with: its ``run_config.json`` overridden by the
    flags that were given (None means not given); ``out`` is ``run_dir``.

    Every error is a one-line ``UserError``: a missing or invalid run_config.json (not JSON, a value of the
    wrong type, an unknown key, a setting out of range) names the file and the key. ``model`` and ``data``
    are stored absolute; a relative one (from a run started before that) is looked for from the current
    directory, then from the directory the run was started in (``run_dir`` less the stored ``out``), and
    its absence is an error naming the key, unless the flag gives a new path.
    """
    run_dir = Path(run_dir)
    source = run_dir / RUN_CONFIG_NAME
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found" if not run_dir.exists()
                        else f"{run_dir}: not a folder (--resume takes the run folder that finetune.py made)")
    record = read_json(source, missing="not found; --resume needs a run folder made by finetune.py")
    settings = {k: v for k, v in record.items() if k not in RECORD_ONLY}
    _check_types(settings, TrainConfig, source)
    try:
        TrainConfig.from_dict({**settings, "lora": LoRAConfig.from_dict(settings.get("lora") or {})})
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {e}") from None
    given = {k: v for k, v in flags.items() if v is not None}
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise UserError(f"out: --out {out} and --resume {run_dir} name different folders; a resumed run "
                        "stays in its folder (give only --resume)")
    for key in PATH_KEYS:
        if key not in given and settings.get(key):
            settings[key] = _stored_path(settings[key], key, run_dir, record.get("out"), source)
    settings.update(given)
    settings["out"] = str(run_dir)
    return resolve_config(settings)


def _started_in(run_dir: Path, stored_out: Any) -> Optional[Path]:
    """The directory a run was started in, when its stored ``out`` is relative: ``run_dir`` (resolved) less
    the stored path's parts, if they match; else None."""
    if not isinstance(stored_out, str) or not stored_out or Path(stored_out).is_absolute():
        return None
    start = run_dir.resolve()
    for part in reversed(Path(os.path.normpath(stored_out)).parts):
        if part == ".":
            continue
        if part == ".." or start.name != part:
            return None
        start = start.parent
    return start


def _stored_path(value: str, key: str, run_dir: Path, stored_out: Any, source: Path) -> str:
    """A ``model`` or ``data`` path of run_config.json, absolute, found (see ``resume_config``)."""
    path = Path(value)
    if path.is_absolute():
        if not path.exists():
            raise UserError(f"{source}: {key} {value} is not found; give --{key} with its new place")
        return value
    bases = [Path.cwd()]
    start = _started_in(run_dir, stored_out)
    if start is not None and start != Path.cwd().resolve():
        bases.append(start)
    for base in bases:
        if (base / path).exists():
            return str((base / path).resolve())
    raise UserError(f"{source}: {key} {value!r} is relative and not found from {' or '.join(map(str, bases))}; "
                    f"resume from the directory the run was started in, or give --{key}")


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _check_types(values: dict[str, Any], cls: type, source: Path, prefix: str = "") -> None:
    """``UserError`` naming ``source`` and the key for a value whose JSON type does not fit the field of
    ``cls`` (a config dataclass) it sets. Unknown keys are left to ``from_dict``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, hint = values[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {prefix}{f.name} is {_shown(value)}, expected an object")
            _check_types(value, hint, source, f"{prefix}{f.name}.")
            continue
        expected = _fits(value, hint)
        if expected:
            raise UserError(f"{source}: {prefix}{f.name} is {_shown(value)}, expected {expected}")


def _fits(value: Any, hint: Any) -> Optional[str]:
    """None when the JSON ``value`` fits the annotation ``hint``, else what was expected, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):  # Optional[X], X | None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        expected = _fits(value, inner[0])
        return None if expected is None else f"{expected} or null"
    if origin in (list, tuple):
        item = args[0]
        if origin is tuple and isinstance(value, str):  # a comma-separated list (lora targets)
            return None
        if not isinstance(value, list) or any(_fits(v, item) for v in value):
            return f"a list of {_TYPE_WORDS.get(item, item).removeprefix('a ')}s"
        return None
    if hint is bool:
        return None if isinstance(value, bool) else _TYPE_WORDS[bool]
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _TYPE_WORDS[int]
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else _TYPE_WORDS[float]
    if hint is str:
        return None if isinstance(value, str) else _TYPE_WORDS[str]
    return None


def _shown(value: Any) -> str:
    """A value as the JSON file spells it, shortened to one short line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
