"""What the commands share: the defaults their flags stand for, read from the config dataclasses.

A flag that takes a value defaults to None, meaning "not given"; the value used then is the default of a
config field, the only place it is written, and ``--help`` shows it from there.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import UserError


def parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser: ``description`` (its module docstring) printed as written, ``prog`` for the
    usage line (None: the running script's name)."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls`` (a default factory is called)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def shown(value: Any) -> str:
    """A default as ``--help`` writes it: a float in its shorter form (``2e-4``, not ``0.0002``; ``0.05``)."""
    if isinstance(value, float):
        plain = repr(value)
        mantissa, _, exponent = f"{value:e}".partition("e")
        compact = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return compact if len(compact) < len(plain) else plain
    return str(value)


def given(args: argparse.Namespace, cls: type, **renamed: str) -> dict[str, Any]:
    """The flags of ``args`` that were given (not None) and set a field of ``cls``, by field name.

    A flag sets the field of its own name, or ``renamed[flag]`` (``source_split="split"``)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for flag, value in vars(args).items():
        name = renamed.get(flag, flag)
        if value is not None and name in fields:
            values[name] = value
    return values


def build(cls: type, values: dict[str, Any]):
    """``cls(**values)``; a value the dataclass refuses (``ValueError``) is a ``UserError`` with its message."""
    try:
        return cls(**values)
    except ValueError as e:
        raise UserError(str(e)) from None
