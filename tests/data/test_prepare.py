"""The prepared directory, the seeded stratified split, the tokenizer check, and prepare_data.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_qlora.config import DataConfig
from mlx_qlora.data import (
    CROSS_ENTROPY_IGNORE_INDEX as IGNORE,
    PreparedDataset,
    check_tokenizer,
    load_tokenizer,
    prepare_dataset,
    split_indices,
    tokenize_example,
)
from mlx_qlora.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = ["open_qa", "closed_qa", "classification", "summarization", "brainstorming"]


def make_records(n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = "the river city music blue green quick fox answer question café naïve".split()
    rows = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)] if i % 7 else "open_qa"
        text = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
        context = text(int(rng.integers(5, 400))) if category in ("closed_qa", "summarization") else ""
        rows.append({"instruction": f"Q{i}: " + text(int(rng.integers(3, 12))), "context": context,
                     "response": text(int(rng.integers(2, 60))), "category": category})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_split_is_stratified_disjoint_and_complete():
    categories = ["a"] * 500 + ["b"] * 300 + ["c"] * 150 + ["d"] * 37 + ["e"] * 3
    split = split_indices(categories, 0.1, 0.05, seed=0)
    all_indices = np.concatenate(list(split.values()))
    assert sorted(all_indices.tolist()) == list(range(len(categories)))
    n = len(categories)
    assert len(split["test"]) == round(0.05 * n) and len(split["validation"]) == round(0.1 * n)
    for name, fraction in (("validation", 0.1), ("test", 0.05)):
        counts = Counter(categories[i] for i in split[name])
        for category, size in Counter(categories).items():
            assert abs(counts[category] - fraction * size) <= 1, (name, category)


def test_split_depends_on_seed_only():
    categories = [CATEGORIES[i % 5] for i in range(400)]
    a = split_indices(categories, 0.05, seed=0)
    b = split_indices(categories, 0.05, seed=0)
    c = split_indices(categories, 0.05, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["validation"], c["validation"])
    assert len(a["test"]) == 0


def test_split_is_the_same_on_any_machine():
    """No Python hash(), no platform-dependent generator: fixed values, and other hash seeds agree."""
    categories = [CATEGORIES[i % 5] for i in range(60)]
    split = split_indices(categories, 0.1, 0.1, seed=42)
    assert split["validation"].tolist() == GOLDEN_VALIDATION
    assert split["test"].tolist() == GOLDEN_TEST
    code = (
        "import mlx_qlora, json; from mlx_qlora.data import split_indices;"
        f"s = split_indices({categories!r}, 0.1, 0.1, seed=42);"
        "print(json.dumps({k: v.tolist() for k, v in s.items()}))"
    )
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == {k: v.tolist() for k, v in split.items()}


GOLDEN_VALIDATION = [28, 36, 39, 44, 47, 55]
GOLDEN_TEST = [0, 4, 6, 19, 32, 38]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_spm_path):
    root = tmp_path_factory.mktemp("prep")
    source = write_jsonl(root / "data.jsonl", make_records())
    config = DataConfig(max_seq_len=160, min_response_tokens=8, val_fraction=0.1, test_fraction=0.05, seed=3)
    meta = prepare_dataset(source, tiny_spm_path, root / "out", config)
    return root, source, meta, config


def test_prepared_directory_round_trips(prepared, tiny_spm_path):
    root, source, meta, config = prepared
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "test.jsonl", "test.safetensors", "train.safetensors", "validation.jsonl",
        "validation.safetensors"]
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = load_tokenizer(tiny_spm_path)
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    seen = []
    for split in ("train", "validation", "test"):
        ds = PreparedDataset(out, split)
        arrays = load_file(str(out / f"{split}.safetensors"))
        assert {k: v.dtype for k, v in arrays.items()} == dict.fromkeys(
            ["input_ids", "labels", "offsets", "category", "record_index"], np.int32)
        assert len(arrays["offsets"]) == len(arrays["category"]) + 1
        assert len(ds) == meta["splits"][split]["examples"]
        for i in range(len(ds)):
            row = rows[int(ds.record_index[i])]
            ex = tokenize_example(tok, "dolly", row["instruction"], row["context"], row["response"], 160, 8)
            assert ds[i]["input_ids"].tolist() == ex.input_ids and ds[i]["labels"].tolist() == ex.labels
            assert meta["category_names"][ds[i]["category"]] == row["category"]
        learned = int((ds.labels != IGNORE).sum())
        assert meta["splits"][split]["learned_tokens"] == learned
        seen += ds.record_index.tolist()
    counts = meta["counts"]
    assert counts["rows"] == 200 and counts["dropped"] == 200 - len(seen) and len(set(seen)) == len(seen)
    assert counts["truncated"] > 0 and counts["truncated_context"] > 0
    assert meta["tokenizer"]["checksum"] == tok.checksum and meta["template"] == "dolly"
    assert meta["max_seq_len"] == 160 and meta["config"] == {**config.to_dict(), "template": "dolly"}  # "auto", resolved
    lengths = np.concatenate([np.diff(PreparedDataset(out, s).offsets) for s in ("train", "validation", "test")])
    assert meta["token_lengths"]["max"] == lengths.max() <= 160
    assert meta["token_lengths"]["p50"] == pytest.approx(np.percentile(lengths, 50), abs=0.01)
    validation = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [v["record_index"] for v in validation] == PreparedDataset(out, "validation").record_index.tolist()
    assert validation[0]["response"] == rows[validation[0]["record_index"]]["response"].strip()


def test_split_does_not_depend_on_tokenizer_or_length(prepared, tmp_path, mistral_tokenizer_path):
    root, source, meta, config = prepared
    other = DataConfig(max_seq_len=4096, val_fraction=0.1, test_fraction=0.05, seed=3)
    prepare_dataset(source, mistral_tokenizer_path, tmp_path / "m", other)
    a = set(PreparedDataset(root / "out", "validation").record_index.tolist())
    b = set(PreparedDataset(tmp_path / "m", "validation").record_index.tolist())
    assert a <= b and len(b) == round(0.1 * 200)


def test_check_tokenizer(prepared, tiny_spm_path, mistral_tokenizer_path):
    meta = prepared[2]
    check_tokenizer(meta, load_tokenizer(tiny_spm_path))
    with pytest.raises(UserError, match="prepared with another tokenizer .* prepare it again"):
        check_tokenizer(meta, load_tokenizer(mistral_tokenizer_path))
    with pytest.raises(UserError, match="^data/x: the data was prepared with another tokenizer"):
        check_tokenizer(meta, load_tokenizer(mistral_tokenizer_path), source="data/x")


def test_failure_leaves_output_untouched(tmp_path, tiny_spm_path):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", make_records(20))
    prepare_dataset(good, tiny_spm_path, out, DataConfig(val_fraction=0.1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", make_records(5) + [{"instruction": "x"}])
    with pytest.raises(UserError, match="bad.jsonl, line 6: missing key 'response'"):
        prepare_dataset(bad, tiny_spm_path, out, DataConfig())
    with pytest.raises(UserError, match="every example is longer than max_seq_len=8"):
        prepare_dataset(good, tiny_spm_path, out, DataConfig(max_seq_len=8))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--no-progress", *args],
                          capture_output=True, text=True)


def test_script(tmp_path, tiny_spm_path):
    rows = make_records(40) + [{"instruction": "", "response": "x", "category": "open_qa"}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    result = run_script("--dataset", str(source), "--tokenizer", str(tiny_spm_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {source}, line 41: key 'instruction' is empty"]
    assert not (tmp_path / "o").exists()
    result = run_script("--dataset", str(source), "--tokenizer", str(tiny_spm_path), "--out", str(tmp_path / "o"),
                        "--skip-bad", "--max-seq-len", "400", "--test-fraction", "0.1", "--template", "alpaca")
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "line 41" in result.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["counts"]["skipped_bad"] == 1 and meta["template"] == "alpaca" and meta["max_seq_len"] == 400
    assert f"truncated   {meta['counts']['truncated']}" in result.stdout
    assert f"dropped     {meta['counts']['dropped']}" in result.stdout
    result = run_script("--tokenizer", str(tiny_spm_path), "--out", str(tmp_path / "o2"), "--val-fraction", "1.5")
    assert result.returncode == 2 and "val_fraction must be in [0, 1)" in result.stderr


def test_script_column_flags_and_default_sample(tmp_path, tiny_spm_path):
    rows = [{"q": f"question {i}", "a": f"answer {i} river", "topic": "t" + str(i % 2)} for i in range(30)]
    source = write_jsonl(tmp_path / "c.jsonl", rows)
    result = run_script("--dataset", str(source), "--tokenizer", str(tiny_spm_path), "--out", str(tmp_path / "o"),
                        "--instruction-column", "q", "--response-column", "a", "--category-column", "topic")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["category_names"] == ["t0", "t1"] and meta["columns"]["instruction"] == "q"
    sample = ROOT / "data" / "sample" / "dolly_sample.jsonl"
    if sample.exists():
        result = run_script("--tokenizer", str(tiny_spm_path), "--out", str(tmp_path / "s"))
        assert result.returncode == 0, result.stderr
        meta = json.loads((tmp_path / "s" / "meta.json").read_text())
        assert meta["counts"]["records"] == len(sample.read_text(encoding="utf-8").splitlines())
