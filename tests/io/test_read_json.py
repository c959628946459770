"""io.read_json: one contract for every JSON file we read. A missing file (unless the caller gives a default),
an unreadable file, invalid JSON (with its line and column) and the wrong top-level type each raise a
one-line UserError naming the file; scripts turn it into exit status 2. The readers of our and the user's
JSON files all go through it."""

from __future__ import annotations

import json

import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)

from mlx_qlora.errors import UserError, run_cli
from mlx_qlora.io import read_json


def _message(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_files_are_returned_as_parsed(tmp_path):
    path = tmp_path / "a.json"
    value = {"r": 16, "targets": ["q_proj"], "nested": {"x": None}}
    path.write_text(json.dumps(value, indent=2))
    assert read_json(path) == value
    path.write_text("[1, 2.5]")
    assert read_json(path, expect=list) == [1, 2.5] and read_json(path, expect=None) == [1, 2.5]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    assert _message(lambda: read_json(path)) == f"{path}: not found"
    assert _message(lambda: read_json(path, missing="missing (give a run folder)")) == \
        f"{path}: missing (give a run folder)"
    assert read_json(path, default={}) == {} and read_json(path, default=None) is None
    assert read_json(tmp_path / "not-a-folder.json" / "x.json", default=7) == 7  # a path below a missing folder


def test_unreadable_file(tmp_path):
    folder = tmp_path / "config.json"
    folder.mkdir()
    assert _message(lambda: read_json(folder, default={})).startswith(f"{folder}: cannot read")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"name": "café"}'.encode("latin-1"))
    assert _message(lambda: read_json(latin1)) == f"{latin1}: cannot read: not UTF-8 text (byte 13)"


@pytest.mark.parametrize(
    "text, line, column",
    [
        ('{\n  "a": 1,\n  "b": ]\n}', 3, 8),
        ('{"a": 1,}', 1, 9),  # a trailing comma
        ("", 1, 1),
        ('{"a": 1}\n{"b": 2}\n', 2, 1),  # a JSON-lines file where one document is expected
    ],
)
def test_invalid_json_names_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as parsed:  # the reason's wording depends on the Python version
        json.loads(text)
    expected = f"{path}, line {line}, column {column}: not valid JSON ({parsed.value.msg})"
    assert _message(lambda: read_json(path)) == expected


@pytest.mark.parametrize(
    "text, expect, found, wanted",
    [
        ("[1, 2]", dict, "an array", "an object"),
        ('"text"', dict, "a string", "an object"),
        ("null", dict, "null", "an object"),
        ("true", (int, float), "true or false", "a number"),
        ("{}", list, "an object", "an array"),
    ],
)
def test_wrong_top_level_type(tmp_path, text, expect, found, wanted):
    path = tmp_path / "t.json"
    path.write_text(text)
    assert _message(lambda: read_json(path, expect=expect)) == f"{path}: expected {wanted} at the top level, found {found}"


def test_run_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "adapter_config.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: read_json(path))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}, line 1, column 2: not valid JSON (") and err.count("\n") == 1


def _callers(tmp_path, tiny_spm_path):
    """``(file the caller reads, call)`` for each reader of a JSON file in the package."""
    import shutil

    from mlx_qlora.data.dataset import read_meta
    from mlx_qlora.data.tokenizer import load_tokenizer
    from mlx_qlora.generate.loading import read_run_config, resolve_template
    from mlx_qlora.gguf.vocab import tokenizer_metadata
    from mlx_qlora.lora.adapters import read_peft_config
    from mlx_qlora.model.loading import read_config, weight_files
    from mlx_qlora.train.run_config import read_config_file

    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(tiny_spm_path, tok / "tokenizer.model")
    return [
        (tmp_path / "config.json", lambda: read_config(tmp_path)),
        (tmp_path / "model.safetensors.index.json", lambda: weight_files(tmp_path)),
        (tmp_path / "adapter_config.json", lambda: read_peft_config(tmp_path / "adapter_config.json")),
        (tmp_path / "meta.json", lambda: read_meta(tmp_path)),
        (tmp_path / "run_config.json", lambda: read_run_config(tmp_path)),
        (tmp_path / "mlx_qlora.json", lambda: resolve_template(None, None, tmp_path)),
        (tmp_path / "run.json", lambda: read_config_file(tmp_path / "run.json")),
        (tok / "tokenizer_config.json", lambda: load_tokenizer(tok)),
        (tok / "tokenizer_config.json", lambda: tokenizer_metadata(tok)),
    ]


def test_every_reader_reports_bad_json_with_its_position(tmp_path, tiny_spm_path):
    for file, call in _callers(tmp_path, tiny_spm_path):
        file.write_text('{"a": 1,\n "b": }')
        assert _message(call) == f"{file}, line 2, column 7: not valid JSON (Expecting value)", file
        file.unlink()
