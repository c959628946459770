"""Qwen2, Qwen3 and Phi-3 through every script, each a fresh process as a user runs it: convert_weights.py (4-bit,
biases kept un-quantized) -> prepare_data.py with the model's ChatML template -> finetune.py (2 steps, LoRA
on all seven projections) -> the adapters in PEFT (logits within 1e-4) -> merge_adapters.py with --gguf -> transformers loads the merged folder and, with its GGUF loader, the GGUF file
(logits within 1e-4) -> convert_weights.py imports the GGUF back -> generate.py answers a chat prompt. Tiny random checkpoints
from transformers, a byte-level BPE tokenizer with ChatML's special tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.generate.loading import attach_adapters
from mlx_qlora.model import load_model
from support import make_family_checkpoint, randomize_peft_lora, write_adapters, write_chatml_tokenizer

pytestmark = pytest.mark.slow  # about 20 s per family on two CPU cores

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # float32 logits
SPECIAL = dict(bos_token_id=None, eos_token_id=319, pad_token_id=317)  # the tokenizer's ChatML ids
FAMILIES = {
    # tied embeddings, a window of 8 on layers 1 and 2, q/k/v biases
    "qwen2": dict(num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
                  max_window_layers=1),
    # untied, head_dim 128 (Qwen3's; transformers' GGUF loader does not read attention.key_length)
    "qwen3": dict(head_dim=128, num_key_value_heads=1),
    # fused qkv_proj / gate_up_proj, longrope past 32 positions, 3/4 of each head rotated
    "phi3": dict(original_max_position_embeddings=32, partial_rotary_factor=0.75, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
        "long_factor": [2.0 + 0.3 * i for i in range(6)]}),
}
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the layers LoRA adapts by default: the seven, or Phi-3's fused four (PEFT's names)
TARGETS = {"qwen2": SEVEN, "qwen3": SEVEN, "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _script(name: str) -> str:
    return str(ROOT / "scripts" / name)


def _hf(path, **kwargs):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32, **kwargs).eval()


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory) -> dict:
    """The whole chain for one family; the paths it made."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    lines = [json.loads(line)["response"] for line in (ROOT / "data" / "sample" / "dolly_sample.jsonl").open()]
    full = make_family_checkpoint(root / "full", arch, **FAMILIES[arch], **SPECIAL)
    write_chatml_tokenizer(full, 320, lines)
    q4, data, run, merged = root / "q4", root / "data", root / "run", root / "merged"
    _run(_script("convert_weights.py"), "--hf-path", str(full), "--mlx-path", str(q4), "--dtype", "float32")
    _run(_script("prepare_data.py"), "--tokenizer", str(q4), "--out", str(data), "--template", "chat",
         "--max-seq-len", "128", "--no-progress")
    _run(_script("finetune.py"), "--model", str(q4), "--data", str(data), "--out", str(run), "--iters", "2",
         "--batch-size", "2", "--lora-rank", "4", "--learning-rate", "1e-2", "--no-progress")
    gguf = ["--gguf", str(root / "merged.gguf"), "--gguf-type", "f32"]
    _run(_script("merge_adapters.py"), "--model", str(q4), "--adapter", str(run), "--base-weights", str(full),
         "--out", str(merged), *gguf)
    return {"arch": arch, "root": root, "full": full, "q4": q4, "data": data, "run": run, "merged": merged,
            "gguf": root / "merged.gguf"}


def test_converted_model_keeps_biases_and_norms_unquantized(family_run):
    """The 4-bit folder: projections packed, their linear biases (Qwen2) and q/k norms (Qwen3) as they were,
    nothing else changed."""
    q4 = load_model(family_run["q4"])
    full = load_model(family_run["full"])
    attn, ref = q4.layers[0].self_attn, full.layers[0].self_attn
    if family_run["arch"] == "qwen2":
        np.testing.assert_array_equal(np.array(attn.q_proj.bias), np.array(ref.q_proj.bias))
        assert "bias" not in attn.o_proj
    elif family_run["arch"] == "phi3":
        assert attn.qkv_proj.weight.dtype == mx.uint32 and q4.layers[0].mlp.gate_up_proj.weight.dtype == mx.uint32
    else:
        np.testing.assert_array_equal(np.array(attn.q_norm.weight), np.array(ref.q_norm.weight))
    # the 4-bit model is the full one with its projection weights (only those) replaced by their 4-bit values
    from mlx.utils import tree_unflatten

    from mlx_qlora.model.modules import decoder_projections

    swaps = [(f"{path}.weight", module.dequantize(mx.float32)) for path, _, _, module in decoder_projections(q4)]
    full.update(tree_unflatten(swaps))
    ids = mx.array(np.random.default_rng(0).integers(0, 320, size=(1, 24)))
    np.testing.assert_allclose(np.array(q4(ids)), np.array(full(ids)), atol=ATOL, rtol=0)


