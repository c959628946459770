"""Our CUDA kernels' sources, run on the CPU by ``tests/kernels/cuda_emulation.h`` (one thread per CUDA thread,
warp shuffles and block barriers emulated), against the formulas they implement: the few-row 4-bit
matmul (one weight, three weights with split outputs, gate/up with SwiGLU), the per-row dequantization
and the one-token attention over a static cache. The sources are the whole texts the library compiles
(``kernel_cache.translation_unit``, its CUDA headers swapped for the emulation's); the launch shapes come from the library's own launch arguments. This checks the
kernels' indexing and arithmetic where no GPU exists; their speed is measured on a GPU by the probes in
``benchmarks/``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qlora import settings
from mlx_qlora.kernels.cuda import attention as attention_cuda
from mlx_qlora.kernels.cuda import l2_prefetch
from mlx_qlora.kernels.cuda import dequant as dequant_cuda
from mlx_qlora.kernels.cuda import kernel_cache
from mlx_qlora.kernels.cuda import qmv as qmv_cuda
from mlx_qlora.kernels.cuda import qmv_plan
from mlx_qlora.kernels.cuda import qmv_source
from mlx_qlora.kernels.cuda.qmv_source import HEADER as QMV_HEADER
from mlx_qlora.kernels.cuda.qmv_source import Variant
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.quant.quantize import dequantize

HERE = Path(__file__).resolve().parent
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++20 compiler (g++)")

_C_TYPES = kernel_cache.C_TYPES  # the C type of each dtype, as the compiled text declares it


def _bytes(a: mx.array) -> bytes:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def emulate(tmp_path: Path, source: str, header: str, inputs: dict, output_names: list[str], args: dict,
            changed: tuple = ()) -> list:
    """Run one kernel launch described by MLX launch ``args`` (template, grid, threadgroup, output shapes
    and dtypes) on ``inputs`` (name -> mx.array); return the outputs as mx arrays, followed by the inputs
    named in ``changed`` as the kernel left them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    # the text kernel_cache compiles with NVRTC, its CUDA headers swapped for the emulation
    unit = kernel_cache.translation_unit("kernel_body", header, source, list(inputs),
                                         [a.dtype for a in inputs.values()], output_names, args["output_dtypes"],
                                         args["template"])
    assert unit.startswith(kernel_cache.PRELUDE)
    lines = ['#include "cuda_emulation.h"', unit[len(kernel_cache.PRELUDE):]]
    main = ["int main() {"]
    call = []
    for i, (name, a) in enumerate(inputs.items()):
        (tmp_path / f"in{i}.bin").write_bytes(_bytes(a))
        main.append(f'  auto file{i} = read_file("{tmp_path / f"in{i}.bin"}");')
        main.append(f"  char* in{i} = shared_alloc(file{i}.size());")
        main.append(f"  std::memcpy(in{i}, file{i}.data(), file{i}.size());")
        call.append(f"(const {_C_TYPES[a.dtype]}*)in{i}")
    sizes = []
    for i, (shape, dt) in enumerate(zip(args["output_shapes"], args["output_dtypes"])):
        sizes.append(int(np.prod(shape)) * dt.size)
        main.append(f"  char* out{i} = shared_alloc({sizes[-1]});")
        call.append(f"({_C_TYPES[dt]}*)out{i}")
    blocks = args["grid"][0] // args["threadgroup"][0]
    threads = args["threadgroup"][0]
    main.append(f"  launch({{{blocks}, 1, 1}}, {{{threads}, 1, 1}}, [&] {{ kernel_body({', '.join(call)}); }});")
    for i in range(len(output_names)):
        main.append(f'  write_file("{tmp_path / f"out{i}.bin"}", out{i}, {sizes[i]});')
    for i in range(len(inputs)):  # inputs a kernel may change (counters) come back too
        main.append(f'  write_file("{tmp_path / f"in{i}.out"}", in{i}, file{i}.size());')
    main.append("  return 0;\n}")
    src = tmp_path / "kernel.cpp"
    src.write_text("\n".join(lines + main) + "\n")
    exe = tmp_path / "kernel"
    subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", f"-I{HERE}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    subprocess.run([str(exe)], check=True, timeout=120)
    files = [(tmp_path / f"out{i}.bin", shape, dt)
             for i, (shape, dt) in enumerate(zip(args["output_shapes"], args["output_dtypes"]))]
    names = list(inputs)
    files += [(tmp_path / f"in{names.index(n)}.out", inputs[n].shape, inputs[n].dtype) for n in changed]
    outs = []
    for path, shape, dt in files:
        raw = path.read_bytes()
        if dt == mx.bfloat16:
            outs.append(mx.array(np.frombuffer(raw, dtype=np.uint16).reshape(shape)).view(mx.bfloat16))
        else:
            outs.append(mx.array(np.frombuffer(raw, dtype=np.dtype(str(dt).rpartition(".")[2])).reshape(shape)))
    return outs


def _layer(out_f: int, in_f: int, seed: int, dtype=mx.bfloat16) -> QuantizedLinear:
    mx.random.seed(seed)
    layer = QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype)
    mx.eval(layer.parameters())
    return layer


def _assert_close_to_rounded(got: mx.array, exact: mx.array, steps: int = 1):
    """Computed in float32 and rounded once: within one bfloat16 step of the exact value (plus float32
    summation error), relative to the largest output; ``steps`` 2 where the tensor-core body has rounded its
    (normed) inputs to bfloat16 as well."""
    scale = float(mx.abs(exact).max().item())
    err = float(mx.abs(got.astype(mx.float32) - exact.astype(mx.float32)).max().item())
    assert err <= steps * 2.0**-8 * scale + 1e-5, (err, scale)


