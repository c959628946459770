"""Resolve a run's configuration: defaults < ``--config`` file (YAML or JSON) < command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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
