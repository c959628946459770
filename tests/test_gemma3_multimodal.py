"""Gemma 3's multimodal checkpoints (``model_type: gemma3``, ``Gemma3ForConditionalGeneration``) read as text
models: a tiny random multimodal model saved by transformers (its own key layout, ``language_model.model.*``,
and transformers 5's module names, ``model.language_model.*``) converts to a text-only ``gemma3_text`` folder
whose float32 logits equal the multimodal model's on text-only input within 1e-4; a PEFT LoRA made on the
multimodal model's language model loads here with equal logits; and the whole chain (4-bit convert, prepare,
finetune, lossless merge into the multimodal original) ends in a ``Gemma3ForCausalLM`` folder transformers loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.convert import convert_checkpoint
from mlx_qlora.generate.loading import attach_adapters
from mlx_qlora.model import load_model
from support import GEMMA_VOCAB, TINY_GEMMA, run_script, script_output

ATOL = 1e-4  # float32 logits
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# local and global layers alternating, a linearly scaled global RoPE: the text features of Gemma 3 4B+
TEXT = dict(TINY_GEMMA, sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, image_size=28, patch_size=14)
# transformers 5's module names, as a checkpoint saved with them holds them (transformers' own save_pretrained
# writes the older layout)
NEW_LAYOUT = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'model' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def save_multimodal(path: Path, seed: int = 0, tied: bool = True, new_layout: bool = False):
    """A random ``Gemma3ForConditionalGeneration`` (tiny text and vision configs, weights of std 0.1, random
    norm weights) saved to ``path``; returns the torch model (float32, eager attention)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.Gemma3Config(text_config=dict(TEXT, tie_word_embeddings=tied), vision_config=VISION,
                                       mm_tokens_per_image=4, boi_token_index=GEMMA_VOCAB - 3,
                                       eoi_token_index=GEMMA_VOCAB - 2, image_token_index=GEMMA_VOCAB - 1,
                                       tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((0.3 if "norm" in name else 0.1) * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if new_layout:
        file = path / "model.safetensors"
        tensors = load_file(file)
        renamed = {}
        for key, value in tensors.items():
            old = next((o for o, _ in NEW_LAYOUT if key.startswith(o)), None)
            renamed[key if old is None else dict(NEW_LAYOUT)[old] + key[len(old):]] = value
        assert any(k.startswith("model.language_model.") for k in renamed)
        save_file(renamed, file, metadata={"format": "pt"})
    return model


def _logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("tied,new_layout", [(True, False), (False, True)])
def test_converted_text_model_equals_the_multimodal_model_on_text(tmp_path, tied, new_layout):
    reference = save_multimodal(tmp_path / "hf", seed=1, tied=tied, new_layout=new_layout)
    result = convert_checkpoint(tmp_path / "hf", tmp_path / "mlx", quantize=False, dtype="float32", progress=False)
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert "text_config" not in config and "vision_config" not in config
    meta = json.loads((tmp_path / "mlx" / "mlx_qlora.json").read_text())["converted"]["multimodal"]
    assert meta["architecture"] == "Gemma3ForConditionalGeneration"
    assert set(meta["dropped"]) == {"vision_tower", "multi_modal_projector"} == set(result.dropped)
    n_vision = sum(1 for name, _ in reference.named_parameters() if "vision_tower" in name)
    assert meta["dropped"]["vision_tower"]["tensors"] == n_vision
    assert "dropped multi_modal_projector" in result.dropped_line()

    ids = np.random.default_rng(2).integers(3, GEMMA_VOCAB - 3, size=(2, 20))  # no image token
    expected = _logits(reference, ids)
    for folder in (tmp_path / "mlx", tmp_path / "hf"):  # converted, and the multimodal folder read directly
        ours = load_model(folder, dtype="float32")
        assert ours.args.tie_word_embeddings == tied
        np.testing.assert_allclose(np.array(ours(mx.array(ids))), expected, atol=ATOL, rtol=0)


def test_peft_lora_on_the_multimodal_language_model_loads_here(tmp_path):
    """PEFT -> ours: a LoRA on the language model's seven projections of ``Gemma3ForConditionalGeneration``
    (names ``model.language_model.layers...``), B non-zero, attached to the multimodal folder read here."""
    import torch
    from peft import LoraConfig, get_peft_model

    reference = save_multimodal(tmp_path / "hf", seed=3)
    ids = np.random.default_rng(5).integers(3, GEMMA_VOCAB - 3, size=(2, 20))
    plain = _logits(reference, ids)  # before get_peft_model, which adapts the model in place
    torch.manual_seed(4)
    pattern = r".*language_model.*\.(" + "|".join(TARGETS) + ")"
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=pattern))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "np") as f:
        assert any(".language_model.layers." in k for k in f.keys())
    ours = load_model(tmp_path / "hf", dtype="float32")
    attach_adapters(ours, tmp_path / "peft")
    expected = _logits(peft_model.eval(), ids)
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), expected, atol=ATOL, rtol=0)
    assert np.abs(expected - plain).max() > 100 * ATOL  # the adapters change the model


