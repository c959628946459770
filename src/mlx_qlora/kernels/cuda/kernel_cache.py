"""Our CUDA kernels compiled once per machine, not once per process.

MLX 0.32.4 compiles an ``mx.fast.cuda_kernel`` with NVRTC the first time a process launches it and keeps the
result in that process only: every fresh ``generate.py`` or ``finetune.py`` compiled our kernels again
(15-20 s on an H100 before decoding ran at speed, ``benchmarks/RESULTS.md``). ``Kernel`` is what
``sources.cuda_kernel`` returns. Called as MLX's kernel is (inputs, template, grid, threadgroup, output
shapes and dtypes, ``init_value``), it

1. writes the whole translation unit itself (``translation_unit``: the CUDA headers, the kernel's header,
   then an ``extern "C"`` kernel whose parameters are the inputs and the outputs in order and whose first
   lines are the template's constants, as MLX writes them);
2. looks for its cubin in the cache folder (``settings.kernel_cache``, one sub-folder per MLX version,
   NVRTC version and GPU architecture; the file is named by the kernel's name and a digest of the whole
   text, so a changed text or template is another file), else compiles it with NVRTC (``nvrtc``) and
   writes the file (a temporary file, then a rename);
3. launches it with ``mx.fast.precompiled_cuda_kernel``.

A process keeps every cubin it used in memory, keyed by the template and the dtypes, so the work above is
done once per kernel and process. The folder is ``~/.cache/mlx-qlora/kernels`` unless
``MLX_QLORA_KERNEL_CACHE`` names another (or ``off``). On an H100 a fresh ``generate.py --adapter`` reached
its first token in 3.0 s with the kernels on disk, 4.5 s when it compiled them, against 18.8 s before
(``benchmarks/RESULTS.md``). Where it cannot be done (the cache is ``off``, NVRTC is missing, or NVRTC
refuses a text here that MLX's own headers would take) the kernel is built by ``mx.fast.cuda_kernel`` as
before, and one line on stderr says why (once per process).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from ... import settings
from . import fatbin, nvrtc
from .sources import digest

# The C type of each dtype in a kernel's parameters and ``using`` lines (MLX's ``dtype_to_cuda_type``).
C_TYPES = {mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
           mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
           mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.float64: "double"}

# Under NVRTC, libcu++'s cstdint declares the fixed-width integers at global scope, as MLX's headers have them.
# INFINITY: MLX's headers define it (from its math headers); NVRTC's own have no <math.h>.
PRELUDE = ("#include <cuda/std/cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
           "#ifndef INFINITY\n#define INFINITY __int_as_float(0x7f800000)\n#endif\n")

_said: set[str] = set()


def _say_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        print(f"mlx-qlora: {text}", file=sys.stderr)


def constant_lines(template: Sequence[tuple[str, object]]) -> str:
    """A template as the kernel's first lines: ``using T = <C type>;`` for a dtype, ``constexpr bool`` and
    ``constexpr int`` for the rest (``bool`` first: it is an ``int`` in Python)."""
    lines = []
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"  using {name} = {C_TYPES[value]};")
        elif isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        else:
            lines.append(f"  constexpr int {name} = {int(value)};")
    return "\n".join(lines)


def translation_unit(kernel_name: str, header: str, source: str, input_names: Sequence[str],
                     input_dtypes: Sequence[mx.Dtype], output_names: Sequence[str],
                     output_dtypes: Sequence[mx.Dtype], template: Sequence[tuple[str, object]]) -> str:
    """The whole CUDA text of one launch: ``PRELUDE``, ``header``, then ``extern "C" __global__ void
    kernel_name(const T0* in0, ..., U0* out0, ...)`` with the template's constants before ``source``."""
    params = [f"    const {C_TYPES[dt]}* {n}" for n, dt in zip(input_names, input_dtypes)]
    params += [f"    {C_TYPES[dt]}* {n}" for n, dt in zip(output_names, output_dtypes)]
    constants = constant_lines(template)
    return (f"{PRELUDE}\n{header}\n\nextern \"C\" __global__ void {kernel_name}(\n" + ",\n".join(params)
            + ") {\n" + (constants + "\n\n" if constants else "") + source + "\n}\n")


def folder() -> Optional[Path]:
    """This process's cache folder: ``settings.kernel_cache`` / ``mlx-<version>-nvrtc<major>.<minor>-<arch>``;
    ``None`` when the cache is off. Raises ``nvrtc.CompileError`` when NVRTC is missing."""
    root = settings.current().kernel_cache
    if root == "off":
        return None
    major, minor = nvrtc.version()
    return Path(root).expanduser() / f"mlx-{mx.__version__}-nvrtc{major}.{minor}-{nvrtc.architecture()}"


