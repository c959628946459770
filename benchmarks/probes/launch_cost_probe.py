#!/usr/bin/env python
"""Host time per launch of one of our CUDA kernels against the size of its cubin, in one compiled graph.

MLX's ``CustomKernel::eval_gpu`` names the module of a launch by a hash of the kernel's whole source on
every evaluation, and for a precompiled kernel (``mx.fast.precompiled_cuda_kernel``, what
``kernels/cuda/kernel_cache.py`` launches) that source is the cubin. This probe launches a trivial kernel
``--launches`` times in a chain inside ``mx.compile`` and pads its cubin with an initialised device array of
``--pad-kb`` kilobytes (read at a data-dependent index, so it is kept), or gives it ``--inputs`` inputs: the
host time of each evaluation (inside ``mx.async_eval``) per launch, for each case, precompiled and (``--mlx-jit``) as MLX compiles it.
``--images cubin,size``: each case launched as the cubin and as a compressed fatbin (``kernels/cuda/fatbin.py``;
the padding compresses to almost nothing).
CUDA only.

  python benchmarks/probes/launch_cost_probe.py --pad-kb 0,16,64,256 --inputs 1,8,16 --launches 192
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from common import environment, median, print_table, write_json  # noqa: E402
from mlx_qlora import settings  # noqa: E402
from mlx_qlora.device import on_cuda  # noqa: E402
from mlx_qlora.kernels.cuda.sources import cuda_kernel  # noqa: E402

SOURCE = "  y[0] = x[0] + 1.0f + (float)mlx_qlora_pad[((int)x[0]) & (PAD - 1)];"


def padded_kernel(pad_bytes: int, inputs: int = 1):
    """The trivial kernel with ``pad_bytes`` of device data and ``inputs - 1`` inputs it does not read."""
    size = max(pad_bytes, 4)
    header = f"__device__ unsigned char mlx_qlora_pad[{size}] = {{1, 2, 3}};\n#define PAD {size}\n"
    return cuda_kernel(name=f"mlx_qlora_launch_cost_pad{size}_in{inputs}",
                       input_names=["x"] + [f"e{i}" for i in range(inputs - 1)], output_names=["y"],
                       source=SOURCE, header=header)


def host_us_per_launch(kernel, launches: int, repeats: int, precompiled: bool, inputs: int = 1) -> float:
    extra = [mx.full((16,), float(i)) for i in range(inputs - 1)]
    mx.eval(extra)

    def chain(x):
        for _ in range(launches):
            if precompiled:
                x = kernel(inputs=[x, *extra], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                           output_dtypes=[mx.float32])[0]
            else:
                x = kernel.mlx_kernel()(inputs=[x, *extra], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                                        output_dtypes=[mx.float32])[0]
        return x

    step = mx.compile(chain)
    x = mx.zeros((1,), mx.float32)
    mx.eval(step(x))
    times = []
    for _ in range(repeats):
        y = step(x)
        start = time.perf_counter()
        mx.async_eval(y)
        times.append(time.perf_counter() - start)
        mx.eval(y)
    return median(times) / launches * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pad-kb", default="0,16,64,256", help="comma-separated cubin padding in KB")
    p.add_argument("--launches", type=int, default=192, help="launches per evaluation (Mistral-7B's fused "
                   "decoding: 32 layers x 6)")
    p.add_argument("--inputs", default="1", help="comma-separated inputs per launch (at no padding)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--mlx-jit", action="store_true", help="also launch each kernel as MLX compiles it")
    p.add_argument("--images", help="comma-separated MLX_QLORA_KERNEL_IMAGE values to launch each case as "
                   "(cubin, size, default; default: the setting's)")
    p.add_argument("--json")
    args = p.parse_args()
    if not on_cuda():
        sys.exit("launch_cost_probe.py: needs MLX's CUDA backend")
    rows = []
    cases = [(int(kb), 1) for kb in args.pad_kb.split(",")]
    cases += [(0, int(n)) for n in args.inputs.split(",") if int(n) != 1]
    images = args.images.split(",") if args.images else [settings.current().kernel_image]
    for kb, n_inputs in cases:
        kernel = padded_kernel(kb * 1024, n_inputs)
        for image in images:
            with settings.override(kernel_image=image):
                built = kernel.build([mx.float32] * n_inputs, [mx.float32], [])
                row = {"pad_kb": kb, "inputs": n_inputs, "image": image,
                       "image_bytes": len(built[1]) if built else None,
                       "host_us_per_launch": host_us_per_launch(kernel, args.launches, args.repeats, True, n_inputs)}
            if args.mlx_jit and image == images[0]:
                row["mlx_jit_host_us_per_launch"] = host_us_per_launch(kernel, args.launches, args.repeats, False,
                                                                       n_inputs)
            rows.append(row)
            print(row, flush=True)
    print_table(rows, [("pad_kb", "pad KB", ""), ("inputs", "inputs", ""), ("image", "image", ""),
                       ("image_bytes", "image bytes", "{:,}"),
                       ("host_us_per_launch", "host us/launch (precompiled)", "{:.2f}"),
                       ("mlx_jit_host_us_per_launch", "host us/launch (MLX's JIT)", "{:.2f}")])
    write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
