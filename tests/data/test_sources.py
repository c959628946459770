"""Loading records: every format, column recognition and mapping, and bad input named by file, line and key."""

from __future__ import annotations

import csv
import json

import pytest

from mlx_qlora.data import ColumnMap, Record, load_records
from mlx_qlora.data.sources import NO_CATEGORY
from mlx_qlora.errors import UserError

DOLLY = [
    {"instruction": "Name a river.", "context": "", "response": "The Nile.", "category": "open_qa"},
    {"instruction": " Summarize. ", "context": "Long text.\n", "response": "Short.\n\n", "category": "summarization"},
    {"instruction": "Café?", "context": "", "response": "Oui — 東京 🙂", "category": "open_qa"},
]
EXPECTED = [
    Record("Name a river.", "", "The Nile.", "open_qa"),
    Record("Summarize.", "Long text.", "Short.", "summarization"),
    Record("Café?", "", "Oui — 東京 🙂", "open_qa"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl(tmp_path):
    result = load_records(write_jsonl(tmp_path / "d.jsonl", DOLLY))
    assert result.records == EXPECTED and result.rows == 3 and result.skipped == []
    assert result.columns == {k: k for k in ("instruction", "context", "response", "category")}


def test_alpaca_columns_and_json_array(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Hi", "input": "", "output": "Hello"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    result = load_records(path)
    assert result.records == [Record("Add.", "2 and 3", "5", NO_CATEGORY), Record("Hi", "", "Hello", NO_CATEGORY)]
    assert result.columns["context"] == "input" and result.columns["category"] is None


def test_json_named_file_holding_lines(tmp_path):
    assert load_records(write_jsonl(tmp_path / "d.json", DOLLY)).records == EXPECTED


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(DOLLY[0]))
        writer.writeheader()
        writer.writerows(DOLLY)
    assert load_records(path).records == EXPECTED


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(DOLLY)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(tmp_path / "d.parquet").records == EXPECTED
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved").records == EXPECTED
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    assert load_records(tmp_path / "saved_dict").records == EXPECTED
    assert load_records(tmp_path / "saved_dict", split="test").records == EXPECTED[:1]


def test_local_folder_through_load_dataset(tmp_path, monkeypatch):
    """A folder of data files goes through datasets.load_dataset, the same call as a hub id."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "repo"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOLLY)
    assert load_records(folder).records == EXPECTED


def test_hub_id_calls_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list(DOLLY)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_records("databricks/databricks-dolly-15k")
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert result.records == EXPECTED

    def failing(name, split=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(UserError, match="databricks/x: could not load .*ConnectionError: offline"):
        load_records("databricks/x")


def test_column_mapping(tmp_path):
    rows = [{"q": "Why?", "ctx": "Because.", "a": "Reasons.", "kind": "general_qa", "response": 3}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    columns = ColumnMap(instruction="q", context="ctx", response="a", category="kind")
    assert load_records(path, columns).records == [Record("Why?", "Because.", "Reasons.", "general_qa")]
    with pytest.raises(UserError, match=r"m.jsonl, line 1: missing column 'answer' \(given for response\)"):
        load_records(path, ColumnMap(instruction="q", response="answer"))
    with pytest.raises(UserError, match=r"line 1: missing column for instruction .*--instruction-column"):
        load_records(path)


BAD = {
    "malformed JSON": (b'{"instruction": "a", "response": "b"}\n{"instruction": "a", \n', "line 2: malformed JSON"),
    "missing key": (b'{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n', "line 2: missing key 'response'"),
    "empty instruction": (b'{"instruction": "a", "response": "b"}\n{"instruction": "  ", "response": "b"}\n',
                          "line 2: key 'instruction' is empty"),
    "empty response": (b'{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": ""}\n',
                       "line 2: key 'response' is empty"),
    "wrong type": (b'{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": 7}\n',
                   "line 2: key 'response' must be a string, got int"),
    "wrong context type": (b'{"instruction": "a", "response": "b"}\n'
                           b'{"instruction": "a", "context": [1], "response": "b"}\n',
                           "line 2: key 'context' must be a string, got list"),
    "not an object": (b'{"instruction": "a", "response": "b"}\n[1, 2]\n', "line 2: expected an object"),
    "non-UTF-8": (b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n',
                  "line 2: not valid UTF-8 \\(byte 0xe9"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_jsonl_rows(tmp_path, name):
    data, message = BAD[name]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data + b'{"instruction": "c", "response": "d"}\n')
    with pytest.raises(UserError, match=f"bad.jsonl, {message}"):
        load_records(path)
    result = load_records(path, skip_bad=True)
    assert [r.instruction for r in result.records] == ["a", "c"]
    assert result.rows == 3 and len(result.skipped) == 1 and "line 2" in result.skipped[0]


def test_bad_csv_rows(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"instruction,response\na,b\n\"caf\xe9\",x\nc,\nd,e,f\ng,h\n")
    with pytest.raises(UserError, match=r"bad.csv, line 3: key 'instruction' is not valid UTF-8"):
        load_records(path)
    result = load_records(path, skip_bad=True)
    assert [r.instruction for r in result.records] == ["a", "g"]
    assert [s.split(": ", 1)[0].rsplit(", ", 1)[1] for s in result.skipped] == ["line 3", "line 4", "line 5"]
    assert "key 'response' is empty" in result.skipped[1] and "expected 2 fields, got 3" in result.skipped[2]


def test_bad_json_document(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "response": "b"},\n {"instruction": }\n]')
    with pytest.raises(UserError, match=r"bad.json, line 3 column \d+: malformed JSON"):
        load_records(path)
    path.write_text(json.dumps([{"instruction": "a", "response": "b"}, {"instruction": "a", "response": None}]))
    with pytest.raises(UserError, match=r"bad.json, record 2: key 'response' must be a string, got NoneType"):
        load_records(path)
    path.write_text(json.dumps({"a": 1, "b": 2}))
    with pytest.raises(UserError, match="expected a JSON array"):
        load_records(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_text("\n\n" if suffix != ".csv" else "")
    for skip_bad in (False, True):
        with pytest.raises(UserError, match=f"empty{suffix}: no records"):
            load_records(path, skip_bad=skip_bad)


def test_nothing_usable_and_missing_paths(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": ""}])
    message = "none of the 1 records is usable; first problem: .*line 1: key 'response' is empty"
    with pytest.raises(UserError, match=message):
        load_records(path, skip_bad=True)
    with pytest.raises(UserError, match="no such file or directory"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type .txt"):
        load_records(tmp_path / "d.txt")
