"""The command line's wiring: pyproject's entry points, the ``mlx-qlora`` dispatcher and ``scripts/``."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_qlora import cli

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")


def test_entry_points_name_existing_callables():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts == {"mlx-qlora": "mlx_qlora.cli:main"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_every_script_is_a_wrapper_of_its_command():
    """scripts/*.py and the sub-commands are the same set, and each script imports only its command's ``main``."""
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == sorted(cli.COMMANDS.values())
    for command, script in cli.COMMANDS.items():
        tree = ast.parse((ROOT / "scripts" / script).read_text(encoding="utf-8"))
        imported = [(n.module, [a.name for a in n.names]) for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mlx_qlora")]
        assert imported == [(f"mlx_qlora.cli.{command}", ["main"])], script
        module = cli.command_module(command)
        assert callable(module.main) and callable(module.build_parser)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_dispatcher_runs_each_commands_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"], prog="mlx-qlora")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mlx-qlora {command} [-h]")
    # The description is the command's own: the first line of its module's docstring.
    assert cli.command_module(command).__doc__.strip().splitlines()[0] in out


def test_dispatcher_help_and_bad_commands(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"], prog="mlx-qlora")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"\n  {command} " in out
    for argv, message in (([], "the following arguments are required: command"),
                          (["train"], "argument command: invalid choice: 'train'")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv, prog="mlx-qlora")
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"mlx-qlora: error: {message}")


def test_dispatcher_passes_the_rest_to_the_command(capsys):
    """A user error inside a command keeps the scripts' contract through the dispatcher: one line, exit 2."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["convert", "--hf-path", "x", "--mlx-path", "y", "--group-size", "7"], prog="mlx-qlora")
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --group-size: '7' is not 'row', 32, 64 or 128"]


def test_python_dash_m(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "generate", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m mlx_qlora.cli generate [-h] --model MODEL")