# 1,056 and 2,080 inputs: 33 and 65 chunks of 32 weights, so lanes loop 2 and 3 times, the last time lane 0 alone.
# Tensor-core body (16 rows per block): 768 inputs are 3 chunks per warp (lanes of t = 3 idle), 8 input rows
# fill all of the mma's columns.
@pytest.mark.parametrize("rows,out_f,in_f,per_warp,dtype", [
    (1, 64, 128, 4, mx.bfloat16), (3, 48, 256, 2, mx.bfloat16), (2, 40, 64, 1, mx.float32),
    (2, 16, 1056, 2, mx.bfloat16), (1, 16, 2080, 4, mx.bfloat16),
    (1, 32, 512, 16, mx.bfloat16), (3, 48, 768, 16, mx.bfloat16), (8, 16, 256, 16, mx.bfloat16)])
def test_qmv_kernel(tmp_path, rows, out_f, in_f, per_warp, dtype):
    layer = _layer(out_f, in_f, rows, dtype)
    x = mx.random.normal((rows, in_f)).astype(dtype)
    variant = Variant(1)
    args = qmv_plan.launch_args(rows, in_f, (out_f,), variant, dtype, per_warp)
    assert qmv_plan.uses_mma(args) == (per_warp == qmv_plan.MMA_ROWS)
    source = variant.source(mma=qmv_plan.uses_mma(args))
    (y,) = emulate(tmp_path, source, QMV_HEADER, _inputs([layer], x), ["y0"], args)
    _assert_close_to_rounded(y, qmv_cuda.reference(x, *layer.parts))


@pytest.mark.parametrize("in_f,per_warp", [(128, 2), (256, 16)])
def test_qmv_kernel_with_three_weights_and_head_shaped_outputs(tmp_path, in_f, per_warp):
    """q/k/v of a layer (64, 32, 32 rows) in one launch, written as (B, heads, 1, head_dim)."""
    layers = [_layer(n, in_f, 10 + i) for i, n in enumerate((64, 32, 32))]
    x = mx.random.normal((1, in_f)).astype(mx.bfloat16)
    shapes = ((1, 4, 1, 16), (1, 2, 1, 16), (1, 2, 1, 16))
    variant = Variant(3)
    args = qmv_plan.launch_args(1, in_f, (64, 32, 32), variant, mx.bfloat16, per_warp, shapes)
    source = variant.source(mma=qmv_plan.uses_mma(args))
    inputs = {}
    for g, layer in enumerate(layers):
        inputs.update({f"w{g}": layer.weight, f"s{g}": layer.scales, f"b{g}": layer.biases})
    inputs["x"] = x
    outs = emulate(tmp_path, source, QMV_HEADER, inputs, ["y0", "y1", "y2"], args)
    for out, layer, shape in zip(outs, layers, shapes):
        assert out.shape == shape
        _assert_close_to_rounded(out.reshape(1, -1), qmv_cuda.reference(x, *layer.parts))


@pytest.mark.parametrize("in_f,per_warp", [(128, 4), (512, 16)])
def test_swiglu_kernel(tmp_path, in_f, per_warp):
    gate, up = _layer(96, in_f, 1), _layer(96, in_f, 2)
    x = mx.random.normal((2, in_f)).astype(mx.bfloat16)
    variant = Variant(2, swiglu=True)
    args = qmv_plan.launch_args(2, in_f, (96, 96), variant, mx.bfloat16, per_warp)
    source = variant.source(mma=qmv_plan.uses_mma(args))
    (y,) = emulate(tmp_path, source, QMV_HEADER,
                   {"w0": gate.weight, "s0": gate.scales, "b0": gate.biases,
                    "w1": up.weight, "s1": up.scales, "b1": up.biases, "x": x}, ["y"], args)
    _assert_close_to_rounded(y, qmv_cuda.reference_swiglu(x, gate.parts, up.parts))


def _inputs(layers, x, **extra):
    inputs = {}
    for g, layer in enumerate(layers):
        inputs.update({f"w{g}": layer.weight, f"s{g}": layer.scales, f"b{g}": layer.biases})
    return {**inputs, "x": x, **extra}


@pytest.mark.parametrize("position,rope_scale,dtype,in_f,stage", [
    (0, 1.0, mx.bfloat16, 128, False), (37, 1.0, mx.bfloat16, 128, False), (1000, 0.25, mx.bfloat16, 128, False),
    (37, 1.0, mx.float32, 128, False), (37, 1.0, mx.bfloat16, 256, False), (1000, 0.25, mx.bfloat16, 512, False),
    (37, 1.0, mx.bfloat16, 128, True), (1000, 0.25, mx.float32, 128, True)])
def test_qkv_kernel_with_norm_and_rotary_embeddings(tmp_path, position, rope_scale, dtype, in_f, stage):
    """RMSNorm in the prologue, q/k rotated in the epilogue: 2 sequences, 4 query and 2 key/value heads of 16.
    bfloat16 with 256 or more inputs: the tensor-core body (16 rows per block: rotary pairs (p, p + 8)).
    ``stage``: the CUDA-core body staging x * gamma in shared memory."""
    layers = [_layer(n, in_f, 20 + i, dtype) for i, n in enumerate((64, 32, 32))]
    x = (3.0 * mx.random.normal((2, in_f))).astype(dtype)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(dtype)
    variant = Variant(3, norm_eps=1e-5, rope=(True, True, False), rope_base=10000.0, rope_scale=rope_scale)
    shapes = ((2, 4, 1, 16), (2, 2, 1, 16), (2, 2, 1, 16))
    mma = in_f >= 256 and dtype == mx.bfloat16
    args = qmv_plan.launch_args(2, in_f, (64, 32, 32), variant, dtype, qmv_plan.MMA_ROWS if mma else 0, shapes, 16)
    assert dict(args["template"])["R"] == (16 if mma else 2)  # rotary pairs need an even number of rows per warp
    outs = emulate(tmp_path, variant.source(mma=mma, stage=stage), QMV_HEADER,
                   _inputs(layers, x, gamma=gamma, rope_pos=mx.array([position], dtype=mx.int32)),
                   variant.output_names, args)
    want = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, [layer.parts for layer in layers], position, 16, 10000.0,
                                            rope_scale)
    for out, ref in zip(outs, want):
        if dtype == mx.float32:  # no rounding to hide behind: float32 summation order only
            np.testing.assert_allclose(np.array(out.reshape(2, -1)), np.array(ref), rtol=1e-4, atol=1e-4)
        else:
            _assert_close_to_rounded(out.reshape(2, -1), ref)


