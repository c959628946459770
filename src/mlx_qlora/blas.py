"""Which BLAS MLX's CPU backend runs on.

The Linux wheel of ``mlx[cpu]`` links a slow reference BLAS. When Debian's OpenBLAS is installed
(``apt-get install libopenblas0-pthread``), loading it with ``RTLD_GLOBAL`` before ``mlx.core`` makes
MLX resolve its BLAS symbols there: float32 matmuls run tens of times faster with identical results.
Set ``MLX_QLORA_BLAS=reference`` to keep the reference BLAS, or ``MLX_QLORA_OPENBLAS=/path/libblas.so.3``
to name another library.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

# The library that was loaded, or a reason why none was.
loaded: str | None = None
reason: str = "not attempted"


def preload_openblas() -> str | None:
    """Load OpenBLAS globally before ``mlx.core`` is imported (Linux only); return its path or None."""
    global loaded, reason
    if loaded is not None:
        return loaded
    if sys.platform != "linux":
        reason = f"not needed on {sys.platform} (MLX uses the system's accelerated BLAS)"
        return None
    if os.environ.get("MLX_QLORA_BLAS", "").lower() == "reference":
        reason = "disabled by MLX_QLORA_BLAS=reference"
        return None
    if "mlx.core" in sys.modules:
        reason = "mlx.core was imported before mlx_qlora; import mlx_qlora first to use OpenBLAS"
        return None
    arch = platform.machine()
    paths = [os.environ.get("MLX_QLORA_OPENBLAS")] + [p.format(arch=arch) for p in _CANDIDATES]
    for path in paths:
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:  # a broken install: fall back to the reference BLAS
                reason = f"{path} failed to load: {e}"
                continue
            loaded = path
            reason = "loaded"
            return path
    reason = "OpenBLAS not found (apt-get install libopenblas0-pthread)"
    return None


def describe() -> str:
    """One line saying which BLAS MLX's CPU backend uses in this process."""
    if loaded:
        return f"OpenBLAS ({loaded})"
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return f"MLX's bundled reference BLAS ({reason})"
