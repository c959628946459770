"""Print the versions, device and BLAS in use: ``python -m mlx_qlora.info``."""

from __future__ import annotations

import platform
import time

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)
from mlx_qlora import blas

import mlx.core as mx


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    """Measured float32 matmul speed on the default device, in GFLOP/s."""
    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    print(f"mlx_qlora {mlx_qlora.__version__}")
    print(f"mlx       {mx.__version__}")
    print(f"python    {platform.python_version()} on {platform.system()} {platform.machine()}")
    print(f"device    {mx.default_device()}")
    print(f"blas      {blas.describe()}")
    print(f"matmul    {matmul_gflops():.1f} GFLOP/s (float32, 512x512)")


if __name__ == "__main__":
    main()