@pytest.mark.parametrize("position,capacity,dtype,in_f,stage", [
    (5, 8, mx.bfloat16, 128, False), (13, 8, mx.bfloat16, 128, False), (3, 16, mx.float32, 128, False),
    (13, 8, mx.bfloat16, 256, False), (13, 8, mx.bfloat16, 128, True)])
def test_qkv_kernel_writes_keys_and_values_into_the_cache(tmp_path, position, capacity, dtype, in_f, stage):
    """The ``cache`` variant: q as output, this position's rotated k and v written in place into slot
    ``position % capacity`` of the (sequences, kv heads, capacity, head dim) buffers; every other slot
    keeps its old value."""
    layers = [_layer(n, in_f, 50 + i, dtype) for i, n in enumerate((64, 32, 32))]
    x = (3.0 * mx.random.normal((2, in_f))).astype(dtype)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(dtype)
    kc, vc = (mx.random.normal((2, 2, capacity, 16)).astype(dtype) for _ in range(2))
    variant = Variant(3, norm_eps=1e-5, rope=(True, True, False), cache=True)
    per_warp = qmv_plan.MMA_ROWS if in_f >= 256 else 0
    args = qmv_plan.launch_args(2, in_f, (64, 32, 32), variant, dtype, per_warp, ((2, 4, 1, 16),), 16, capacity)
    q, kc_after, vc_after = emulate(
        tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), QMV_HEADER,
        _inputs(layers, x, gamma=gamma, rope_pos=mx.array([position], dtype=mx.int32), kc=kc, vc=vc),
        variant.output_names, args, changed=("kc", "vc"))
    want_q, want_k, want_v = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, [layer.parts for layer in layers],
                                                              position, 16, 10000.0, 1.0)

    def check(got, want):
        if dtype == mx.float32:
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
        else:
            _assert_close_to_rounded(got, want)

    check(q.reshape(2, 64), want_q)
    slot = position % capacity
    others = [s for s in range(capacity) if s != slot]
    for after, before, want in ((kc_after, kc, want_k), (vc_after, vc, want_v)):
        assert mx.array_equal(after[:, :, others], before[:, :, others])
        check(after[:, :, slot].reshape(2, 32), want)  # (sequence, kv head * head dim)


# stage: the CUDA-core body with x * gamma staged in shared memory once per block (2,080 inputs: the block's
# 256 threads stage 8 each in two rounds, the second partly idle).
@pytest.mark.parametrize("in_f,per_warp,stage", [(128, 4, False), (1024, 16, False), (128, 4, True),
                                                 (2080, 4, True)])
def test_swiglu_kernel_with_norm(tmp_path, in_f, per_warp, stage):
    gate, up = _layer(64, in_f, 31), _layer(64, in_f, 32)
    x = (2.0 * mx.random.normal((1, in_f))).astype(mx.bfloat16)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(mx.bfloat16)
    variant = Variant(2, swiglu=True, norm_eps=1e-6)
    args = qmv_plan.launch_args(1, in_f, (64, 64), variant, mx.bfloat16, per_warp)
    (y,) = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), QMV_HEADER,
                   _inputs([gate, up], x, gamma=gamma), ["y"], args)
    normed = qmv_cuda.reference_rms_norm(x, gamma, 1e-6)
    _assert_close_to_rounded(y, qmv_cuda.reference_swiglu(normed, gate.parts, up.parts))


# prefetch: blocks appended to the launch that only ask L2 for other arrays (``l2_prefetch``; the emulation
# has no L2, so they only return): the working blocks' results are unchanged.
@pytest.mark.parametrize("per_warp,prefetch", [(2, False), (16, False), (2, True), (16, True)])
def test_matmul_kernel_with_residual(tmp_path, per_warp, prefetch):
    layer = _layer(48, 256, 40)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    res = (4.0 * mx.random.normal((2, 48))).astype(mx.bfloat16)
    variant = Variant(1, residual=True)
    extra, ranges = {}, ()
    if prefetch:
        variant = Variant(1, residual=True, prefetch=2)
        extra = {"pf0": mx.zeros((64, 8), dtype=mx.uint32), "pf1": mx.ones((4096,), dtype=mx.bfloat16)}
        ranges = ((0, 2048), (128, 8192))
    with settings.override(prefetch_blocks=3):
        args = qmv_plan.launch_args(2, 256, (48,), variant, mx.bfloat16, per_warp, prefetch_ranges=ranges)
    (y,) = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args)),
                   QMV_HEADER + l2_prefetch.HEADER, _inputs([layer], x, res=res) | extra, ["y0"], args)
    _assert_close_to_rounded(y, qmv_cuda.reference(x, *layer.parts) + res.astype(mx.float32))


# 40 x 264: 33 words per row, 1,320 words in two blocks of 1,024 (a row across them, the last block partly idle).
@pytest.mark.parametrize("out_f,in_f,dtype", [(24, 256, mx.float32), (24, 256, mx.bfloat16), (40, 264, mx.bfloat16)])
def test_dequantize_kernel(tmp_path, out_f, in_f, dtype):
    layer = _layer(out_f, in_f, 5, dtype=mx.bfloat16)
    args = dequant_cuda.launch_args(out_f, in_f, dtype)
    (w,) = emulate(tmp_path, dequant_cuda.SOURCE, dequant_cuda.HEADER,
                   {"w": layer.weight, "scales": layer.scales, "biases": layer.biases}, ["y"], args)
    exact = dequantize(layer.weight, layer.scales, layer.biases, 4, None, mx.float32)
    if dtype == mx.float32:
        np.testing.assert_allclose(np.array(w), np.array(exact), rtol=0, atol=1e-6)  # fma vs mul + add
    else:
        assert mx.array_equal(w, exact.astype(mx.bfloat16))  # rounded once from the float32 value


