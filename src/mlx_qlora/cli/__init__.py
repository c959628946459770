"""The command line: ``mlx-qlora <command> [options]``, one module of this package per command.

Each command module has ``main(argv=None, prog=None) -> int`` (``run_cli``'s convention: a ``UserError``
prints one line and exits 2) and ``build_parser(prog=None)``; ``scripts/*.py`` call the same ``main``, and
``python -m mlx_qlora.cli`` is the same dispatcher as the installed ``mlx-qlora``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

import mlx_qlora

# Sub-command -> the script in scripts/ that runs the same module (mlx_qlora.cli.<sub-command>).
COMMANDS = {
    "convert": "convert_weights.py",
    "prepare": "prepare_data.py",
    "finetune": "finetune.py",
    "generate": "generate.py",
    "merge": "merge_adapters.py",
    "evaluate": "evaluate.py",
    "demo": "demo.py",
}


def command_module(name: str):
    """The module of sub-command ``name`` (imported on first use: its heavy imports sit in its functions)."""
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The dispatcher's parser: one positional, the sub-command; its help lists each with its first line."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {command_module(name).__doc__.strip().splitlines()[0].rstrip('.')}"
                        for name in COMMANDS)
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=mlx_qlora.__doc__,
        epilog=f"commands:\n{listing}\n\n'%(prog)s <command> --help' shows a command's options.")
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of the commands below")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run ``<command> [options]`` from ``argv`` (None: the command line); returns the command's exit status.

    Only the first argument is the dispatcher's (``--help``, or a command name); the rest go to the command,
    whose usage line reads ``<prog> <command>``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    command = parser.parse_args(argv[:1]).command  # exits 2 with the usage for a missing or unknown command
    return command_module(command).main(argv[1:], prog=f"{parser.prog} {command}")
