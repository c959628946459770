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