@pytest.mark.parametrize("offset,capacity,heads", [(0, 32, (4, 2)), (9, 32, (4, 2)), (45, 32, (4, 2)),
                                                   (2, 256, (4, 2)), (70, 256, (6, 2)), (200, 256, (4, 4)),
                                                   (300, 256, (4, 1))])
def test_decode_attention_kernels(tmp_path, offset, capacity, heads):
    """Both passes, head dim 32: a ring before and after it wraps, several slot ranges (capacity 256: 4
    ranges, some empty while few slots are filled), 1 to 4 query heads per key/value head."""
    _check_decode_attention(tmp_path, offset, capacity, heads)


@pytest.mark.parametrize("threads,unroll", [(64, 2), (128, 4)])
def test_decode_attention_block_shapes(tmp_path, threads, unroll):
    """The first pass with other warps per block and slots per run (``attention_threads`` and
    ``attention_unroll``): runs that end inside a range, warps without slots."""
    with settings.override(attention_threads=threads, attention_unroll=unroll):
        _check_decode_attention(tmp_path, 70, 256, (4, 2))
        _check_decode_attention(tmp_path / "wrapped", 300, 64, (4, 1))


def test_decode_attention_block_fits_shared_memory():
    """Pass 1's block shrinks (halving its warps) only as far as its shared arrays need: Mistral's 4 query
    heads per key/value head keep ``attention_threads``; 16 heads of 128 dimensions take 4 warps."""
    limit = 48 * 1024
    for rep in range(1, 17):
        for D in (32, 64, 96, 128):
            threads = attention_cuda.partial_threads(rep, D)
            assert attention_cuda.partial_shared_bytes(threads, rep, D) <= limit
            assert threads == settings.current().attention_threads or (
                attention_cuda.partial_shared_bytes(2 * threads, rep, D) > limit)
    assert attention_cuda.partial_threads(4, 128) == 256
    assert attention_cuda.partial_threads(16, 128) == 128


@pytest.mark.parametrize("D,dtype", [(128, mx.float32), (128, mx.bfloat16), (64, mx.bfloat16)])
def test_decode_attention_kernels_head_dims(tmp_path, D, dtype):
    """Head dimensions of 128 (each lane's 4 values of a key or value row in one load: 16 bytes of float32,
    8 of bfloat16) and 64 (2 values, one load each); bfloat16 rounds the output once."""
    _check_decode_attention(tmp_path, 70, 128, (4, 2), D, dtype)


def test_decode_attention_with_prefetch_blocks(tmp_path):
    """Pass 1 with blocks that only prefetch the next kernel's arrays (``MLX_QLORA_PREFETCH``):
    the attention blocks' results are unchanged (the emulation has no L2: those blocks only return)."""
    prefetch = [mx.zeros((64, 16), dtype=mx.uint32), mx.ones((64, 1), dtype=mx.bfloat16)]
    with settings.override(prefetch_blocks=3):
        _check_decode_attention(tmp_path, 70, 256, (4, 2), prefetch=prefetch)


def _check_decode_attention(tmp_path, offset, capacity, heads, D=32, dtype=mx.float32, prefetch=None):
    mx.random.seed(offset)
    (H, HKV), B, C = heads, 2, capacity
    q = mx.random.normal((B, H, 1, D)).astype(dtype)
    keys, values = mx.random.normal((B, HKV, C, D)).astype(dtype), mx.random.normal((B, HKV, C, D)).astype(dtype)
    scale = D**-0.5
    arrays = prefetch or []
    partial_args, combine_args = attention_cuda.launch_args(B, H, HKV, D, C, dtype,
                                                            tuple((0, a.nbytes) for a in arrays))
    part_acc, part_ml = emulate(
        tmp_path / "partial", attention_cuda.partial_source(scale, settings.current().attention_unroll, len(arrays)),
        attention_cuda.PARTIAL_HEADER + l2_prefetch.HEADER,
        {"q": q, "k": keys, "v": values, "offset": mx.array([offset], dtype=mx.int32)}
        | {f"pf{i}": a for i, a in enumerate(arrays)},
        ["part_acc", "part_ml"], partial_args)
    (out,) = emulate(tmp_path / "combine", attention_cuda.combine_source(), "",
                     {"part_acc": part_acc, "part_ml": part_ml},
                     ["out"], combine_args)
    want = attention_cuda.reference(q, keys, values, offset, scale)
    if dtype == mx.float32:
        np.testing.assert_allclose(np.array(out), np.array(want), rtol=1e-5, atol=1e-5)
    else:
        _assert_close_to_rounded(out, want)


# ---- LoRA addends (``Variant.addend``): F * add<g> added to matrix g's float32 sums before the epilogue --------


def _check_qkv_written(q, kc_after, vc_after, want, slot: int, dtype):
    """q (2 sequences, 4 heads of 16) and the k and v written at ``slot`` of the cache against ``want``:
    float32 to summation order, bfloat16 to one rounding."""
    for got, ref in ((q.reshape(2, 64), want[0]), (kc_after[:, :, slot].reshape(2, 32), want[1]),
                     (vc_after[:, :, slot].reshape(2, 32), want[2])):
        if dtype == mx.float32:
            np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-4)
        else:
            _assert_close_to_rounded(got, ref)


def _addend_inputs(rows: int, sizes, adapted, dtype, seed: int):
    """Per matrix, None or (factor, addend (rows, N)) for the adapted ones; the addends of a LoRA's size."""
    mx.random.seed(seed)
    return [(0.5 + g, mx.random.normal((rows, n)).astype(dtype)) if on else None
            for g, (n, on) in enumerate(zip(sizes, adapted))]


