"""``python scripts/X.py --help`` works from a fresh clone: the package not installed, another working
directory, no PYTHONPATH.

How "not installed" is made here: the test's own interpreter runs with ``-S`` (no ``site``: no
site-packages, no ``.pth`` files, so no editable install's hook) and with ``PYTHONPATH`` set to a folder of
links to every entry of its site-packages except ``mlx_qlora``'s (its package, dist-info and editable
files). MLX, numpy and the other dependencies import as usual; ``mlx_qlora`` does not, which the test
checks first, so only the script's own path set-up can make it importable. (``python -I`` would not do:
it ignores PYTHONPATH and the user's site-packages but keeps the interpreter's, editable install included.)
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_qlora.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory):
    """(env, cwd) for ``python -S``: the dependencies importable, ``mlx_qlora`` not."""
    base = tmp_path_factory.mktemp("bare")
    packages = base / "site"
    packages.mkdir()
    for folder in map(Path, site.getsitepackages()):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            hidden = entry.name.startswith(("mlx_qlora", "__editable__")) or entry.suffix == ".pth"
            if not hidden and not (packages / entry.name).exists():
                (packages / entry.name).symlink_to(entry)
    cwd = base / "elsewhere"
    cwd.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(base), "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": str(packages), "COLUMNS": "100"}
    probe = subprocess.run([sys.executable, "-S", "-c", "import numpy, mlx.core; import mlx_qlora"],
                           cwd=cwd, env=env, capture_output=True, text=True)
    assert "No module named 'mlx_qlora'" in probe.stderr, probe.stderr  # the dependencies did import
    return env, cwd


@pytest.mark.parametrize("script", sorted(COMMANDS.values()))
def test_help_without_the_package_installed(script, bare_env):
    env, cwd = bare_env
    done = subprocess.run([sys.executable, "-S", str(ROOT / "scripts" / script), "--help"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script} [-h]")


def test_a_copied_checkout_runs_its_own_package(tmp_path, bare_env):
    """A clone elsewhere imports the package next to its scripts, even where another copy is installed."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", clone / "scripts")
    shutil.copytree(ROOT / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env, cwd = bare_env
    done = subprocess.run([sys.executable, "-S", str(clone / "scripts" / "finetune.py"), "--help"], cwd=cwd,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: finetune.py [-h]"), done.stderr
    # The ordinary interpreter (the test's; mlx_qlora importable from this repository or an install): the
    # wrapper's set-up still puts the clone's package first.
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); import mlx_qlora; print(mlx_qlora.__file__)")
    done = subprocess.run([sys.executable, "-c", code, str(clone / "scripts" / "generate.py")], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == clone / "src" / "mlx_qlora" / "__init__.py"
