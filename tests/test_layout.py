"""The package's dependency order (``docs/ARCHITECTURE.md``, "Packages"): each part of ``mlx_qlora`` imports
only from parts below it, so there is no import cycle and the fast paths stay beneath the model code.

Every ``import`` counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mlx_qlora"

# Lowest first. A part is a sub-package (``model``) or a top-level module (``io``); parts in one layer may
# import each other (the test below still refuses cycles).
LAYERS = [
    {"errors", "io", "outputs", "device", "blas", "config", "settings"},
    {"kernels"},
    {"quant"},
    {"model"},
    {"lora"},
    {"data"},
    {"gguf"},
    {"convert", "calibration"},
    {"train"},
    {"generate"},
    {"tiny", "info", "cli", "__init__", "__main__"},
]
LAYER_OF = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _part(parts: list[str]) -> str:
    """The part that a path inside the package (``["model", "layers.py"]``) belongs to."""
    return parts[0].removesuffix(".py") if parts else "__init__"


def _imports(file: Path) -> set[str]:
    """The parts of ``mlx_qlora`` that ``file`` imports (relative and absolute imports, anywhere in it)."""
    rel = list(file.relative_to(PACKAGE).parts)
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = rel[:-1][: len(rel) - node.level] + (node.module.split(".") if node.module else [])
            found.add(_part(target or [node.names[0].name]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlx_qlora":
            found.add(_part(node.module.split(".")[1:] or [node.names[0].name]))
        elif isinstance(node, ast.Import):
            found |= {_part(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "mlx_qlora"}
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        me = _part(list(file.relative_to(PACKAGE).parts))
        edges.setdefault(me, set()).update(_imports(file) - {me})
    return edges


def test_every_part_has_a_layer():
    unknown = sorted(set(_edges()) - set(LAYER_OF))
    assert not unknown, f"add {unknown} to LAYERS here and to the diagram in docs/ARCHITECTURE.md"


def test_parts_import_only_from_below():
    upward = [f"{me} -> {dep}" for me, deps in _edges().items() for dep in sorted(deps)
              if LAYER_OF.get(dep, len(LAYERS)) > LAYER_OF[me]]
    assert not upward, f"imports against the dependency order: {upward}"


def test_no_import_cycle():
    edges = _edges()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [node, dep])}"
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def _kernel_module_misuse(file: Path) -> list[str]:
    """Private names of ``kernels`` modules that ``file`` imports or reads, and kernel-module attributes it
    assigns (``qmv_cuda.X = ...``, ``setattr(qmv_cuda, ...)``): settings go through ``mlx_qlora.settings``."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    offenders, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and "kernels" in (node.module or "").split("."):
            offenders += [f"{file.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and "kernels" in a.name.split(".")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_"):
                offenders.append(f"{file.name}: {node.value.id}.{node.attr}")
            elif isinstance(node.ctx, ast.Store):
                offenders.append(f"{file.name}: assigns {node.value.id}.{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases):
            offenders.append(f"{file.name}: setattr({node.args[0].id}, ...)")
    return offenders


def test_model_code_uses_no_private_kernel_names():
    """Code outside ``kernels/`` reaches the kernels through their public names only (no ``_name``) and
    sets none of their module attributes."""
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.relative_to(PACKAGE).parts[0] != "kernels":
            offenders += _kernel_module_misuse(file)
    assert not offenders, offenders


def test_benchmarks_use_no_private_kernel_names():
    """The probes too: they pick kernel variants through ``settings.override`` and the public planning
    functions, not by reaching into kernel modules."""
    offenders = []
    for file in sorted((PACKAGE.parents[1] / "benchmarks").rglob("*.py")):
        offenders += _kernel_module_misuse(file)
    assert not offenders, offenders


def test_the_misuse_check_sees_what_it_looks_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from mlx_qlora.kernels.cuda import qmv as q, _x\n"
                     "import mlx_qlora.kernels.cuda.dequant as d\n"
                     "q.STAGE = 'all'\nsetattr(d, 'MODE', 1)\nq._launch(1)\nq.qmv(1)\n")
    assert _kernel_module_misuse(probe) == ["probe.py: _x", "probe.py: assigns q.STAGE", "probe.py: setattr(d, ...)",
                                            "probe.py: q._launch"]
