"""A cubin wrapped as a compressed fatbin, through NVIDIA's nvFatbin library.

MLX 0.32.4 names the module of every launch of a precompiled kernel by ``std::hash`` of the whole image it
was given, at every evaluation (``CustomKernel::eval_gpu``), so the host spends time in proportion to the
image's bytes on each launch. A fatbin holding the same cubin compressed is a few times smaller, and the
CUDA driver takes it wherever it takes the cubin (``cuModuleLoadDataEx``), unpacking it once per process.

nvFatbin (``libnvfatbin``) comes with the CUDA toolkit and as the ``nvidia-nvfatbin`` wheel; without it
the cubin is launched as it is. ``settings.kernel_image`` chooses (``cubin`` by default: neither the
driver's taking the compressed image nor the host time saved is measured on a GPU yet). With NVRTC 12.9's
cubins for sm_90a, one fused decoder layer's launches shrink from 167 KB to 39 KB (``size``) or 64 KB
(``default``).
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache
from typing import Optional

from ...device import cuda_toolkit
from .nvrtc import first_loadable, library_candidates


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """libnvfatbin: from the system's loader, the ``nvidia`` wheels beside MLX, or the CUDA toolkit; None."""
    candidates = library_candidates("nvfatbin")
    candidates += sorted(glob.glob(os.path.join(cuda_toolkit(), "lib64", "libnvfatbin.so*")), reverse=True)
    return first_loadable(candidates)


def wrap(cubin: bytes, arch: str, mode: str = "size") -> Optional[bytes]:
    """``cubin`` for ``arch`` (``sm_90a``) as a fatbin compressed in nvFatbin's ``mode`` (``size``:
    zstd, the smallest; ``default``); None without nvFatbin or where it refuses."""
    lib = library()
    if lib is None:
        return None
    options = [b"-64", b"-compress-all", f"-compress-mode={mode}".encode()]
    argv = (ctypes.c_char_p * len(options))(*options)
    handle = ctypes.c_void_p()
    if lib.nvFatbinCreate(ctypes.byref(handle), argv, ctypes.c_size_t(len(options))) != 0:
        return None
    try:
        number = arch.removeprefix("sm_").encode()
        if lib.nvFatbinAddCubin(handle, cubin, ctypes.c_size_t(len(cubin)), number, b"mlx_qlora") != 0:
            return None
        size = ctypes.c_size_t()
        if lib.nvFatbinSize(handle, ctypes.byref(size)) != 0:
            return None
        out = ctypes.create_string_buffer(size.value)
        if lib.nvFatbinGet(handle, out) != 0:
            return None
        return out.raw
    finally:
        lib.nvFatbinDestroy(ctypes.byref(handle))
