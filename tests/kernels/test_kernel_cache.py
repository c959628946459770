"""The compiled-kernel cache (``kernels/cuda/kernel_cache.py``): one compilation per kernel text and machine,
read back by later processes, a new file for a new text, nothing half-written, and MLX's own path wherever the
cache cannot be used. NVRTC and MLX's launch are replaced by recorders here (no GPU); the GPU test at the end
launches the cached kernels and compares them with MLX's build of the same kernel, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_qlora import settings
from mlx_qlora.device import on_cuda
from mlx_qlora.kernels.cuda import dequant, fatbin, kernel_cache, nvrtc
from mlx_qlora.kernels.cuda.sources import cuda_kernel

SOURCE = "  const int i = threadIdx.x; y[i] = x[i] * S;"


class Recorder:
    """Stands for NVRTC, nvFatbin and MLX's two ways of launching; records what each was asked."""

    def __init__(self, monkeypatch, fail: str = "", no_fatbin: bool = False):
        self.compiled, self.launched, self.mlx_built, self.wrapped = [], [], [], []
        monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
        monkeypatch.setattr(nvrtc, "architecture", lambda: "sm_90a")

        def compile_cubin(text, name, arch):
            if fail:
                raise nvrtc.CompileError(fail)
            self.compiled.append((name, text, arch))
            return f"cubin of {name}".encode()

        def precompiled(**kw):
            self.launched.append(kw)
            return ["launched"]

        def mlx_kernel(**kw):
            self.mlx_built.append(kw["name"])
            return lambda **call: ["mlx"]

        def wrap(cubin, arch, mode):
            self.wrapped.append((arch, mode))
            return None if no_fatbin else b"fatbin of " + cubin

        monkeypatch.setattr(nvrtc, "compile_cubin", compile_cubin)
        monkeypatch.setattr(fatbin, "wrap", wrap)
        monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", precompiled)
        monkeypatch.setattr(mx.fast, "cuda_kernel", mlx_kernel)