def test_trained_adapters_cover_all_seven_projections_and_load_in_peft(family_run):
    """finetune.py's adapters (all seven projections of every layer; Phi-3's four fused and plain layers) give,
    in PEFT over transformers' model, the logits of our full-precision model with them attached."""
    from peft import PeftModel

    config = json.loads((family_run["run"] / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(TARGETS[family_run["arch"]])
    run_config = json.loads((family_run["run"] / "run_config.json").read_text())
    assert set(run_config["lora"]["targets"]) == set(TARGETS[family_run["arch"]])
    ids = np.random.default_rng(1).integers(0, 320, size=(2, 20))
    peft_model = PeftModel.from_pretrained(_hf(family_run["full"]), family_run["run"]).eval()
    ours = load_model(family_run["full"])
    attach_adapters(ours, family_run["run"])
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _hf_logits(peft_model, ids), atol=ATOL, rtol=0)


def test_random_adapters_both_ways_with_peft(family_run, tmp_path):
    """Adapters far from zero (so a mistake shows): ours in PEFT, and PEFT's in ours, logits within 1e-4."""
    import peft

    full = family_run["full"]
    ids = np.random.default_rng(2).integers(0, 320, size=(2, 20))
    ours = load_model(full)
    folder = write_adapters(tmp_path / "ours", ours.args, rank=4, std=0.2, targets=TARGETS[family_run["arch"]])
    attach_adapters(ours, folder)
    peft_model = peft.PeftModel.from_pretrained(_hf(full), folder).eval()
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _hf_logits(peft_model, ids), atol=ATOL, rtol=0)

    some = TARGETS[family_run["arch"]][1:3]
    model = peft.get_peft_model(_hf(full), peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(some)))
    randomize_peft_lora(model, std=0.2)
    model.save_pretrained(tmp_path / "peft")
    ours = load_model(full)
    attach_adapters(ours, tmp_path / "peft")
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _hf_logits(model.eval(), ids), atol=ATOL, rtol=0)


def test_transformers_loads_the_merged_folder(family_run):
    """The merged folder is a transformers model of the family (architecture, biases, q/k norms, window)
    whose logits equal PEFT's merge of the same adapters into the original weights."""
    from peft import PeftModel

    merged = family_run["merged"]
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == family_run["arch"] and "quantization" not in config
    ref = _hf(merged)
    assert type(ref).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                  "phi3": "Phi3ForCausalLM"}[family_run["arch"]]
    expected = PeftModel.from_pretrained(_hf(family_run["full"]), family_run["run"]).merge_and_unload().eval()
    ids = np.random.default_rng(3).integers(0, 320, size=(2, 24))
    np.testing.assert_allclose(_hf_logits(ref, ids), _hf_logits(expected, ids), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(load_model(merged)(mx.array(ids))), _hf_logits(ref, ids), atol=ATOL, rtol=0)


def test_gguf_export_reads_back_in_transformers_and_in_ours(family_run, tmp_path):
    """merge_adapters.py --gguf (f32): transformers' GGUF loader builds the family's model with the merged
    logits; convert_weights.py imports the file back (no q/k row reordering for Qwen) to the same logits."""
    if family_run["arch"] == "phi3":  # its longrope factors go out as llama.cpp's rope_factors tensors
        from mlx_qlora.gguf.reader import open_gguf

        assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= {
            t.name for t in open_gguf(family_run["gguf"]).tensors}
        out = subprocess.run([sys.executable, str(_script("convert_weights.py")), "--hf-path", str(family_run["gguf"]),
                              "--mlx-path", str(tmp_path / "back")], capture_output=True, text=True)
        # one line: this Phi-3 also rotates part of each head, which the reader names first
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
        assert "rope.dimension_count" in out.stderr or "rope_factors_long" in out.stderr
        return  # the factors' values and metadata: tests/model/test_phi3.py
    gguf_file = family_run["gguf"]
    ids = np.random.default_rng(4).integers(0, 320, size=(2, 8))  # within the window: llama.cpp has none
    merged = _hf_logits(_hf(family_run["merged"]), ids)
    from_gguf = _hf(gguf_file.parent, gguf_file=gguf_file.name)
    assert from_gguf.config.model_type == family_run["arch"]
    np.testing.assert_allclose(_hf_logits(from_gguf, ids), merged, atol=ATOL, rtol=0)
    back = tmp_path / "back"
    _run(_script("convert_weights.py"), "--hf-path", str(gguf_file), "--mlx-path", str(back), "--no-quantize",
         "--dtype", "float32")
    model = load_model(back)
    assert model.args.model_type == family_run["arch"]
    np.testing.assert_allclose(np.array(model(mx.array(ids))), merged, atol=ATOL, rtol=0)
    # the tokenizer went out as llama.cpp's "qwen2" splitting rule and came back the same
    from mlx_qlora.data.tokenizer import load_tokenizer
    from mlx_qlora.gguf.reader import open_gguf, read_metadata

    assert read_metadata(open_gguf(gguf_file))["tokenizer.ggml.pre"] == "qwen2"
    text = "In 1995, 12345 rivers cost $3.50!\n<|im_start|>user\nWhy?<|im_end|>"
    original, imported = load_tokenizer(family_run["full"]), load_tokenizer(back)
    assert imported.encode(text) == original.encode(text)
    assert (imported.eos_id, imported.chat_template) == (original.eos_id, original.chat_template)


def test_generate_answers_with_the_chat_template(family_run):
    """generate.py over the 4-bit model and the adapters renders the ChatML prompt and stops at <|im_end|>
    or the token limit."""
    out = _run(_script("generate.py"), "--model", str(family_run["q4"]), "--adapter", str(family_run["run"]),
               "--prompt", "Name a river.", "--max-tokens", "6")
    assert out.strip()