@pytest.mark.parametrize("adapted,dtype,in_f,stage", [
    ((True, True, True), mx.bfloat16, 128, False), ((True, False, True), mx.bfloat16, 256, False),
    ((False, True, False), mx.float32, 128, True)])
def test_qkv_kernel_with_addends(tmp_path, adapted, dtype, in_f, stage):
    """q/k/v with RMSNorm, rotary embeddings and the cache write, with addends on a subset of the three:
    ``reference_qkv_norm_rope`` with the same addends (added before the rotation and the cache write).
    256 inputs in bfloat16: the tensor-core body; ``stage``: the CUDA-core body staging its input."""
    capacity, position = 8, 13
    layers = [_layer(n, in_f, 60 + i, dtype) for i, n in enumerate((64, 32, 32))]
    x = (3.0 * mx.random.normal((2, in_f))).astype(dtype)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(dtype)
    kc, vc = (mx.random.normal((2, 2, capacity, 16)).astype(dtype) for _ in range(2))
    addends = _addend_inputs(2, (64, 32, 32), adapted, dtype, 7)
    variant = Variant(3, norm_eps=1e-5, rope=(True, True, False), cache=True,
                      addend=tuple(None if a is None else a[0] for a in addends))
    per_warp = qmv_plan.MMA_ROWS if in_f >= 256 else 0
    args = qmv_plan.launch_args(2, in_f, (64, 32, 32), variant, dtype, per_warp, ((2, 4, 1, 16),), 16, capacity)
    assert qmv_plan.uses_mma(args) == (in_f >= 256)
    extra = {f"add{g}": a[1] for g, a in enumerate(addends) if a is not None}
    q, kc_after, vc_after = emulate(
        tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), QMV_HEADER,
        _inputs(layers, x, gamma=gamma, rope_pos=mx.array([position], dtype=mx.int32), kc=kc, vc=vc, **extra),
        variant.output_names, args, changed=("kc", "vc"))
    want = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, [layer.parts for layer in layers], position, 16,
                                            10000.0, 1.0, addends)
    _check_qkv_written(q, kc_after, vc_after, want, position % capacity, dtype)
    plain = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, [layer.parts for layer in layers], position, 16,
                                             10000.0, 1.0)
    for g, on in enumerate(adapted):  # the addends change exactly the adapted outputs
        assert bool(mx.any(mx.abs(want[g] - plain[g]) > 1e-3)) == on


@pytest.mark.parametrize("adapted,in_f,per_warp,stage,norm", [
    ((True, True), 128, 4, True, True), ((True, False), 1024, 16, False, True), ((False, True), 128, 2, False, True),
    ((True, True), 256, 16, False, False)])
def test_swiglu_kernel_with_addends(tmp_path, adapted, in_f, per_warp, stage, norm):
    """gate/up with SwiGLU (with and without the RMSNorm prologue), addends on gate, up or both, added before
    the activation: ``reference_swiglu`` with the same addends."""
    gate, up = _layer(64, in_f, 71), _layer(64, in_f, 72)
    x = (2.0 * mx.random.normal((2, in_f))).astype(mx.bfloat16)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(mx.bfloat16)
    addends = _addend_inputs(2, (64, 64), adapted, mx.bfloat16, 8)
    factors = tuple(None if a is None else a[0] for a in addends)
    variant = Variant(2, swiglu=True, norm_eps=1e-6 if norm else None, addend=factors)
    args = qmv_plan.launch_args(2, in_f, (64, 64), variant, mx.bfloat16, per_warp)
    extra = {f"add{g}": a[1] for g, a in enumerate(addends) if a is not None}
    (y,) = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), QMV_HEADER,
                   _inputs([gate, up], x, **({"gamma": gamma} if norm else {}), **extra), ["y"], args)
    normed = qmv_cuda.reference_rms_norm(x, gamma, 1e-6) if norm else x
    _assert_close_to_rounded(y, qmv_cuda.reference_swiglu(normed, gate.parts, up.parts, addends))


@pytest.mark.parametrize("per_warp", [2, 16])
def test_split_kernel_with_addends(tmp_path, per_warp):
    """Three weights of one input (``qmv_split``), the second without an addend."""
    layers = [_layer(n, 256, 80 + i) for i, n in enumerate((64, 32, 32))]
    x = mx.random.normal((3, 256)).astype(mx.bfloat16)
    addends = _addend_inputs(3, (64, 32, 32), (True, False, True), mx.bfloat16, 9)
    variant = Variant(3, addend=tuple(None if a is None else a[0] for a in addends))
    args = qmv_plan.launch_args(3, 256, (64, 32, 32), variant, mx.bfloat16, per_warp)
    extra = {f"add{g}": a[1] for g, a in enumerate(addends) if a is not None}
    outs = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args)), QMV_HEADER, _inputs(layers, x, **extra),
                   variant.output_names, args)
    for out, layer, addend in zip(outs, layers, addends):
        want = qmv_cuda.reference(x, *layer.parts)
        _assert_close_to_rounded(out, want if addend is None else want + addend[0] * addend[1].astype(mx.float32))


# ---- low-rank terms (``Variant.low_rank``): B's rows times the A-products h in the epilogue ----------------------

LOW_RANK_HEADER = QMV_HEADER + "\n" + qmv_source.LOW_RANK_HEADER


def _low_rank_inputs(rows: int, sizes, adapted, rank: int, dtype, seed: int) -> qmv_cuda.LowRank:
    """h (rows, rank * adapted) and per matrix None or (factor, first column, b (N, rank)), as ``LowRank``."""
    mx.random.seed(seed)
    n_adapted = sum(adapted)
    h = mx.random.normal((rows, rank * n_adapted)).astype(dtype)
    terms, col = [], 0
    for g, (n, on) in enumerate(zip(sizes, adapted)):
        if not on:
            terms.append(None)
            continue
        terms.append((0.5 + g, col, (0.1 * mx.random.normal((n, rank))).astype(dtype)))
        col += rank
    return h, terms


