"""The CUDA text of our kernels, kept in ``.cu`` files of this package with named sections.

A file holds one kernel family: notes about the file, then sections, each starting with a line

    // @section NAME: what it is

and running to the next such line (or the end of the file). Lines that start with ``///`` are notes for
the reader, part of no section. A section's text is everything else between the two lines except the
final newline, so a section whose text ends with a newline is followed by a blank line. Sections are
fragments (a header, a kernel body, a piece a body is assembled from); the Python
modules put them together and hand them to ``mx.fast.cuda_kernel``. The files are package data
(``pyproject.toml``), read through ``importlib.resources``, so an installed wheel carries them.

``cuda_kernel`` builds every kernel of the package under a name that is the same in every process and
changes with the text, so one text's kernel never stands for another's. MLX 0.32.4 keeps its own JIT kernels
in a cache on disk but compiles an ``mx.fast.cuda_kernel`` again in each process; ``kernel_cache`` keeps
ours compiled across processes (in ``~/.cache/mlx-qlora/kernels`` unless ``MLX_QLORA_KERNEL_CACHE`` says
otherwise).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Mapping

_MARKER = re.compile(r"^// @section (\w+)(?::.*)?$")


@lru_cache(maxsize=None)
def sections(filename: str) -> Mapping[str, str]:
    """The sections of ``filename`` (a file of this package, e.g. ``"qmv.cu"``) by name."""
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return MappingProxyType(parse(text, filename))


def parse(text: str, filename: str = "<text>") -> dict[str, str]:
    """The sections of a file's ``text`` by name (see the module docstring)."""
    found: dict[str, str] = {}
    name, lines = None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("///"):
            continue
        match = _MARKER.match(line.rstrip("\n"))
        if match is None:
            lines.append(line)
            continue
        if name is not None:
            found[name] = "".join(lines).removesuffix("\n")
        name, lines = match.group(1), []
        if name in found:
            raise ValueError(f"{filename}: section {name!r} appears twice")
    if name is not None:
        found[name] = "".join(lines).removesuffix("\n")
    return found


def digest(*parts: object) -> str:
    """A short hex digest of ``parts`` (their ``repr``): the same in every process, unlike ``hash``."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:12]


def cuda_kernel(name: str, input_names, output_names, source: str, header: str = ""):
    """The kernel named ``name`` plus a digest of its text, compiled once per machine where it can be
    (``kernel_cache.Kernel``; otherwise ``mx.fast.cuda_kernel``)."""
    from .kernel_cache import Kernel

    return Kernel(name=f"{name}_{digest(source, header)}", input_names=input_names, output_names=output_names,
                  source=source, header=header)
