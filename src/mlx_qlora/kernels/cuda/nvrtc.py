"""NVRTC, the CUDA runtime compiler, through ``ctypes``: CUDA source text -> a cubin for this GPU.

MLX's CUDA build links NVRTC (``libnvrtc.so.<major>``), so in a process that imported ``mlx.core`` on CUDA
the library is already mapped; ``library()`` takes that one (from ``/proc/self/maps``) before searching.
Elsewhere (MLX's CPU build, where the tests compile our kernels to check them) it is the
``nvidia-cuda-nvrtc`` wheel's. The include folders are the ones MLX gives NVRTC for its own kernels: the
MLX package's ``include`` (and its ``cccl``, else the ``nvidia-cuda-cccl`` wheel's), then the CUDA headers
of the ``nvidia`` wheels beside MLX, else ``$CUDA_HOME``, ``$CUDA_PATH`` or ``/usr/local/cuda``. The
architecture is the device's own (``sm_90a`` on an H100), so the driver loads the result without compiling
it again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from ...device import cuda_toolkit


class CompileError(RuntimeError):
    """NVRTC is missing, or refused a source (the message carries its log)."""


def wheel_libraries(stem: str) -> list[str]:
    """The files ``<stem>.so*`` of the ``nvidia`` wheels installed beside MLX (``nvidia/<part>/lib``, or
    ``nvidia/<cu13>/<part>/lib``), newest name first; empty where there are none."""
    import glob

    import mlx.core as mx

    wheels = Path(mx.__file__).resolve().parent.parent / "nvidia"
    found = []
    for pattern in (f"*/lib/{stem}.so*", f"*/*/lib/{stem}.so*"):
        found += sorted(glob.glob(str(wheels / pattern)), reverse=True)
    return found


def library_candidates(name: str) -> list[str]:
    """Where the CUDA library ``lib<name>`` may be, in order: the system loader's name for it, its CUDA 13
    and 12 sonames, then the files of the ``nvidia`` wheels beside MLX (``wheel_libraries``)."""
    found = ctypes.util.find_library(name)
    stem = f"lib{name}"
    return ([found] if found else []) + [f"{stem}.so.13", f"{stem}.so.12", f"{stem}.so"] + wheel_libraries(stem)


def first_loadable(candidates: list[str]) -> Optional[ctypes.CDLL]:
    """The first of ``candidates`` (paths or loader names) that loads; None."""
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The NVRTC library of this process (see the module docstring)."""
    candidates = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libnvrtc.so") and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    candidates += library_candidates("nvrtc")  # the nvidia-cuda-nvrtc wheel last, where no loader path has it
    lib = first_loadable(candidates)
    if lib is None:
        raise CompileError("NVRTC (libnvrtc.so) was not found")
    return lib


def version() -> tuple[int, int]:
    """NVRTC's (major, minor)."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(result: int, what: str) -> None:
    if result != 0:
        lib = library()
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CompileError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode(errors='replace')}")


@lru_cache(maxsize=None)
def include_paths() -> tuple[str, ...]:
    """The folders NVRTC searches for ``#include`` (see the module docstring); those that exist."""
    import mlx.core as mx

    package = Path(mx.__file__).resolve().parent  # .../site-packages/mlx
    wheels = package.parent / "nvidia"
    found = [package / "include", package / "include" / "cccl"]
    if not found[1].is_dir():  # MLX's CPU build has no cccl: the nvidia-cuda-cccl wheel's, if installed
        found.append(wheels / "cuda_cccl" / "include")
    cuda_headers = [wheels / name / "include" for name in ("cu13", "cuda_runtime")]
    cuda_headers.append(Path(cuda_toolkit()) / "include")
    found += [next((p for p in cuda_headers if (p / "cuda_fp16.h").exists()), cuda_headers[-1])]
    return tuple(str(p) for p in found if p.is_dir())


def compile_cubin(source: str, name: str, arch: str) -> bytes:
    """``source`` (a whole translation unit; ``name`` names it in messages) -> a cubin for ``arch``
    (``sm_90a``). Raises ``CompileError`` with NVRTC's log."""
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        options = ["--device-as-default-execution-space", f"--gpu-architecture={arch}"]
        options += [f"--include-path={p}" for p in include_paths()]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        result = lib.nvrtcCompileProgram(prog, len(options), argv)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            raise CompileError(f"{name}: {log.value.decode(errors='replace').strip()}")
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@lru_cache(maxsize=None)
def capability() -> tuple[int, int]:
    """The default GPU's compute capability, (major, minor): MLX's device info, else the CUDA driver's."""
    import mlx.core as mx

    try:
        info = mx.device_info(mx.gpu)
    except (RuntimeError, ValueError, TypeError):
        info = {}
    major, minor = info.get("compute_capability_major"), info.get("compute_capability_minor")
    if major is None or minor is None:
        return _capability_from_driver()
    return int(major), int(minor)


def architecture() -> str:
    """The default GPU's architecture as NVRTC names it: ``sm_<major><minor>``, with ``a`` from 9.0 on
    (as MLX compiles its own kernels)."""
    major, minor = capability()
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def _capability_from_driver() -> tuple[int, int]:
    cuda = ctypes.CDLL("libcuda.so.1")
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0):
        raise CompileError("the CUDA driver gave no device")
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    return major.value, minor.value