def _low_rank_extra(variant: Variant, low_rank) -> dict:
    _, arrays = qmv_cuda._low_rank(variant, low_rank)
    return dict(zip([n for n in variant.input_names if n == "lh" or n.startswith("lb")], arrays))


@pytest.mark.parametrize("adapted,dtype,in_f,stage", [
    ((True, True, True), mx.bfloat16, 128, False), ((True, False, True), mx.bfloat16, 256, False),
    ((False, True, False), mx.float32, 128, True), ((True, True, True), mx.bfloat16, 512, False)])
def test_qkv_kernel_with_low_rank_terms(tmp_path, adapted, dtype, in_f, stage):
    """q/k/v with RMSNorm, rotary embeddings and the cache write, low-rank terms on a subset of the three:
    the reference with the addends they amount to (h @ B.T times the row's 1/rms, added before the rotation
    and the cache write). 256 and 512 inputs in bfloat16: the tensor-core body (its 1/rms from the warps' sums)."""
    capacity, position = 8, 13
    layers = [_layer(n, in_f, 60 + i, dtype) for i, n in enumerate((64, 32, 32))]
    x = (3.0 * mx.random.normal((2, in_f))).astype(dtype)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(dtype)
    kc, vc = (mx.random.normal((2, 2, capacity, 16)).astype(dtype) for _ in range(2))
    low_rank = _low_rank_inputs(2, (64, 32, 32), adapted, 4, dtype, 7)
    variant, _ = qmv_cuda._low_rank(Variant(3, norm_eps=1e-5, rope=(True, True, False), cache=True), low_rank)
    per_warp = qmv_plan.MMA_ROWS if in_f >= 256 else 0
    args = qmv_plan.launch_args(2, in_f, (64, 32, 32), variant, dtype, per_warp, ((2, 4, 1, 16),), 16, capacity)
    assert qmv_plan.uses_mma(args) == (in_f >= 256)
    q, kc_after, vc_after = emulate(
        tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), LOW_RANK_HEADER,
        _inputs(layers, x, gamma=gamma, rope_pos=mx.array([position], dtype=mx.int32), kc=kc, vc=vc,
                **_low_rank_extra(variant, low_rank)),
        variant.output_names, args, changed=("kc", "vc"))
    addends = qmv_cuda.low_rank_addends(low_rank, qmv_cuda.reference_inv_rms(x, 1e-5))
    parts = [layer.parts for layer in layers]
    want = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, parts, position, 16, 10000.0, 1.0, addends)
    _check_qkv_written(q, kc_after, vc_after, want, position % capacity, dtype)
    plain = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, parts, position, 16, 10000.0, 1.0)
    for g, on in enumerate(adapted):  # the terms change exactly the adapted outputs
        assert bool(mx.any(mx.abs(want[g] - plain[g]) > 1e-3)) == on


@pytest.mark.parametrize("adapted,in_f,per_warp,stage", [
    ((True, True), 128, 4, True), ((True, False), 1024, 16, False), ((False, True), 128, 2, False),
    ((True, True), 256, 16, False)])
def test_swiglu_kernel_with_low_rank_terms(tmp_path, adapted, in_f, per_warp, stage):
    """gate/up with the RMSNorm prologue and SwiGLU, low-rank terms on gate, up or both (added before the
    activation, times the row's 1/rms): the reference with the addends they amount to."""
    gate, up = _layer(64, in_f, 71), _layer(64, in_f, 72)
    x = (2.0 * mx.random.normal((2, in_f))).astype(mx.bfloat16)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(mx.bfloat16)
    low_rank = _low_rank_inputs(2, (64, 64), adapted, 8, mx.bfloat16, 8)
    variant, _ = qmv_cuda._low_rank(Variant(2, swiglu=True, norm_eps=1e-6), low_rank)
    args = qmv_plan.launch_args(2, in_f, (64, 64), variant, mx.bfloat16, per_warp)
    (y,) = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), LOW_RANK_HEADER,
                   _inputs([gate, up], x, gamma=gamma, **_low_rank_extra(variant, low_rank)), ["y"], args)
    normed = qmv_cuda.reference_rms_norm(x, gamma, 1e-6)
    addends = qmv_cuda.low_rank_addends(low_rank, qmv_cuda.reference_inv_rms(x, 1e-6))
    want = qmv_cuda.reference_swiglu(normed, gate.parts, up.parts, addends)
    _assert_close_to_rounded(y, want, steps=2 if qmv_plan.uses_mma(args) else 1)
    assert float(mx.abs(want - qmv_cuda.reference_swiglu(normed, gate.parts, up.parts)).max()) > 1e-2


@pytest.mark.parametrize("per_warp", [2, 16])
def test_matmul_residual_kernel_with_a_low_rank_term(tmp_path, per_warp):
    """o_proj's and down_proj's launch: residual + x @ W.T + F * h @ B.T (no norm: no 1/rms)."""
    layer = _layer(48, 256, 40)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    res = (4.0 * mx.random.normal((2, 48))).astype(mx.bfloat16)
    low_rank = _low_rank_inputs(2, (48,), (True,), 16, mx.bfloat16, 9)
    variant, _ = qmv_cuda._low_rank(Variant(1, residual=True), low_rank)
    args = qmv_plan.launch_args(2, 256, (48,), variant, mx.bfloat16, per_warp)
    (y,) = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args)), LOW_RANK_HEADER,
                   _inputs([layer], x, res=res, **_low_rank_extra(variant, low_rank)), ["y0"], args)
    (factor, update), = qmv_cuda.low_rank_addends(low_rank)
    want = qmv_cuda.reference(x, *layer.parts) + res.astype(mx.float32) + factor * update
    _assert_close_to_rounded(y, want)
    assert float(mx.abs(factor * update).max()) > 0.1  # the term is far above the rounding


