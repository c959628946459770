"""The few-row per-row 4-bit CUDA path (``kernels/cuda/qmv.py``, planned in ``qmv_plan.py``): its formula
against the dequantized weight, and when it is taken. The kernel itself needs a CUDA GPU;
``benchmarks/qmv_probe.py`` checks it there against ``reference``."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qlora import settings
from mlx_qlora.quant import QuantizedLinear
from mlx_qlora.kernels.cuda import qmv as qmv_cuda
from mlx_qlora.kernels.cuda import qmv_plan, qmv_source
from mlx_qlora.kernels.cuda.qmv_source import Variant


@pytest.mark.parametrize("rows,out_f,in_f,dtype", [(1, 48, 64, mx.float32), (3, 40, 256, mx.float32),
                                                   (8, 16, 96, mx.bfloat16)])
def test_reference_formula_equals_the_dequantized_matmul(rows, out_f, in_f, dtype):
    mx.random.seed(rows)
    layer = QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=False), dtype=dtype)
    x = mx.random.normal((rows, in_f)).astype(dtype)
    got = qmv_cuda.reference(x, layer.weight, layer.scales, layer.biases)
    # exact: float64 of the same rounded inputs
    w = np.array(layer.dequantize(mx.float32), dtype=np.float64)
    want = np.array(x.astype(mx.float32), dtype=np.float64) @ w.T
    assert got.dtype == mx.float32 and got.shape == (rows, out_f)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_not_taken_off_cuda():
    assert not qmv_cuda.on_cuda()  # CI and this CPU: no CUDA device
    x = mx.zeros((1, 4096), dtype=mx.bfloat16)
    assert not qmv_cuda.supports(x, 4096, 4, None, 14336)


@pytest.mark.parametrize("shape,dtype,bits,group,out_f,taken", [
    ((1, 4096), mx.bfloat16, 4, None, 14336, True),     # batch-1 decoding of an MLP layer
    ((2, 4, 4096), mx.float32, 4, None, 14336, True),   # 8 rows
    ((9, 4096), mx.bfloat16, 4, None, 14336, False),    # too many rows: dequantize + matmul
    ((1, 4096), mx.float16, 4, None, 14336, False),     # a dtype the kernel does not read
    ((1, 4096), mx.bfloat16, 8, None, 14336, False),    # 8-bit
    ((1, 4096), mx.bfloat16, 4, 64, 14336, False),      # grouped: MLX's own layout
    ((1, 4096), mx.bfloat16, 4, None, 4096, False),     # a small layer: MLX's quantized_matmul is cheaper to call
    ((1, 4112), mx.bfloat16, 4, None, 14336, False),    # not whole 32-input blocks
])
def test_when_the_kernel_is_taken(monkeypatch, shape, dtype, bits, group, out_f, taken):
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    x = mx.zeros(shape, dtype=dtype)
    assert qmv_cuda.supports(x, shape[-1], bits, group, out_f) is taken


def test_settings_turn_the_kernel_off_and_move_its_threshold(monkeypatch):
    monkeypatch.setattr(qmv_cuda, "on_cuda", lambda: True)
    x = mx.zeros((1, 4096), dtype=mx.bfloat16)
    assert qmv_cuda.supports(x, 4096, 4, None, 14336) and not qmv_cuda.supports(x, 4096, 4, None, 4096)
    with settings.override(qmv=False):  # MLX_QLORA_QMV=mlx
        assert not qmv_cuda.supports(x, 4096, 4, None, 14336) and not qmv_cuda.supports(x, 4096, 4, None)
    with settings.override(qmv_min_weights=4096 * 4096):  # MLX_QLORA_QMV_MIN: a 4096 x 4096 layer alone too
        assert qmv_cuda.supports(x, 4096, 4, None, 4096)


def test_tensor_core_settings_reach_the_cached_launch_arguments():
    """The launch arguments are cached per shape and per settings: an override changes them, and leaving
    it gives the default's back."""
    gate, o = (1, 4096, (14336,), Variant(1), mx.bfloat16), (1, 4096, (4096,), Variant(1), mx.bfloat16)
    assert qmv_plan.uses_mma(qmv_plan.launch_args(*gate)) and not qmv_plan.uses_mma(qmv_plan.launch_args(*o))
    with settings.override(qmv_mma=False):  # MLX_QLORA_QMV_MMA=0
        assert not qmv_plan.uses_mma(qmv_plan.launch_args(*gate))
    with settings.override(qmv_mma_min_rows=4096):
        assert qmv_plan.uses_mma(qmv_plan.launch_args(*o))
    with settings.override(qmv_mma_warps=8):
        args = qmv_plan.launch_args(*gate)
        assert args["threadgroup"][0] == 8 * 32 and args["grid"][0] == 14336 // 16 * 8 * 32
    assert qmv_plan.launch_args(*gate)["threadgroup"][0] == 4 * 32
    with settings.override(qmv_min_warps=1024):  # 4 rows per warp where 1,024 warps remain
        assert dict(qmv_plan.launch_args(*o)["template"])["R"] == 4
    assert dict(qmv_plan.launch_args(*o)["template"])["R"] == 2


