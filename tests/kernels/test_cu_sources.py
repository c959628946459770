"""The kernels' CUDA text in ``.cu`` files (``kernels/cuda/sources.py``): how a file is cut into sections, that
every file is package data, and that the sources assembled from them are the ones the emulation tests
run (tests/kernels/test_emulated.py) and the GPU probes measured."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from mlx_qlora.kernels.cuda import sources

ROOT = Path(__file__).resolve().parents[2]
CUDA = ROOT / "src" / "mlx_qlora" / "kernels" / "cuda"


def test_sections_keep_their_text_exactly():
    text = ("/// notes about the file\n\n"
            "// @section header: a header\n\nint f();\n\n"
            "/// notes about the next section\n"
            "// @section snippet\nx += 1;\n"
            "// @section body: the last one\n  {\n  }\n\n"
            "/// end\n")
    assert sources.parse(text) == {"header": "\nint f();\n", "snippet": "x += 1;", "body": "  {\n  }\n"}


def test_a_section_name_appears_once():
    with pytest.raises(ValueError, match="k.cu: section 'a' appears twice"):
        sources.parse("// @section a\nx\n// @section a\ny\n", "k.cu")


def test_every_file_is_package_data():
    """What an installed (non-editable) wheel carries: the files ``package-data`` names."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["mlx_qlora"]
    package = ROOT / "src" / "mlx_qlora"
    data = [p.relative_to(package).as_posix() for p in (package / "kernels").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert sorted(data) == ["kernels/cuda/attention.cu", "kernels/cuda/dequant.cu", "kernels/cuda/l2_prefetch.cu",
                            "kernels/cuda/qmv.cu"]
    assert all(any(fnmatch.fnmatch(p, pattern) for pattern in patterns) for p in data)


@pytest.mark.parametrize("name", ["qmv.cu", "attention.cu", "dequant.cu", "l2_prefetch.cu"])
def test_every_section_is_used(name):
    """A section no module reads would be dead kernel text."""
    code = "".join(p.read_text(encoding="utf-8") for p in CUDA.glob("*.py"))
    for section in sources.sections(name):
        assert f'"{section}"' in code, f"{name}: section {section} is not read"


_NAMES = """
import mlx.core as mx
from mlx_qlora.kernels.cuda.qmv_source import Variant
from mlx_qlora.kernels.cuda import attention, dequant, qmv_plan
seen = []
for v in (Variant(1), Variant(2, swiglu=True, norm_eps=1e-5), Variant(1, residual=True),
          Variant(3, norm_eps=1e-6, rope=(True, True, False), rope_base=1e4, rope_scale=1.0, cache=True),
          Variant(3, norm_eps=1e-6, rope=(True, True, False), rope_base=1e4, rope_scale=1.0, cache=True,
                  addend=(1.0, None, 2.0))):
    seen.append(qmv_plan.kernel(v, False, False, 4, 2, 4).name)
seen += [k.name for k in attention._kernels(0.125, 4)]
seen.append(dequant._kernel().name)
print(" ".join(seen))
"""


def test_kernel_names_are_the_same_in_every_process_and_follow_the_text():
    """Compiled kernels are kept on disk under their names (``kernel_cache``): a name must not depend on the
    process (Python's ``hash`` of a tuple holding None does) and must change with the kernel's text."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _NAMES], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout.split()
            for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(set(runs[0])) == len(runs[0]) == 8
    assert sources.digest("a", "") != sources.digest("b", "") and sources.digest(1.0) == sources.digest(1.0)