# ---- the layer's low-rank scratch: a launch writes the next launch's A-products (``Variant.emit_cols``), the
# first launch of the layer zeroes it (``Variant.zero``), a launch reads its low-rank terms from it --------------


def _scratch(size: int, seed: int) -> mx.array:
    mx.random.seed(seed)
    return mx.random.normal((size,))  # float32; what was there before


def _check_emitted(after: mx.array, before: mx.array, offset: int, y: mx.array, ea: mx.array):
    """``after`` is ``before`` plus y (as written, rounded) @ ea at [offset, offset + M * C), unchanged elsewhere
    (float32 sums in another order: 1e-4 relative to the largest term)."""
    rows, cols = y.reshape(-1, ea.shape[0]).shape[0], ea.shape[1]
    want = y.reshape(rows, -1).astype(mx.float32) @ ea.astype(mx.float32)  # (M, C)
    got = (after - before)[offset:offset + rows * cols].reshape(rows, cols)
    scale = float(mx.abs(want).max())
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-4 * scale + 1e-5)
    outside = mx.concatenate([mx.arange(offset), mx.arange(offset + rows * cols, before.size)])
    assert mx.array_equal(after[outside], before[outside])


@pytest.mark.parametrize("per_warp", [2, 4, 16])
def test_matmul_residual_kernel_emits_the_next_a_products(tmp_path, per_warp):
    """o_proj's launch: its output as before, and y @ ea added into the scratch at the offset (float atomics;
    per warp in the CUDA-core body, by warp 0 in the tensor-core body); nothing else of the scratch changes.
    Its own low-rank term read from the same scratch at another offset."""
    layer = _layer(64, 256, 41)
    x = mx.random.normal((2, 256)).astype(mx.bfloat16)
    res = (4.0 * mx.random.normal((2, 64))).astype(mx.bfloat16)
    ea = (0.1 * mx.random.normal((64, 24))).astype(mx.bfloat16)  # the next launch's A.T (N, C)
    scratch = _scratch(200, 3)
    (_, terms) = _low_rank_inputs(2, (64,), (True,), 16, mx.bfloat16, 9)
    low_rank = (scratch, terms)  # the term's h: rows of 16 from float 10 of the scratch
    variant, _ = qmv_cuda._low_rank(Variant(1, residual=True), low_rank, 10)
    variant, _ = qmv_cuda._emit_zero(variant, (ea, scratch, 100), None)
    args = qmv_plan.launch_args(2, 256, (64,), variant, mx.bfloat16, per_warp)
    assert qmv_plan.uses_mma(args) == (per_warp == 16)
    y, after = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args)), LOW_RANK_HEADER,
                       _inputs([layer], x, res=res, lh=scratch, lb0=terms[0][2], ea=ea, eh=scratch), ["y0"], args,
                       changed=("eh",))
    h = scratch[10:10 + 32].reshape(2, 16)
    (factor, update), = qmv_cuda.low_rank_addends((h, terms))
    _assert_close_to_rounded(y, qmv_cuda.reference(x, *layer.parts) + res.astype(mx.float32) + factor * update)
    _check_emitted(after, scratch, 100, y, ea)


@pytest.mark.parametrize("in_f,per_warp,stage", [(128, 4, True), (128, 2, False), (256, 16, False)])
def test_swiglu_kernel_reads_its_terms_from_the_scratch_and_emits_down_projs(tmp_path, in_f, per_warp, stage):
    """gate/up with the RMSNorm and SwiGLU, its low-rank terms read from the scratch, down_proj's A-products of
    its output added into the scratch."""
    gate, up = _layer(64, in_f, 73), _layer(64, in_f, 74)
    x = (2.0 * mx.random.normal((2, in_f))).astype(mx.bfloat16)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(mx.bfloat16)
    _, terms = _low_rank_inputs(2, (64, 64), (True, True), 8, mx.bfloat16, 11)
    scratch = _scratch(120, 4)
    ea = (0.1 * mx.random.normal((64, 16))).astype(mx.bfloat16)
    variant, _ = qmv_cuda._low_rank(Variant(2, swiglu=True, norm_eps=1e-6), (scratch, terms), 0)
    variant, _ = qmv_cuda._emit_zero(variant, (ea, scratch, 64), None)
    args = qmv_plan.launch_args(2, in_f, (64, 64), variant, mx.bfloat16, per_warp)
    y, after = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), LOW_RANK_HEADER,
                       _inputs([gate, up], x, gamma=gamma, lh=scratch, lb0=terms[0][2], lb1=terms[1][2], ea=ea,
                               eh=scratch), ["y"], args, changed=("eh",))
    normed = qmv_cuda.reference_rms_norm(x, gamma, 1e-6)
    addends = qmv_cuda.low_rank_addends((scratch[:32].reshape(2, 16), terms), qmv_cuda.reference_inv_rms(x, 1e-6))
    _assert_close_to_rounded(y, qmv_cuda.reference_swiglu(normed, gate.parts, up.parts, addends),
                             steps=2 if qmv_plan.uses_mma(args) else 1)
    _check_emitted(after, scratch, 64, y, ea)


