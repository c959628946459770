"""Our CUDA kernels through the real NVRTC, without a GPU (``kernels/cuda/nvrtc.py``): every launch of one
fused decoder layer's decoding step, with LoRA adapters on all seven projections and without, compiles for
sm_90a into a cubin (an ELF for the CUDA machine), and nvFatbin's compressed image of it
(``kernels/cuda/fatbin.py``) is a fatbin a few times smaller. The emulated tests check what the kernels
compute; this checks that CUDA's own compiler takes their text. NVRTC, CUDA's headers and nvFatbin come
from the ``nvidia`` wheels of requirements-dev.txt (Linux x86-64)."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qlora import settings
from mlx_qlora.config import LoRAConfig
from mlx_qlora.generate.decode_step import _prepare_decoding
from mlx_qlora.kernels.cuda import attention as attention_cuda
from mlx_qlora.kernels.cuda import fatbin, kernel_cache, nvrtc
from mlx_qlora.kernels.cuda import qmv as qmv_cuda
from mlx_qlora.lora import apply_lora
from mlx_qlora.model import fused_decode
from mlx_qlora.model.modules import quantize_model
from mlx_qlora.model.static_cache import StaticKVCache

from support import random_adapters, tiny_model

EM_CUDA = 190  # ELF e_machine of a cubin
FATBIN_MAGIC = 0xBA55ED50

needs_nvrtc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the nvidia wheels are Linux's")

# Mistral's layout at a small width
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=1, vocab_size=64, max_position_embeddings=256)


def _launches(monkeypatch, adapters: bool) -> list[tuple[str, str]]:
    """(kernel name, translation unit) of each launch of one fused decoding step of a bfloat16 layer."""
    model = tiny_model(seed=0, **SHAPE)
    quantize_model(model, bits=4)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if adapters:
        params, _ = random_adapters(model.args, rank=8, targets=targets, std=0.3)
        apply_lora(model, LoRAConfig(rank=8, alpha=16.0, targets=targets))
        wanted = {k for k, _ in tree_flatten(model.trainable_parameters())}
        model.update(tree_unflatten([(k, v) for k, v in params.items() if k in wanted]))
    model.set_dtype(mx.bfloat16)
    model.eval()
    monkeypatch.setattr(qmv_cuda, "supports", lambda *a, **k: True)  # the CPU: no CUDA device to ask
    monkeypatch.setattr(attention_cuda, "supports_shapes", lambda *a, **k: True)
    recorded = []

    def record(self, *, inputs, template=(), grid, threadgroup, output_shapes, output_dtypes, **kw):
        recorded.append(self.text([a.dtype for a in inputs], output_dtypes, template))  # what build compiles
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(kernel_cache.Kernel, "__call__", record)
    layer = model.model.layers[0]
    a = layer.self_attn
    keys = [mx.zeros((1, a.n_kv_heads, 128, a.head_dim), dtype=mx.bfloat16) for _ in range(2)]
    x = mx.zeros((1, 1, SHAPE["hidden_size"]), dtype=mx.bfloat16)
    cache = StaticKVCache(*keys, mx.array(0))
    with settings.override(fused_decode=True, qmv_mma_min_rows=1024):  # gate/up alone take the mma body
        _prepare_decoding(model)
        assert fused_decode.applies(layer, x, cache)
        fused_decode.layer_step(layer, x, cache)
    return recorded


@needs_nvrtc
@pytest.mark.parametrize("adapters", [False, True])
def test_the_fused_layer_kernels_compile_with_nvrtc(monkeypatch, adapters):
    try:
        nvrtc.library()
    except nvrtc.CompileError:
        pytest.fail("NVRTC not found: install requirements-dev.txt (nvidia-cuda-nvrtc-cu12)")
    launches = _launches(monkeypatch, adapters)
    names = [name for name, _ in launches]
    # both bodies of the few-row kernel: q/k/v's staged CUDA-core body, gate/up's tensor-core one
    assert any("split3_norm_rope" in n and "staged" in n for n in names)
    assert any("swiglu_norm" in n and "mma" in n for n in names)
    assert any(("lr" in n) for n in names) == adapters
    assert len(launches) == (7 if adapters else 6)  # with adapters: the first layer's A-products too
    for name, text in launches:
        cubin = nvrtc.compile_cubin(text, name, "sm_90a")
        assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == EM_CUDA, name
        image = fatbin.wrap(cubin, "sm_90a", "size")
        assert image is not None, "nvFatbin not found: install requirements-dev.txt (nvidia-nvfatbin-cu12)"
        assert int.from_bytes(image[:4], "little") == FATBIN_MAGIC
        assert len(image) < len(cubin) / 2, (name, len(image), len(cubin))
