"""Gemma 2 and Gemma 3 (text) through every script: convert_weights.py (4-bit) -> prepare_data.py with the
model's chat template -> finetune.py (LoRA on all seven projections) -> generate.py -> merge_adapters.py
(lossless, into the original weights) -> transformers loads the merged folder; our adapters load in PEFT and
PEFT's load here, logits within 1e-4 (float32) both ways; GGUF export of a model that llama.cpp would compute
differently (here: query_pre_attn_scalar 24 against head_dim 16; Gemma 3's layer pattern) is refused in one line
before any work
(tests/gguf/test_gemma_gguf.py exports the models it takes).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.generate.loading import attach_adapters
from mlx_qlora.model import load_model
from support import GEMMA_VOCAB, run_script, save_gemma, script_output

pytestmark = pytest.mark.slow  # five script runs per family, about 15 s each family on two cores

ATOL = 1e-4  # float32 logits
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Gemma's turn format; the answer ends with EOS, which the chat-template cut needs (data/chat_template.py)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'model' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
FAMILIES = {
    "gemma2": dict(attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
    "gemma3_text": dict(sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def _reference(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def chain(request, tmp_path_factory, tiny_spm_path):
    """The folders of the whole chain for one family."""
    root = tmp_path_factory.mktemp(request.param)
    hf = save_gemma(root / "hf", request.param, seed=1, bos_token_id=1, eos_token_id=2, **FAMILIES[request.param])
    shutil.copy(tiny_spm_path, hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    q4 = root / "q4"
    script_output(run_script("convert_weights.py", "--hf-path", str(hf), "--mlx-path", str(q4), "--dtype", "float32"))
    data = root / "data"
    script_output(run_script("prepare_data.py", "--tokenizer", str(q4), "--out", str(data), "--template", "chat",
                             "--max-seq-len", "96", "--min-response-tokens", "4", "--no-progress"))
    run = root / "run"
    script_output(run_script("finetune.py", "--model", str(q4), "--data", str(data), "--out", str(run), "--iters", "4",
                             "--batch-size", "2", "--learning-rate", "1e-2", "--lora-rank", "4", "--lora-alpha", "8",
                             "--eval-every", "4", "--eval-batches", "1", "--save-every", "100", "--no-progress"))
    return {"family": request.param, "hf": hf, "q4": q4, "data": data, "run": run, "root": root}


def test_convert_keeps_the_family_and_quantizes_all_seven_projections(chain):
    model = load_model(chain["q4"])
    assert model.args.model_type == chain["family"]
    config = json.loads((chain["q4"] / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    layer = model.layers[0]
    quantized = [name for name in TARGETS
                 if type(getattr(layer.self_attn if name[0] in "qkvo" else layer.mlp, name)).__name__ == "QuantizedLinear"]
    assert quantized == TARGETS


def test_finetune_trained_all_seven_projections(chain):
    adapter_config = json.loads((chain["run"] / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(TARGETS)
    losses = [json.loads(line) for line in (chain["run"] / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in losses if "loss" in m)


def test_generate_script_answers_with_the_chat_template(chain):
    out = script_output(run_script("generate.py", "--model", str(chain["q4"]), "--adapter", str(chain["run"]),
                                   "--prompt", "Name a river.", "--max-tokens", "6"))
    assert out.strip()


def test_adapters_load_in_peft_with_equal_logits(chain):
    """Ours -> PEFT: the run's adapters on the original full-precision model, both sides float32."""
    from peft import PeftModel

    ids = np.random.default_rng(2).integers(3, GEMMA_VOCAB, size=(2, 20))
    ours = load_model(chain["hf"])
    attach_adapters(ours, chain["run"])
    peft_model = PeftModel.from_pretrained(_reference(chain["hf"]), str(chain["run"])).eval()
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _torch_logits(peft_model, ids), atol=ATOL, rtol=0)
    plain = _torch_logits(_reference(chain["hf"]), ids)
    assert np.abs(plain - _torch_logits(peft_model, ids)).max() > 100 * ATOL  # the adapters did change the model


def test_peft_adapters_load_here_with_equal_logits(chain, tmp_path):
    """PEFT -> ours: a PEFT LoRA on all seven projections, B non-zero, saved by PEFT and attached here."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(_reference(chain["hf"]), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(4).integers(3, GEMMA_VOCAB, size=(2, 20))
    ours = load_model(chain["hf"])
    attach_adapters(ours, tmp_path / "peft")
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), _torch_logits(peft_model.eval(), ids), atol=ATOL,
                               rtol=0)


def test_merge_is_lossless_and_transformers_loads_it(chain):
    merged = chain["root"] / "merged"
    out = script_output(run_script("merge_adapters.py", "--model", str(chain["q4"]), "--adapter", str(chain["run"]),
                                   "--base-weights", str(chain["hf"]), "--out", str(merged), "--dtype", "float32"))
    assert "lossless merge" in out
    ids = np.random.default_rng(5).integers(3, GEMMA_VOCAB, size=(2, 20))
    ours = load_model(chain["hf"])
    attach_adapters(ours, chain["run"])
    theirs = _reference(merged)
    assert type(theirs).__name__ == {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[chain["family"]]
    np.testing.assert_allclose(_torch_logits(theirs, ids), np.array(ours(mx.array(ids))), atol=ATOL, rtol=0)
    # the norms are stored as the checkpoint stores them (w, not 1 + w)
    from safetensors.numpy import load_file

    stored = {}
    for f in sorted(merged.glob("*.safetensors")):
        stored.update(load_file(f))
    original = {}
    for f in sorted(chain["hf"].glob("*.safetensors")):
        original.update(load_file(f))
    key = "model.layers.0.pre_feedforward_layernorm.weight"
    np.testing.assert_array_equal(stored[key], original[key])


def test_unfaithful_gguf_export_is_refused_in_one_line(chain):
    done = run_script("merge_adapters.py", "--model", str(chain["q4"]), "--adapter", str(chain["run"]),
                      "--out", str(chain["root"] / "m2"), "--gguf", str(chain["root"] / "m.gguf"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot be exported to GGUF faithfully: " in done.stderr
    assert not (chain["root"] / "m2").exists() and not (chain["root"] / "m.gguf").exists()