@pytest.mark.parametrize("in_f,stage", [(128, False), (128, True), (256, False)])
def test_qkv_kernel_zeroes_the_layers_scratch(tmp_path, in_f, stage):
    """The first launch of the layer zeroes the whole scratch (block 0), and its outputs are unchanged."""
    layers = [_layer(n, in_f, 90 + i) for i, n in enumerate((64, 32, 32))]
    x = (3.0 * mx.random.normal((2, in_f))).astype(mx.bfloat16)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(mx.bfloat16)
    kc, vc = (mx.random.normal((2, 2, 8, 16)).astype(mx.bfloat16) for _ in range(2))
    scratch = _scratch(1000, 5)  # more floats than the block has threads
    variant, _ = qmv_cuda._emit_zero(Variant(3, norm_eps=1e-5, rope=(True, True, False), cache=True), None, scratch)
    args = qmv_plan.launch_args(2, in_f, (64, 32, 32), variant, mx.bfloat16, 16 if in_f >= 256 else 0,
                                ((2, 4, 1, 16),), 16, 8)
    q, zb = emulate(tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), QMV_HEADER,
                    _inputs(layers, x, gamma=gamma, rope_pos=mx.array([5], dtype=mx.int32), kc=kc, vc=vc,
                            zb=scratch), variant.output_names, args, changed=("zb",))
    assert float(mx.abs(zb).max()) == 0.0 and float(mx.abs(scratch).max()) > 0
    want = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, [layer.parts for layer in layers], 5, 16, 10000.0, 1.0)
    _assert_close_to_rounded(q.reshape(2, 64), want[0])


@pytest.mark.parametrize("D", [128, 64])
def test_decode_attention_combine_emits_o_projs_a_products(tmp_path, D):
    """Pass 2 with o_proj's A.T: its output as before, and out (rounded) @ ea added into the scratch (threads
    past the head dimension add nothing)."""
    mx.random.seed(12)
    B, H, HKV, C, offset = 2, 4, 2, 64, 40
    q = mx.random.normal((B, H, 1, D)).astype(mx.bfloat16)
    keys, values = (mx.random.normal((B, HKV, C, D)).astype(mx.bfloat16) for _ in range(2))
    partial_args, combine_args = attention_cuda.launch_args(B, H, HKV, D, C, mx.bfloat16)
    part_acc, part_ml = emulate(
        tmp_path / "partial", attention_cuda.partial_source(D**-0.5, settings.current().attention_unroll),
        attention_cuda.PARTIAL_HEADER, {"q": q, "k": keys, "v": values, "offset": mx.array([offset], dtype=mx.int32)},
        ["part_acc", "part_ml"], partial_args)
    ea = (0.1 * mx.random.normal((H * D, 16))).astype(mx.bfloat16)
    scratch = _scratch(100, 6)
    out, after = emulate(tmp_path / "combine", attention_cuda.combine_source(16, 48), "",
                         {"part_acc": part_acc, "part_ml": part_ml, "ea": ea, "eh": scratch}, ["out"], combine_args,
                         changed=("eh",))
    _assert_close_to_rounded(out, attention_cuda.reference(q, keys, values, offset, D**-0.5))
    _check_emitted(after, scratch, 48, out, ea)


@pytest.mark.parametrize("rows,in_f,cols,dtype", [(1, 4096, 48, mx.bfloat16), (3, 2080, 16, mx.bfloat16),
                                                  (2, 256, 5, mx.float32)])
def test_a_products_kernel(tmp_path, rows, in_f, cols, dtype):
    """``a_products``: x @ A.T in float32, one block per column (2,080 inputs: the threads' last round partly
    idle): the formula in float32, to float32 summation order."""
    mx.random.seed(rows)
    x = (2.0 * mx.random.normal((rows, in_f))).astype(dtype)
    a = (0.1 * mx.random.normal((cols, in_f))).astype(dtype)
    args = qmv_cuda.a_products_args(rows, in_f, cols, dtype)
    (h,) = emulate(tmp_path, qmv_cuda._a_products_kernel().source, QMV_HEADER, {"x": x, "a": a}, ["h"], args)
    want = x.astype(mx.float32) @ a.astype(mx.float32).T
    np.testing.assert_allclose(np.array(h), np.array(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("in_f,stage", [(128, False), (128, True), (256, False)])
def test_qkv_kernel_reads_its_terms_from_the_layer_befores_scratch(tmp_path, in_f, stage):
    """A layer's q/k/v launch as ``link`` wires it: its low-rank terms read from the layer before's scratch
    (float32, from an offset) while it zeroes its own layer's scratch."""
    capacity, position = 8, 13
    layers = [_layer(n, in_f, 95 + i) for i, n in enumerate((64, 32, 32))]
    x = (3.0 * mx.random.normal((2, in_f))).astype(mx.bfloat16)
    gamma = (1.0 + 0.1 * mx.random.normal((in_f,))).astype(mx.bfloat16)
    kc, vc = (mx.random.normal((2, 2, capacity, 16)).astype(mx.bfloat16) for _ in range(2))
    _, terms = _low_rank_inputs(2, (64, 32, 32), (True, True, True), 4, mx.bfloat16, 13)
    before, own = _scratch(60, 7), _scratch(40, 8)
    variant, _ = qmv_cuda._low_rank(Variant(3, norm_eps=1e-5, rope=(True, True, False), cache=True),
                                    (before, terms), 17)
    variant, _ = qmv_cuda._emit_zero(variant, None, own)
    args = qmv_plan.launch_args(2, in_f, (64, 32, 32), variant, mx.bfloat16, 16 if in_f >= 256 else 0,
                                ((2, 4, 1, 16),), 16, capacity)
    q, kc_after, vc_after, zb = emulate(
        tmp_path, variant.source(mma=qmv_plan.uses_mma(args), stage=stage), LOW_RANK_HEADER,
        _inputs(layers, x, gamma=gamma, rope_pos=mx.array([position], dtype=mx.int32), kc=kc, vc=vc, lh=before,
                lb0=terms[0][2], lb1=terms[1][2], lb2=terms[2][2], zb=own),
        variant.output_names, args, changed=("kc", "vc", "zb"))
    h = before[17:17 + 2 * 12].reshape(2, 12)
    addends = qmv_cuda.low_rank_addends((h, terms), qmv_cuda.reference_inv_rms(x, 1e-5))
    want = qmv_cuda.reference_qkv_norm_rope(x, gamma, 1e-5, [layer.parts for layer in layers], position, 16,
                                            10000.0, 1.0, addends)
    _check_qkv_written(q, kc_after, vc_after, want, position % capacity, mx.bfloat16)
    assert float(mx.abs(zb).max()) == 0.0