def _launch(kernel, scale=2, dtype=mx.float32):
    x = mx.zeros((32,), dtype=dtype)
    return kernel(inputs=[x], template=[("S", scale)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                  output_shapes=[(32,)], output_dtypes=[dtype])


def _kernel():
    return cuda_kernel("scale", ["x"], ["y"], SOURCE)


def test_a_kernel_is_compiled_once_and_read_back_by_the_next_process(tmp_path, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    kernel_cache._said.clear()
    with settings.override(kernel_cache=str(tmp_path), kernel_image="size"):
        assert _launch(_kernel()) == ["launched"]
        assert capsys.readouterr().err.splitlines() == [  # why the first run waits, once
            f"mlx-qlora: compiling CUDA kernels for this GPU; they are kept in {tmp_path} for later runs"]
        [(name, text, arch)] = rec.compiled
        assert arch == "sm_90a" and name.startswith(_kernel().name + "_")
        # the cubin is kept under the MLX version, NVRTC version and architecture, named by the kernel
        kept = tmp_path / f"mlx-{mx.__version__}-nvrtc13.0-sm_90a" / f"{name}.cubin"
        assert kept.read_bytes() == f"cubin of {name}".encode()
        assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no temporary file left
        launch = rec.launched[0]
        # launched as a compressed fatbin of that cubin (settings.kernel_image = "size")
        assert launch["name"] == name and launch["compiled_source"] == b"fatbin of " + kept.read_bytes()
        assert rec.wrapped == [("sm_90a", "size")]
        assert launch["ensure_row_contiguous"] and launch["scalars"] == [] and launch["grid"] == (32, 1, 1)
        assert f'extern "C" __global__ void {name}(' in text and "  constexpr int S = 2;" in text

        fresh = _kernel()  # a new process: a new kernel object, the same folder
        _launch(fresh)
        _launch(fresh)
        assert len(rec.compiled) == 1 and [k["name"] for k in rec.launched] == [name] * 3

        _launch(fresh, scale=3)  # another template is another text, file and name
        _launch(fresh, dtype=mx.bfloat16)
        names = [n for n, _, _ in rec.compiled]
        assert len(names) == len(set(names)) == 3
        assert "  using" not in rec.compiled[1][1] and "const __nv_bfloat16* x" in rec.compiled[2][1]
    assert not rec.mlx_built and capsys.readouterr().err == ""


def test_an_empty_cached_file_is_compiled_again(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    with settings.override(kernel_cache=str(tmp_path)):
        _launch(_kernel())
        [kept] = list(tmp_path.rglob("*.cubin"))
        kept.write_bytes(b"")  # an interrupted writer of another program, say
        _launch(_kernel())
        assert len(rec.compiled) == 2 and kept.read_bytes().startswith(b"cubin of")


def test_the_cubin_is_launched_as_it_is_where_asked_or_without_nvfatbin(tmp_path, monkeypatch, capsys):
    for no_fatbin, image in ((False, "cubin"), (True, "size")):
        rec = Recorder(monkeypatch, no_fatbin=no_fatbin)
        kernel_cache._said.clear()
        with settings.override(kernel_cache=str(tmp_path), kernel_image=image):
            _launch(_kernel())
        [kept] = list(tmp_path.rglob("*.cubin"))
        assert rec.launched[0]["compiled_source"] == kept.read_bytes()
        assert len(rec.wrapped) == (1 if no_fatbin else 0)
        said = [line for line in capsys.readouterr().err.splitlines() if "KERNEL_IMAGE" in line]
        assert said == ([f"mlx-qlora: MLX_QLORA_KERNEL_IMAGE=size: nvFatbin (libnvfatbin, the nvidia-nvfatbin "
                         "wheel) was not found or refused a kernel; the kernels are launched as cubins"]
                        if no_fatbin else [])
    rec = Recorder(monkeypatch)  # the setting is part of what a kernel object keeps per launch
    kernel = _kernel()
    for image in ("cubin", "default", "cubin"):
        with settings.override(kernel_cache=str(tmp_path), kernel_image=image):
            _launch(kernel)
    assert [k["compiled_source"].startswith(b"fatbin of") for k in rec.launched] == [False, True, False]
    assert rec.wrapped == [("sm_90a", "default")]


def test_the_cache_off_or_nvrtc_failing_falls_back_to_mlx_and_says_so_once(tmp_path, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    with settings.override(kernel_cache="off"):
        assert _launch(_kernel()) == ["mlx"]
    assert not rec.compiled and not rec.launched and rec.mlx_built == [_kernel().name]
    assert capsys.readouterr().err == ""  # asked for: nothing to say

    rec = Recorder(monkeypatch, fail="scale: error: identifier \"S\" is undefined\nmore log")
    kernel_cache._said.clear()
    with settings.override(kernel_cache=str(tmp_path)):
        assert _launch(_kernel()) == ["mlx"] and _launch(_kernel(), scale=5) == ["mlx"]
    err = capsys.readouterr().err.splitlines()
    assert err == ['mlx-qlora: CUDA kernels compile in each process (scale: error: identifier "S" is undefined)']
    assert not list(tmp_path.rglob("*.cubin"))


def test_sources_that_read_shapes_take_mlx_path(tmp_path, monkeypatch):
    """MLX passes ``x_shape`` and the like only to the kernels it builds itself."""
    rec = Recorder(monkeypatch)
    kernel = cuda_kernel("shaped", ["x"], ["y"], "  y[0] = x_shape[0];")
    with settings.override(kernel_cache=str(tmp_path)):
        assert _launch(kernel) == ["mlx"]
    assert not rec.compiled


def test_the_translation_unit_declares_what_mlx_declares():
    """Parameters in MLX's order (inputs, then outputs) with MLX's C types, the template's constants first in
    the body (dtypes as ``using``, bools as ``constexpr bool``), the header at file scope before the kernel."""
    text = kernel_cache.translation_unit(
        "k", "// the header", "  // the body", ["a", "b"], [mx.uint32, mx.float16], ["out"], [mx.bfloat16],
        [("T", mx.float32), ("FLAG", True), ("N", 7)])
    assert text.startswith(kernel_cache.PRELUDE) and text.index("// the header") < text.index("extern")
    assert ('extern "C" __global__ void k(\n    const uint32_t* a,\n    const __half* b,\n    __nv_bfloat16* out) {\n'
            '  using T = float;\n  constexpr bool FLAG = true;\n  constexpr int N = 7;\n\n  // the body\n}\n') in text


def test_the_prelude_defines_the_math_macros_the_kernels_use():
    """NVRTC's own headers have no <math.h>: a macro of it that a kernel's text uses (INFINITY in the attention
    kernels) must come from the prelude, as MLX's headers give it to MLX's own builds; on a GPU its absence
    sent those kernels back to MLX's per-process compilation."""
    import re
    from importlib import resources

    texts = "\n".join(f.read_text() for f in resources.files("mlx_qlora.kernels.cuda").iterdir()
                      if f.name.endswith(".cu"))
    used = {m for m in ("INFINITY", "NAN", "HUGE_VALF", "M_PI", "M_LN2", "M_LOG2E") if re.search(rf"\b{m}\b", texts)}
    assert "INFINITY" in used
    for macro in used:
        assert f"#define {macro} " in kernel_cache.PRELUDE, macro


@pytest.mark.gpu
@pytest.mark.skipif(not on_cuda(), reason="needs MLX on a CUDA GPU")
def test_cached_kernels_equal_mlx_builds_and_load_without_compiling(tmp_path, monkeypatch):
    """The per-row dequantization through the cache equals the same kernel built by MLX, bit for bit; a new
    kernel object (as in the next process) then launches from the file alone."""
    rng = np.random.default_rng(0)
    wq = mx.array(rng.integers(0, 2**32, size=(256, 64), dtype=np.uint32))
    scales = mx.array(rng.standard_normal((256, 1)).astype(np.float32))
    biases = mx.array(rng.standard_normal((256, 1)).astype(np.float32))
    args = dequant.launch_args(256, 512, mx.bfloat16)
    with settings.override(kernel_cache=str(tmp_path)):
        ours = dequant._kernel()(inputs=[wq, scales, biases], **args)[0]
        mlx = dequant._kernel().mlx_kernel()(inputs=[wq, scales, biases], **args)[0]
        assert len(list(tmp_path.rglob("*.cubin"))) == 1
        assert mx.array_equal(ours, mlx).item()

        def refuse(*a, **k):
            raise AssertionError("compiled again")

        monkeypatch.setattr(nvrtc, "compile_cubin", refuse)
        fresh = type(dequant._kernel())(**{k: getattr(dequant._kernel(), k) for k in
                                          ("name", "input_names", "output_names", "source", "header")})
        again = fresh(inputs=[wq, scales, biases], **args)[0]
        assert mx.array_equal(again, mlx).item()
        for image in ("cubin", "size", "default"):  # the driver takes each image and runs the same code
            with settings.override(kernel_image=image):
                out = fresh(inputs=[wq, scales, biases], **args)[0]
                assert mx.array_equal(out, mlx).item(), image
