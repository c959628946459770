"""Resolve a run's configuration: defaults < ``--config`` file (YAML or JSON) < command-line flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ..config import LoRAConfig, TrainConfig
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
    return {k.replace("-", "_"): v for k, v in values.items()}


def resolve_config(flags: dict[str, Any], config_file: Optional[str] = None) -> TrainConfig:
    """Merge the config file and the flags that were given (None means not given) into a ``TrainConfig``."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    lora = dict(values.pop("lora", None) or {})
    for flag, key in LORA_FLAGS.items():
        if flag in values:
            lora[key] = values.pop(flag)
    flags = dict(flags)
    lora.update(flags.pop("lora", None) or {})  # a saved run's nested LoRA settings
    for name, value in flags.items():
        if value is None:
            continue
        if name in LORA_FLAGS:
            lora[LORA_FLAGS[name]] = value
        else:
            values[name] = value
    source = config_file or "command line"
    try:
        values["lora"] = LoRAConfig.from_dict(lora)
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {e}") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: Optional[str]) -> Optional[float]:
    """``"2h"``, ``"30m"``, ``"90s"``, ``"1.5h"`` or a number of seconds -> seconds (None stays None)."""
    if text is None:
        return None
    match = _DURATION.match(str(text))
    if not match:
        raise UserError(f"max_time: cannot read {text!r} as a duration (use e.g. 90s, 30m, 2h)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
