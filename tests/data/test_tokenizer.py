"""The tokenizer wrapper: sentencepiece and tokenizer.json files, directories, special ids, errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import sentencepiece as spm

from mlx_qlora.data import load_tokenizer
from mlx_qlora.errors import UserError

TEXTS = ["Hello world", "café naïve 東京 🙂", "### Response:\nParis", "[INST] hi [/INST] ok", "tabs\tand\nlines"]


def test_sentencepiece_file(mistral_tokenizer_path):
    tok = load_tokenizer(mistral_tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == ("sentencepiece", 1, 2, None, 32000)
    assert tok.checksum == hashlib.sha256(mistral_tokenizer_path.read_bytes()).hexdigest()
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode(text, add_bos=True, add_eos=True) == [1] + sp.encode(text) + [2]
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == sp.decode(sp.encode(text))
    assert tok.encode_batch(TEXTS) == [sp.encode(t) for t in TEXTS]


def test_directory_prefers_tokenizer_model(tmp_path, mistral_tokenizer_path, tiny_spm_path):
    shutil.copy(mistral_tokenizer_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 32000
    assert load_tokenizer(tiny_spm_path).vocab_size == 320


def test_tokenizer_json(tmp_path, mistral_tokenizer_path):
    """A tokenizer.json converted by transformers from the same sentencepiece model gives the same ids."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(mistral_tokenizer_path, src / "tokenizer.model")
    converted = tmp_path / "converted"
    transformers.LlamaTokenizer.from_pretrained(str(src)).save_pretrained(str(converted))
    (converted / "tokenizer.model").unlink(missing_ok=True)
    tok = load_tokenizer(converted)
    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_path))
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.vocab_size) == ("json", 1, 2, 32000)
    assert tok.checksum == hashlib.sha256((converted / "tokenizer.json").read_bytes()).hexdigest()
    for text in TEXTS:  # no runs of spaces: there the converted tokenizer is known to differ
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    assert tok.encode_batch(TEXTS) == [sp.encode(t) for t in TEXTS]
    # Without tokenizer_config.json the usual special-token names are found.
    (converted / "tokenizer_config.json").unlink()
    tok = load_tokenizer(converted / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (1, 2)


@pytest.mark.parametrize("which", ["mistral", "tiny"])
def test_token_ends_cut_at_token_boundaries(which, mistral_tokenizer_path, tiny_spm_path):
    path = mistral_tokenizer_path if which == "mistral" else tiny_spm_path
    tok = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    text = "The café on the river 東京 serves 🙂 naïve tea"
    ids, ends = tok.token_ends(text)
    assert ids == sp.encode(text)
    assert ends == sorted(ends) and ends[-1] == len(text)
    pieces = sp.encode(text, out_type=str)
    for k in range(1, len(ids)):
        if pieces[k].startswith("▁"):  # a word boundary: the cut text tokenizes to exactly the first k ids
            assert sp.encode(text[: ends[k - 1]]) == ids[:k]


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(bad)
    bad_json = tmp_path / "x" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text(json.dumps({"nope": 1}))
    with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(bad_json.parent)