@pytest.mark.parametrize("model_type,text_type", [("mistral3", "mistral"), ("gemma3", "gemma2")])
def test_multimodal_config_of_another_family_is_one_line(tmp_path, model_type, text_type):
    hf = tmp_path / "hf"
    hf.mkdir()
    architecture = {"mistral3": "Mistral3ForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}
    (hf / "config.json").write_text(json.dumps({
        "model_type": model_type, "architectures": [architecture[model_type]],
        "text_config": {"model_type": text_type, "hidden_size": 64}, "vision_config": {}}))
    done = run_script("convert_weights.py", "--hf-path", str(hf), "--mlx-path", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert str(hf / "config.json") in done.stderr
    named = {"mistral3": "Mistral3ForConditionalGeneration", "gemma3": "text_config.model_type: 'gemma2'"}
    assert named[model_type] in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # four script runs, about 20 s on two cores
def test_4bit_convert_finetune_and_merge_into_the_multimodal_original(tmp_path, tiny_spm_path):
    import torch
    import transformers

    hf = tmp_path / "hf"
    save_multimodal(hf, seed=6)
    shutil.copy(tiny_spm_path, hf / "tokenizer.model")
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    q4 = tmp_path / "q4"
    out = script_output(run_script("convert_weights.py", "--hf-path", str(hf), "--mlx-path", str(q4),
                                   "--dtype", "float32"))
    assert "dropped" in out and "vision_tower" in out
    data, run = tmp_path / "data", tmp_path / "run"
    script_output(run_script("prepare_data.py", "--tokenizer", str(q4), "--out", str(data), "--template", "chat",
                             "--max-seq-len", "96", "--min-response-tokens", "4", "--no-progress"))
    script_output(run_script("finetune.py", "--model", str(q4), "--data", str(data), "--out", str(run), "--iters", "2",
                             "--batch-size", "2", "--learning-rate", "1e-2", "--lora-rank", "4", "--lora-alpha", "8",
                             "--eval-every", "2", "--eval-batches", "1", "--save-every", "100", "--no-progress"))
    merged = tmp_path / "merged"
    out = script_output(run_script("merge_adapters.py", "--model", str(q4), "--adapter", str(run),
                                   "--base-weights", str(hf), "--out", str(merged), "--dtype", "float32"))
    assert "lossless merge" in out and "text-only Gemma3ForCausalLM" in out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    ids = np.random.default_rng(7).integers(3, GEMMA_VOCAB - 3, size=(2, 20))
    ours = load_model(hf, dtype="float32")  # the multimodal original + the trained adapters
    attach_adapters(ours, run)
    np.testing.assert_allclose(_logits(theirs, ids), np.array(ours(mx.array(ids))), atol=ATOL, rtol=0)
    # the adapters did train: the merged model is not the original language model
    assert np.abs(_logits(theirs, ids) - np.array(load_model(hf, dtype="float32")(mx.array(ids)))).max() > 100 * ATOL


@pytest.mark.parametrize("prefix", ["base_model.model.model.language_model.", "base_model.model.language_model.model."])
def test_multimodal_adapter_names_read_as_the_text_models(prefix):
    from mlx_qlora.lora.adapters import our_path, peft_key

    key = f"{prefix}layers.3.mlp.down_proj.lora_B.default.weight"
    assert our_path(key) == "model.layers.3.mlp.down_proj.lora_B"
    # we write the text model's names (PEFT loads them onto Gemma3ForCausalLM)
    assert peft_key(our_path(key)) == "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"


def test_a_lora_on_the_vision_tower_is_refused_in_one_line(tmp_path):
    from mlx_qlora.config import LoRAConfig
    from mlx_qlora.errors import UserError
    from mlx_qlora.lora.adapters import WEIGHTS_NAME, load_adapters, save_adapters

    a, b = mx.zeros((4, 64)), mx.zeros((64, 4))
    save_adapters(tmp_path, {"model.layers.0.self_attn.q_proj.lora_A": a, "model.layers.0.self_attn.q_proj.lora_B": b},
                  LoRAConfig(rank=4, alpha=8.0, targets=("q_proj",)))
    tensors = dict(mx.load(str(tmp_path / WEIGHTS_NAME)))
    vision = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[vision] = mx.zeros((4, 32))
    mx.save_safetensors(str(tmp_path / WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        load_adapters(tmp_path)
    assert vision in str(error.value) and "\n" not in str(error.value)


def test_a_published_4b_style_config_reads_as_transformers_reads_it():
    """The shape of the multimodal 4B's ``config.json``: a sparse ``text_config`` (the rest from
    ``Gemma3TextConfig``'s defaults) and the token ids at the top level; our reading against transformers'."""
    import transformers

    from mlx_qlora.model.loading import model_args_from_config

    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
        "eoi_token_index": 256000, "image_token_index": 262144, "eos_token_id": [1, 106], "mm_tokens_per_image": 256,
        "initializer_range": 0.02, "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }
    ours = model_args_from_config(config)
    theirs = transformers.Gemma3Config.from_dict(config).text_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar", "rms_norm_eps"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert list(ours.layer_types) == list(theirs.layer_types)
    assert ours.tie_word_embeddings and theirs.tie_word_embeddings
    full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
    assert (ours.rope_type, ours.rope_scaling_factor, ours.rope_theta) == ("linear", 8.0, full["rope_theta"])
    assert full["rope_type"] == "linear" and full["factor"] == 8.0
    assert ours.rope_local_base_freq == local["rope_theta"]
    # the same sparse config as a text model's (Gemma 3 1B's kind): the global base is Gemma 3's 1e6, not 10000
    text = transformers.Gemma3TextConfig.from_dict(config["text_config"])
    assert model_args_from_config(config["text_config"]).rope_theta == text.rope_parameters["full_attention"]["rope_theta"]
