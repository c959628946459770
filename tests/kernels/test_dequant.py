"""The per-row 4-bit dequantization kernel for CUDA (``kernels/cuda/dequant.py``): when it is taken, its
launch shape and the float tricks it relies on. The kernel runs on CUDA only; ``benchmarks/dequant_probe.py``
checks it there against the float32 ``dequantize`` (itself checked against float64 in test_quantize.py)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qlora import settings
from mlx_qlora.kernels.cuda import dequant as dequant_cuda


def test_default_and_taken_only_for_per_row_4bit(monkeypatch):
    wq = mx.zeros((64, 16), dtype=mx.uint32)  # 64 x 128 weights
    monkeypatch.setattr(dequant_cuda, "on_cuda", lambda: True)
    with settings.override(dequant=False):  # MLX_QLORA_DEQUANT=mlx
        assert not dequant_cuda.supports(wq, 4, None, mx.bfloat16)
    assert settings.KernelSettings().dequant  # the default
    with settings.override(dequant=True):
        assert dequant_cuda.supports(wq, 4, None, mx.bfloat16)
        assert dequant_cuda.supports(wq, 4, None, mx.float32) and dequant_cuda.supports(wq, 4, None, mx.float16)
        assert not dequant_cuda.supports(wq, 4, 64, mx.bfloat16)  # grouped
        assert not dequant_cuda.supports(wq, 8, None, mx.bfloat16)
        monkeypatch.setattr(dequant_cuda, "on_cuda", lambda: False)
        assert not dequant_cuda.supports(wq, 4, None, mx.bfloat16)


@pytest.mark.parametrize("words", [4, 2, 8])
def test_launch_covers_every_word_once(words):
    """Blocks of 256 threads, each converting ``dequant_words`` words (4 by default)."""
    with settings.override(dequant_words=words):
        args = dequant_cuda.launch_args(14336, 4096, mx.bfloat16)
    template = dict(args["template"])
    assert {k: template[k] for k in ("DT", "N", "K", "PER")} == {"DT": 1, "N": 14336, "K": 4096, "PER": words}
    threads, block = args["grid"][0], args["threadgroup"][0]
    total = 14336 * 4096 // 8
    per_block = block * template["PER"]
    assert threads % block == 0 and total <= threads // block * per_block < total + per_block
    assert args["output_shapes"] == [(14336, 4096)] and args["output_dtypes"] == [mx.bfloat16]


def test_nibble_to_float_trick_is_exact():
    """The kernel reads q as float(0x4b000000 | q) - 2**23 (no integer conversion)."""
    words = np.random.default_rng(0).integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32)
    for i in range(8):
        q = (words >> np.uint32(4 * i)) & np.uint32(0xF)
        as_float = (np.uint32(0x4B000000) | q).view(np.float32) - np.float32(8388608.0)
        np.testing.assert_array_equal(as_float, q.astype(np.float32))