def load_or_compile(directory: Path, kernel_name: str, text: str) -> bytes:
    """The cubin of ``text`` from ``directory/<kernel_name>.cubin``, compiled and written there first when it
    is missing or empty (``kernel_name`` carries the text's digest)."""
    path = directory / f"{kernel_name}.cubin"
    try:
        data = path.read_bytes()
        if data:
            return data
    except OSError:
        pass
    data = nvrtc.compile_cubin(text, kernel_name, nvrtc.architecture())
    # the machine's first run (or a new version's) waits for this: say why, once per process
    _say_once(f"compiling CUDA kernels for this GPU; they are kept in {directory.parent} for later runs")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{kernel_name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:  # a folder we may not write: the kernel still runs from memory
        _say_once(f"compiled CUDA kernels are not kept ({e}); each process compiles them again")
    return data


def image(cubin: bytes) -> bytes:
    """What a launch hands MLX: ``cubin`` wrapped as a compressed fatbin (``settings.kernel_image``,
    ``fatbin.wrap``), or the cubin where that is off or nvFatbin is missing."""
    mode = settings.current().kernel_image
    if mode == "cubin":
        return cubin
    wrapped = fatbin.wrap(cubin, nvrtc.architecture(), mode)
    if wrapped is None:
        _say_once(f"MLX_QLORA_KERNEL_IMAGE={mode}: nvFatbin (libnvfatbin, the nvidia-nvfatbin wheel) was not "
                  "found or refused a kernel; the kernels are launched as cubins")
        return cubin
    return wrapped


class Kernel:
    """One kernel of the package (see the module docstring)."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = ""):
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self._built: dict[tuple, Optional[tuple[str, bytes]]] = {}  # launch key -> (name, cubin) or None
        self._mlx_kernel = None
        # MLX appends shapes and strides of the inputs a source names; a precompiled launch passes none
        self._precompilable = not any(f"{n}_{part}" in source for n in self.input_names
                                      for part in ("shape", "strides", "ndim"))

    def mlx_kernel(self):
        """The kernel as ``mx.fast.cuda_kernel`` builds it (compiled in each process)."""
        if self._mlx_kernel is None:
            self._mlx_kernel = mx.fast.cuda_kernel(name=self.name, input_names=self.input_names,
                                                   output_names=self.output_names, source=self.source,
                                                   header=self.header)
        return self._mlx_kernel

    def text(self, input_dtypes: Sequence[mx.Dtype], output_dtypes: Sequence[mx.Dtype],
             template: Sequence[tuple[str, object]]) -> tuple[str, str]:
        """(kernel name, translation unit) of one launch's dtypes and template: the digest of a first text
        names the second, whose name is in it."""
        draft = translation_unit("K", self.header, self.source, self.input_names, input_dtypes,
                                 self.output_names, output_dtypes, template)
        kernel_name = f"{self.name}_{digest(draft)}"
        return kernel_name, translation_unit(kernel_name, self.header, self.source, self.input_names, input_dtypes,
                                             self.output_names, output_dtypes, template)

    def build(self, input_dtypes: Sequence[mx.Dtype], output_dtypes: Sequence[mx.Dtype],
              template: Sequence[tuple[str, object]]) -> Optional[tuple[str, bytes]]:
        """(name in the cubin, cubin) of one launch's dtypes and template, or ``None``: MLX's path."""
        key = (tuple(input_dtypes), tuple(output_dtypes), tuple(template), settings.current().kernel_image)
        if key in self._built:
            return self._built[key]
        built = None
        if self._precompilable and all(dt in C_TYPES for dt in (*input_dtypes, *output_dtypes)):
            try:
                directory = folder()
                if directory is not None:
                    kernel_name, text = self.text(input_dtypes, output_dtypes, template)
                    built = (kernel_name, image(load_or_compile(directory, kernel_name, text)))
            except nvrtc.CompileError as e:
                _say_once(f"CUDA kernels compile in each process ({str(e).splitlines()[0][:300]})")
        self._built[key] = built
        return built

    def __call__(self, *, inputs: Sequence[mx.array], template: Sequence[tuple[str, object]] = (),
                 grid: tuple[int, int, int], threadgroup: tuple[int, int, int],
                 output_shapes: Sequence[tuple[int, ...]], output_dtypes: Sequence[mx.Dtype],
                 init_value: Optional[float] = None, verbose: bool = False, stream=None) -> list[mx.array]:
        built = None if verbose else self.build([a.dtype for a in inputs], output_dtypes, template)
        if built is None:
            return self.mlx_kernel()(inputs=inputs, template=list(template), grid=grid, threadgroup=threadgroup,
                                     output_shapes=list(output_shapes), output_dtypes=list(output_dtypes),
                                     init_value=init_value, verbose=verbose, stream=stream)
        name, cubin = built
        return mx.fast.precompiled_cuda_kernel(name=name, compiled_source=cubin, inputs=list(inputs),
                                               output_shapes=list(output_shapes),
                                               output_dtypes=list(output_dtypes), scalars=[], grid=grid,
                                               threadgroup=threadgroup, init_value=init_value,
                                               ensure_row_contiguous=True, stream=stream)
