"""Gemma 2 / Gemma 3 text GGUF export, read back by transformers' own GGUF loader (its name mapping and its
``norm - 1``, since llama.cpp stores Gemma's norms as ``1 + weight``): float32 logits within 1e-4.

transformers' loader and llama.cpp both fix what a Gemma GGUF does not say (``query_pre_attn_scalar``, the
layer pattern, Gemma 3's local RoPE base, Gemma 2's caps in the loader): the tiny models here take those
fixed values (head_dim 256 = the scalar, the default patterns, caps 50/30), and models that differ from
what llama.cpp would compute are refused in one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.errors import UserError
from mlx_qlora.gguf.writer import export_gguf
from mlx_qlora.model import load_model
from support import GEMMA_VOCAB, save_gemma

pytest.importorskip("gguf")
ATOL = 1e-4  # float32 logits
# what llama.cpp and transformers' GGUF loader assume for a Gemma of this shape
AS_LLAMA_CPP = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                    query_pre_attn_scalar=256, intermediate_size=96)
MODELS = {
    "gemma2": dict(num_hidden_layers=2, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(num_hidden_layers=6, rope_theta=1e6, rope_local_base_freq=1e4),
}


@pytest.fixture(scope="module", params=list(MODELS))
def folder(request, tmp_path_factory, tiny_spm_path):
    path = save_gemma(tmp_path_factory.mktemp("g") / request.param, request.param, seed=4,
                      **{**AS_LLAMA_CPP, **MODELS[request.param]})
    shutil.copy(tiny_spm_path, path / "tokenizer.model")
    return path


def test_transformers_reads_our_gguf_back(folder, tmp_path):
    import gguf
    import torch
    import transformers

    out = tmp_path / "model.gguf"
    export_gguf(folder, out, "f32")
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"}
    if "gemma3" in folder.name:
        per_layer |= {"attn_q_norm", "attn_k_norm"}
    n_layers = load_model(folder).args.num_hidden_layers
    assert names == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(n_layers) for t in per_layer}  # tied: no output.weight
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == {"gemma2": "gemma2", "gemma3_text": "gemma3"}[load_model(folder).args.model_type]
    norm = reader.get_tensor([t.name for t in reader.tensors].index("blk.0.post_ffw_norm.weight"))
    stored = load_model(folder).layers[0].post_feedforward_layernorm.weight
    np.testing.assert_allclose(np.array(norm.data), np.array(stored) + 1, atol=1e-6)  # llama.cpp's 1 + w

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                            dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, GEMMA_VOCAB, size=(2, 17))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(load_model(folder)(mx.array(ids))), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key, value, message", [
    ("query_pre_attn_scalar", 128, r"query_pre_attn_scalar: llama\.cpp scales attention by 256 \*\* -0\.5"),
    ("tie_word_embeddings", False, r"tie_word_embeddings: llama\.cpp's Gemma reads the head"),
])
def test_what_llama_cpp_would_compute_otherwise_is_refused(folder, tmp_path, key, value, message):
    bad = shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    if key == "tie_word_embeddings":  # an untied model needs its head
        from safetensors.numpy import load_file, save_file

        tensors = load_file(bad / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"cannot be exported to GGUF faithfully: " + message) as info:
        export_gguf(bad, tmp_path / "bad.gguf", "f32")
    assert "\n" not in str(info.value) and not (tmp_path / "bad.gguf").exists()


def test_import_gives_the_model_back(folder, tmp_path):
    """Our GGUF -> convert_checkpoint (GGUF import, full precision) -> the same model: config fields and
    float32 logits within 1e-5 (the norms went through 1 + w and back)."""
    from mlx_qlora.convert import convert_checkpoint

    out = tmp_path / "model.gguf"
    export_gguf(folder, out, "f32")
    convert_checkpoint(out, tmp_path / "back", dtype="float32", quantize=False, progress=False)
    original, back = load_model(folder), load_model(tmp_path / "back")
    for key in ("model_type", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "rope_theta", "rope_local_base_freq", "sliding_window", "head_dim",
                "tie_word_embeddings", "qk_norm"):
        assert getattr(back.args, key) == getattr(original.args, key), key
    ids = mx.array(np.random.default_rng(1).integers(0, GEMMA_VOCAB, size=(2, 17)))
    np.testing.assert_allclose(np.array(back(ids)), np.array(original(ids)), atol=1e-5, rtol=0)
