"""GGUF import and export on tiny models: the name table and llama.cpp's q/k row order against an explicit
index formula, export -> read back with equal tensors (f32 exact, f16 = the float16 cast, Q8_0 = the gguf
package's own round trip), the exported file loaded by transformers' GGUF loader gives our logits (1e-4),
tokenizers rebuilt from GGUF metadata encode like the originals (sentencepiece and byte-level BPE),
convert_weights/merge_adapters hooks, and clear errors for bad files."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

gguf = pytest.importorskip("gguf")

from mlx_qlora.errors import UserError  # noqa: E402
from mlx_qlora.gguf import TENSOR_NAMES, from_gguf_rows, gguf_name, gguf_to_hf, hf_name, to_gguf_rows  # noqa: E402
from mlx_qlora.gguf.vocab import byte_level_tokenizer_json, sentencepiece_model, tokenizer_metadata  # noqa: E402
from mlx_qlora.gguf.writer import export_gguf  # noqa: E402
from mlx_qlora.model import load_model  # noqa: E402

ATOL = 1e-4
TEXTS = ["Hello world", "The quick brown fox, 42 times!", "  two  spaces\tand\ttabs\n\nnew lines",
         "café naïve Zürich 日本 😀", "x=1234567; y = 3.14", "don't I'll we've"]


@pytest.fixture(scope="module")
def llama_dir(hf_checkpoint_factory, tiny_spm_path, tmp_path_factory) -> Path:
    """A tiny transformers Llama (hidden 64, GQA 4/2, head_dim 16) with the tiny sentencepiece tokenizer."""
    folder = tmp_path_factory.mktemp("gguf") / "tiny-llama"
    shutil.copytree(hf_checkpoint_factory("tiny-llama", arch="llama"), folder)
    shutil.copy(tiny_spm_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def exported(llama_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-out")
    return {t: export_gguf(llama_dir, out / f"tiny-{t}.gguf", t).out for t in ("f32", "f16", "q8_0")}


def _state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def test_name_table_both_ways():
    for g, h in TENSOR_NAMES.items():
        g3, h3 = g.replace("{i}", "3"), h.replace("{i}", "3")
        assert hf_name(g3) == h3 and gguf_name(h3) == g3
    assert hf_name("blk.0.attn_qkv.weight") is None and gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_row_order_is_llama_cpps_and_inverts():
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.random.default_rng(0).standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    expected = np.empty_like(hf)
    half = head_dim // 2
    for h in range(n_heads):  # llama.cpp row 2j + s of a head holds Hugging Face row s * half + j
        for j in range(half):
            for s in range(2):
                expected[h * head_dim + 2 * j + s] = hf[h * head_dim + s * half + j]
    np.testing.assert_array_equal(to_gguf_rows(hf, n_heads), expected)
    np.testing.assert_array_equal(from_gguf_rows(expected, n_heads), hf)


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_export_then_read_back_gives_the_same_tensors(llama_dir, exported, file_type, tmp_path):
    original = _state(llama_dir)
    info = gguf_to_hf(exported[file_type], tmp_path / "back")
    back = _state(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        if value.ndim == 1 or file_type == "f32":
            expected = value
        elif file_type == "f16":
            expected = value.astype(np.float16).astype(np.float32)
        else:  # the gguf package's own Q8_0 round trip
            q8 = gguf.GGMLQuantizationType.Q8_0
            expected = gguf.quants.dequantize(gguf.quants.quantize(value, q8), q8)
        np.testing.assert_array_equal(back[name], expected, err_msg=name)
    assert load_model(tmp_path / "back").args == load_model(llama_dir).args  # every shape, RoPE and norm setting
    n_vectors, n_matrices = 2 * 2 + 1, 2 * 7 + 2  # norms; projections, embeddings and output
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[file_type]
    expected_types = {"F32": n_vectors, matrix_type: n_matrices} if file_type != "f32" else {"F32": 21}
    assert info.tensor_types == expected_types


def test_read_into_several_shards(llama_dir, exported, tmp_path):
    gguf_to_hf(exported["f32"], tmp_path / "sharded", shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(_state(llama_dir))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _state(tmp_path / "sharded").values())
    ids = mx.array([[1, 17, 250, 3, 99]])
    np.testing.assert_array_equal(np.array(load_model(tmp_path / "sharded")(ids)), np.array(load_model(llama_dir)(ids)))


def test_exported_gguf_in_transformers_gives_our_logits(llama_dir, exported):
    """transformers' own GGUF loader (its dequantization, name mapping and q/k reordering) on our file."""
    import torch
    import transformers

    path = exported["f32"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 17))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    ours = np.array(load_model(llama_dir, dtype="float32")(mx.array(ids)))
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_tied_embeddings_write_no_output_tensor(hf_checkpoint_factory, tiny_spm_path, tmp_path):
    folder = tmp_path / "tied"
    shutil.copytree(hf_checkpoint_factory("tiny-llama-tied", arch="llama", tie_word_embeddings=True), folder)
    shutil.copy(tiny_spm_path, folder / "tokenizer.model")
    export_gguf(folder, tmp_path / "tied.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "tied.gguf")).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] is True
    ids = mx.array([[5, 9, 44, 3]])
    np.testing.assert_allclose(np.array(load_model(tmp_path / "back")(ids)), np.array(load_model(folder)(ids)),
                               atol=1e-6)


def test_sentencepiece_tokenizer_survives_gguf(llama_dir, exported, tmp_path, mistral_tokenizer_path):
    import sentencepiece as spm

    # Through a real GGUF file: the tiny model's tokenizer.model is rebuilt from the exported metadata.
    gguf_to_hf(exported["f16"], tmp_path / "back")
    original = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    rebuilt = spm.SentencePieceProcessor(model_file=str(tmp_path / "back" / "tokenizer.model"))
    # The real Mistral v1 tokenizer (32000 pieces, byte fallback), through the metadata alone.
    (tmp_path / "mistral").mkdir()
    shutil.copy(mistral_tokenizer_path, tmp_path / "mistral" / "tokenizer.model")
    mistral = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    mistral_back = spm.SentencePieceProcessor(
        model_proto=sentencepiece_model(tokenizer_metadata(tmp_path / "mistral"), "test"))
    # GGUF stores no normalization rules (neither does llama.cpp apply any): the tiny model's default
    # NFKC + whitespace folding is compared on text those rules leave alone; Mistral's has none.
    plain = [t for t in TEXTS if "  " not in t and "\t" not in t]
    for a, b, texts in ((original, rebuilt, plain), (mistral, mistral_back, TEXTS)):
        assert (a.bos_id(), a.eos_id(), a.unk_id(), a.get_piece_size()) == (b.bos_id(), b.eos_id(), b.unk_id(),
                                                                             b.get_piece_size())
        for text in texts:
            assert a.encode(text) == b.encode(text), text
    config = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["add_bos_token"] is True


def _byte_level_folder(folder: Path, digits: bool = True) -> Path:
    """A small byte-level BPE tokenizer.json (Digits + ByteLevel like SmolLM's) trained with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if digits else pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), byte_level]))
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(TEXTS)] * 3 + ["the river mountain city music science history number seven blue"] * 5
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}))
    return folder


def test_byte_level_tokenizer_survives_gguf_metadata(tmp_path):
    from tokenizers import Tokenizer

    folder = _byte_level_folder(tmp_path / "bl")
    meta = tokenizer_metadata(folder)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(json.dumps(byte_level_tokenizer_json(meta, "test")))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert rebuilt.encode(text, add_special_tokens=False).ids == original.encode(text, add_special_tokens=False).ids
        ids = original.encode(text, add_special_tokens=False).ids
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    folder = _byte_level_folder(tmp_path / "bl", digits=False)
    with pytest.raises(UserError, match="pre_tokenizer is not one llama.cpp names"):
        tokenizer_metadata(folder)


def test_convert_weights_reads_a_gguf_path(llama_dir, exported, tmp_path):
    from mlx_qlora.convert import convert_checkpoint

    result = convert_checkpoint(exported["f32"], tmp_path / "conv", quantize=False, dtype="float32", progress=False)
    assert result.source == exported["f32"] and (tmp_path / "conv" / "tokenizer.model").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone
    ids = mx.array([[1, 17, 250, 3, 99]])
    np.testing.assert_allclose(np.array(load_model(tmp_path / "conv")(ids)), np.array(load_model(llama_dir)(ids)),
                               atol=1e-5)


def test_loftq_adapters_of_a_gguf_name_the_gguf(exported, tmp_path):
    """LoftQ from a GGUF file: the adapters' base model is the file the user gave, not the temporary
    folder it was read through (removed after the conversion)."""
    import json

    from mlx_qlora.convert import convert_checkpoint

    convert_checkpoint(exported["f32"], tmp_path / "conv", loftq_rank=2, dtype="float32", progress=False)
    config = json.loads((tmp_path / "conv" / "loftq" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(exported["f32"])


def test_merge_adapters_writes_a_gguf(llama_dir, tmp_path):
    from support import write_adapters

    from mlx_qlora.generate.merge import merge_adapters

    adapters = write_adapters(tmp_path / "run", load_model(llama_dir).args, template="dolly")
    report = merge_adapters(llama_dir, adapters, tmp_path / "merged", gguf=tmp_path / "merged.gguf",
                            gguf_type="f16", check=False)
    assert any("merged.gguf (f16)" in line for line in report.lines())
    gguf_to_hf(tmp_path / "merged.gguf", tmp_path / "back")
    merged, back = _state(tmp_path / "merged"), _state(tmp_path / "back")
    assert sorted(merged) == sorted(back)
    for name, value in merged.items():
        expected = value if value.ndim == 1 else value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(back[name], expected, err_msg=name)


# --- bad input ---------------------------------------------------------------------------------------------


def _write_gguf(path: Path, arch: str, meta: dict, tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LLAMA_META = {"llama.embedding_length": 8, "llama.block_count": 1, "llama.feed_forward_length": 16,
              "llama.attention.head_count": 2, "llama.vocab_size": 4}


def test_truncated_file_is_a_clear_error(exported, tmp_path):
    data = exported["f16"].read_bytes()
    for size in (len(data) // 2, 64):
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        with pytest.raises(UserError, match="truncated"):
            gguf_to_hf(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        gguf_to_hf(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(UserError, match="no such GGUF file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"gpt2.embedding_length": 8},
                       {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(UserError, match="general.architecture = 'gpt2' is not supported"):
        gguf_to_hf(path, tmp_path / "out")


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    path = _write_gguf(tmp_path / "i32.gguf", "llama", LLAMA_META,
                       {"token_embd.weight": np.zeros((4, 8), np.int32)})
    with pytest.raises(UserError, match="'token_embd.weight' has type I32, which is not supported"):
        gguf_to_hf(path, tmp_path / "out")


def test_unknown_tensor_name_is_a_clear_error(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", "llama", LLAMA_META,
                       {"blk.0.attn_qkv.weight": np.zeros((24, 8), np.float32)})
    with pytest.raises(UserError, match="'blk.0.attn_qkv.weight' has no counterpart"):
        gguf_to_hf(path, tmp_path / "out")


def test_convert_weights_script_reports_a_bad_gguf(tmp_path):
    import subprocess

    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "convert_weights.py"), "--hf-path",
                           str(tmp_path / "bad.gguf"), "--mlx-path", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