@pytest.mark.parametrize("out_rows,per_warp", [((14336,), 4), ((4096,), 2), ((1024,), 1), ((4096, 1024, 1024), 2),
                                               ((4100,), 2), ((4098,), 2), ((4097,), 1)])
def test_rows_per_warp_divides_every_matrix(out_rows, per_warp):
    got = qmv_plan.rows_per_warp(out_rows)
    assert got == per_warp
    assert all(n % got == 0 for n in out_rows)  # a warp never straddles two matrices


def test_launch_arguments():
    args = qmv_plan.launch_args(1, 4096, (14336,), Variant(1), mx.float32)
    template = dict(args["template"])
    assert template == {"T": mx.float32, "DT": 0, "M": 1, "K": 4096, "ROWS": 14336, "R": 4, "P": 1,
                        "N0": 14336, "N1": 0, "N2": 0}
    assert args["grid"][0] == 14336 // 4 * 32  # one warp per 4 output rows
    assert args["grid"][0] % args["threadgroup"][0] == 0
    assert args["output_shapes"] == [(1, 14336)]
    assert not qmv_plan.uses_mma(args)  # float32 inputs stay on the CUDA-core body


@pytest.mark.parametrize("rows,in_f,out_rows,norm,dtype,staged", [
    (1, 4096, (4096, 1024, 1024), True, mx.bfloat16, True),     # q/k/v: 16 KB of x * gamma in float32
    (2, 4096, (4096, 1024, 1024), True, mx.bfloat16, True),     # 32 KB
    (4, 4096, (4096, 1024, 1024), True, mx.bfloat16, False),    # 64 KB: read per warp
    (1, 4096, (4096,), False, mx.bfloat16, False),              # o: no norm, not staged
    (1, 14336, (4096,), False, mx.bfloat16, False),             # down
])
def test_when_the_input_is_staged(rows, in_f, out_rows, norm, dtype, staged):
    """``qmv_stage="norm"`` (the default): the CUDA-core RMSNorm launches whose float32 rows fit in
    ``qmv_stage_bytes``; ``none``: no launch."""
    variant = Variant(len(out_rows), norm_eps=1e-5 if norm else None)
    with settings.override(qmv_stage="norm", qmv_stage_bytes=32 * 1024):
        args = qmv_plan.launch_args(rows, in_f, out_rows, variant, dtype)
        assert not qmv_plan.uses_mma(args)
        assert qmv_plan.stages(variant, args) is staged
    assert qmv_plan.stage_bytes(rows, in_f) == rows * in_f * 4
    with settings.override(qmv_stage="none"):
        assert not qmv_plan.stages(variant, args)
    with settings.override(qmv_stage_bytes=64 * 1024):  # a larger bound: 4 rows of q/k/v fit too
        assert qmv_plan.stages(variant, args) is norm


@pytest.mark.parametrize("rows,in_f,out_rows,swiglu,takes,prefers", [
    (1, 4096, (14336,), False, True, True),                 # gate- or up-sized: the tensor cores by default
    (1, 4096, (14336, 14336), True, True, True),
    (1, 14336, (4096,), False, True, False),                # down: can (28 KB of inputs in shared memory)
    (4, 4096, (4096, 1024, 1024), False, True, False),      # q/k/v: can, but the CUDA-core body is faster
    (8, 4096, (14336,), False, False, True),                # 64 KB of inputs: more than 48 KB of shared memory
    (2, 14336, (4096,), False, False, False),
    (1, 4096 + 32, (14336,), False, False, True),           # K not 8 warps of whole chunks
    (1, 4096, (14344,), False, False, True),                # rows not whole tiles of 16
])
def test_when_the_tensor_core_body_is_taken(rows, in_f, out_rows, swiglu, takes, prefers):
    variant = Variant(2, swiglu=True) if swiglu else Variant(len(out_rows))
    assert qmv_plan.takes_mma(rows, in_f, out_rows, variant, mx.bfloat16) is takes
    args = qmv_plan.launch_args(rows, in_f, out_rows, variant, mx.bfloat16)
    assert qmv_plan.uses_mma(args) is (takes and prefers)
    assert not qmv_plan.takes_mma(rows, in_f, out_rows, variant, mx.float32)  # float32 inputs would be rounded
    if takes:  # asked for: a block of qmv_mma_warps warps per 16 rows (gate and up: 16 of each)
        forced = qmv_plan.launch_args(rows, in_f, out_rows, variant, mx.bfloat16, qmv_plan.MMA_ROWS)
        assert qmv_plan.uses_mma(forced)
        warps = settings.current().qmv_mma_warps
        assert forced["grid"][0] == (out_rows[0] if swiglu else sum(out_rows)) // 16 * 32 * warps
    else:
        with pytest.raises(ValueError, match="tensor-core"):
            qmv_plan.launch_args(rows, in_f, out_rows, variant, mx.bfloat16, qmv_plan.MMA_ROWS)


def test_launch_arguments_of_the_fused_kernels():
    qkv = qmv_plan.launch_args(1, 4096, (4096, 1024, 1024), Variant(3), mx.bfloat16,
                               shapes=((1, 32, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128)))
    assert dict(qkv["template"])["ROWS"] == 6144 and len(qkv["output_shapes"]) == 3
    assert qkv["output_shapes"][0] == (1, 32, 1, 128) and qkv["output_dtypes"] == [mx.bfloat16] * 3
    swiglu = qmv_plan.launch_args(2, 4096, (14336, 14336), Variant(2, swiglu=True), mx.float32)
    template = dict(swiglu["template"])
    assert template["ROWS"] == 14336 and template["P"] == 2  # gate and up rows of one index in one warp
    assert swiglu["output_shapes"] == [(2, 14336)]


def test_generated_sources_name_only_existing_inputs():
    for g in (1, 2, 3):
        code = qmv_source.select_split(g) + qmv_source.epilogue_split(g)
        assert all(f"w{i}" in code and f"y{i}" in code for i in range(g))
        assert f"w{g}" not in code and f"s{g}" not in code and f"y{g}" not in code


def test_swiglu_reference_formula():
    mx.random.seed(3)
    gate, up = (QuantizedLinear.from_linear(nn.Linear(64, 24, bias=False)) for _ in range(2))
    x = mx.random.normal((2, 64))
    got = qmv_cuda.reference_swiglu(x, (gate.weight, gate.scales, gate.biases), (up.weight, up.scales, up.biases))
    xd = np.array(x, dtype=np.float64)
    g = xd @ np.array(gate.dequantize(mx.float32), dtype=np.float64).T
    u = xd @ np.array(up.dequantize(mx.float32), dtype=np.float64).T
    np.testing.assert_allclose(np.array(got), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-5)


_ADDEND_TERM = r" \+ [0-9.e+-]+f \* load_res\(add\d, [^;]*?\)(?=\)?;| \+)"


@pytest.mark.parametrize("plain,adapted", [
    (Variant(3), (0.5, None, 2.0)),
    (Variant(2, swiglu=True, norm_eps=1e-5), (2.0, 2.0)),
    (Variant(3, norm_eps=1e-5, rope=(True, True, False), rope_scale=0.5, cache=True), (1.0, 2.0, 0.25)),
    (Variant(1, residual=True), (2.0,))])
def test_addends_only_add_terms_to_the_plain_kernels(plain, adapted):
    """A variant with LoRA addends is its plain variant's source plus one ``F * add<g>[...]`` term per
    adapted output value (the plain kernels stay the launches they were), in every body; its inputs are the
    plain ones plus ``add<g>`` of the adapted matrices, and its kernel name differs."""
    import re
    from dataclasses import replace

    variant = replace(plain, addend=adapted)
    bodies = [dict(), dict(mma=True)] + ([dict(stage=True)] if plain.norm_eps is not None else [])
    for body in bodies:
        with_terms = variant.source(**body)
        stripped, n_terms = re.subn(_ADDEND_TERM, "", with_terms)
        assert stripped == plain.source(**body)
        assert n_terms >= sum(f is not None for f in adapted)
        for g, f in enumerate(adapted):
            assert (f"{f!r}f * load_res(add{g}," in with_terms) == (f is not None)
    assert variant.input_names == plain.input_names + [f"add{g}" for g, f in enumerate(adapted) if f is not None]
    assert variant.name != plain.name and replace(plain, addend=(None,) * len(adapted)).name == plain.name
