"""outputs.claim_output: the one place that decides whether a command may write at a path. A new path or an
empty folder is free; an output of the same kind written by us is replaced (only when the caller allows it);
anything else is refused with one line naming the path, before anything changes. Writing goes through the
returned ``Output``, which keeps the old output intact until the new one is complete; ``io.atomic_dir``
itself never replaces anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)

from mlx_qlora.errors import UserError
from mlx_qlora.io import atomic_dir, stale_temporaries, temporary_dir
from mlx_qlora.outputs import (EVALUATION, GGUF_FILE, GGUF_MARKER_KEY, MODEL, PREPARED_DATA, RUN, claim_output,
                               is_ours)


def tree(root: Path) -> dict[str, object]:
    """Every file (its bytes) and folder (None) under ``root``, hidden ones included."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def refused(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def prepared(folder: Path, **extra: str) -> Path:
    """A folder shaped as prepare_data.py writes it (the arrays' contents do not matter here)."""
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "splits": {}, "tokenizer": {}}))
    (folder / "train.safetensors").write_bytes(b"train")
    for name, text in extra.items():
        (folder / name).write_text(text)
    return folder


def run_folder(folder: Path, summary: dict | None = None, latest: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"lora": {"rank": 4}, "model": "m"}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if latest:
        (folder / "checkpoints" / latest).mkdir(parents=True)
        (folder / "checkpoints" / "latest").write_text(latest + "\n")
    if summary:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_new_and_empty_paths_are_free(tmp_path):
    new = claim_output(tmp_path / "a" / "b", PREPARED_DATA)
    assert not new.replaces and not (tmp_path / "a").exists()  # claiming writes nothing
    with new.atomic_dir() as tmp:
        (tmp / "meta.json").write_text("{}")
    assert tree(tmp_path / "a") == {"b": None, "b/meta.json": b"{}"}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"finder")  # the system's, not the user's
    output = claim_output(empty, RUN, replace=False)  # an empty folder loses nothing: no permission needed
    assert output.replaces
    assert output.make_dir() == empty and list(empty.iterdir()) == []


def test_a_file_where_a_folder_goes_and_the_reverse(tmp_path):
    file = tmp_path / "some_file.txt"
    file.write_text("mine")
    for kind in (PREPARED_DATA, MODEL, RUN, EVALUATION):
        assert refused(lambda: claim_output(file, kind)) == (
            f"{file}: is a file, not {kind.a_name}; choose another --out (the file is left as it is)")
    assert refused(lambda: claim_output(tmp_path, GGUF_FILE, flag="--gguf")).startswith(
        f"{tmp_path}: is a folder, not a GGUF file; choose another --gguf")
    assert refused(lambda: claim_output(file, GGUF_FILE, flag="--gguf")) == (
        f"{file}: not a GGUF file written by mlx-qlora (it has no metadata key {GGUF_MARKER_KEY}); "
        "nothing was changed: choose another --gguf")
    assert refused(lambda: claim_output(file / "sub", MODEL)) == (
        f"{file / 'sub'}: cannot be made: {file} is a file, not a folder")
    assert tree(tmp_path) == {"some_file.txt": b"mine"}


def test_what_is_not_ours_is_refused_and_said_why(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    assert refused(lambda: claim_output(mine, PREPARED_DATA)) == (
        f"{mine}: not a prepared data folder written by mlx-qlora (it has no meta.json and holds 'config.json' "
        "and 1 more); nothing was changed: give --out a new or empty folder")
    model = tmp_path / "model"
    model.mkdir()
    (model / "mlx_qlora.json").write_text("{}")
    (model / "config.json").write_text("{}")
    assert "(it is a model folder of mlx-qlora)" in refused(lambda: claim_output(model, PREPARED_DATA))
    data = prepared(tmp_path / "data", **{"notes.txt": "mine"})  # ours, with a file of the user's put in
    assert "(it also holds 'notes.txt', which is not part of one)" in refused(lambda: claim_output(data, PREPARED_DATA))
    (tmp_path / "forged").mkdir()
    (tmp_path / "forged" / "meta.json").write_text('{"name": "a user\'s meta.json"}')
    assert "(its meta.json was not written by mlx-qlora)" in refused(
        lambda: claim_output(tmp_path / "forged", PREPARED_DATA))
    before = tree(tmp_path)
    for folder in (mine, model, data, tmp_path / "forged"):
        with pytest.raises(UserError):
            claim_output(folder, PREPARED_DATA, replace=True)
    assert tree(tmp_path) == before


def test_the_input_or_a_folder_holding_it_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "dolly.jsonl").write_text("{}\n")
    assert refused(lambda: claim_output(src, PREPARED_DATA, inputs=(src / "dolly.jsonl", None, "owner/hub-id"))) == (
        f"{src}: holds the input {src / 'dolly.jsonl'}, which writing the prepared data folder here would delete; "
        "choose another --out")
    assert refused(lambda: claim_output(src / "dolly.jsonl", GGUF_FILE, inputs=[src / "dolly.jsonl"])) == (
        f"{src / 'dolly.jsonl'}: is the input {src / 'dolly.jsonl'}; choose another --out")
    assert "holds the input" in refused(lambda: claim_output(tmp_path, RUN, inputs=[src / "dolly.jsonl"]))
    assert not claim_output(src / "out", PREPARED_DATA, inputs=[src]).replaces  # inside an input: allowed
    monkeypatch.chdir(src)
    for path in (".", src, tmp_path):
        assert refused(lambda: claim_output(path, EVALUATION)) == (
            f"{path}: is the current folder or holds it; choose another --out")
    assert refused(lambda: claim_output(tmp_path / "m" / "q", MODEL, others=[tmp_path / "m"], flag="--quantized-out")) \
        == f"{tmp_path / 'm' / 'q'}: overlaps {tmp_path / 'm'}, another output of this command; choose another --quantized-out"
    assert tree(src) == {"dolly.jsonl": b"{}\n"}


def test_an_output_of_ours_is_replaced_only_when_allowed(tmp_path):
    data = prepared(tmp_path / "data")
    assert claim_output(data, PREPARED_DATA).replaces
    assert refused(lambda: claim_output(data, PREPARED_DATA, replace=False)) == (
        f"{data}: already exists (a prepared data folder written by mlx-qlora); give --overwrite to replace it, "
        "or choose another --out")
    finished = run_folder(tmp_path / "finished", summary={"stop_reason": "done", "step": 30, "total_steps": 30})
    stopped = run_folder(tmp_path / "stopped", latest="step-0000020")
    started = run_folder(tmp_path / "started")
    hint = "continue it with --resume, or --overwrite"
    assert refused(lambda: claim_output(finished, RUN, replace=False, replace_hint=hint)) == (
        f"{finished}: holds a finished training run (step 30 of 30); {hint}")
    assert "holds a training run stopped at step 20;" in refused(lambda: claim_output(stopped, RUN, replace=False))
    assert "holds a training run (started, no checkpoint yet);" in refused(
        lambda: claim_output(started, RUN, replace=False))


def test_an_evaluation_kept_inside_its_run_is_part_of_it(tmp_path):
    run = run_folder(tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"overall": {}, "examples": 2}))
    assert is_ours(run, RUN) and is_ours(run / "eval", EVALUATION)
    (run / "eval" / "notes.txt").write_text("mine")
    assert not is_ours(run, RUN)  # the sub-folder is no longer only ours


def test_a_model_folder_converted_before_the_marker_is_recognised(tmp_path):
    """Folders converted before convert wrote mlx_qlora.json: our quantization section over numbered shards."""
    old = tmp_path / "old-4bit"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": None, "mode": "affine"}}))
    (old / "model.safetensors.index.json").write_text("{}")
    (old / "model-00001-of-00001.safetensors").write_bytes(b"x")
    assert is_ours(old, MODEL)
    (old / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))  # mlx-lm's
    assert not is_ours(old, MODEL)


def test_io_atomic_dir_never_replaces(tmp_path):
    folder = prepared(tmp_path / "data")
    before = tree(tmp_path)
    assert refused(lambda: atomic_dir(folder).__enter__()) == f"{folder}: already exists; it is not replaced"
    late = tmp_path / "late"
    with pytest.raises(UserError, match="appeared while it was being written; it is not replaced"):
        with atomic_dir(late) as tmp:
            (tmp / "new.txt").write_text("new")
            late.mkdir()  # someone else's folder, made while we worked
            (late / "theirs.txt").write_text("theirs")
    assert tree(tmp_path) == {**before, "late": None, "late/theirs.txt": b"theirs"}  # no temporary left


def test_the_old_output_stays_until_the_new_one_is_complete(tmp_path):
    data = prepared(tmp_path / "data")
    before = tree(tmp_path)
    output = claim_output(data, PREPARED_DATA)
    with pytest.raises(RuntimeError):
        with output.atomic_dir() as tmp:
            (tmp / "meta.json").write_text("{}")
            assert tree(data) == {k.removeprefix("data/"): v for k, v in before.items() if k.startswith("data/")}
            raise RuntimeError("the work failed")
    assert tree(tmp_path) == before
    with output.atomic_dir() as tmp:
        (tmp / "meta.json").write_text('{"new": 1}')
    assert tree(tmp_path) == {"data": None, "data/meta.json": b'{"new": 1}'}
    assert os.stat(data).st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_what_changed_while_we_worked_is_not_replaced(tmp_path):
    data = prepared(tmp_path / "data")
    output = claim_output(data, PREPARED_DATA)
    with pytest.raises(UserError, match=r"changed while the prepared data folder was being written \(it also holds "
                                        r"'notes.txt'.*it is not replaced"):
        with output.atomic_dir() as tmp:
            (tmp / "meta.json").write_text("{}")
            (data / "notes.txt").write_text("written meanwhile")
    assert (data / "notes.txt").read_text() == "written meanwhile" and (data / "train.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    run = run_folder(tmp_path / "run")
    output = claim_output(run, RUN, replace=True)
    (run / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match="changed while"):
        output.make_dir()
    assert (run / "run_config.json").exists()


def test_make_dir_replaces_a_claimed_run(tmp_path):
    run = run_folder(tmp_path / "run", latest="step-0000020")
    output = claim_output(run, RUN, replace=True)
    assert output.make_dir() == run and list(run.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_temporaries_of_the_same_output_are_removed(tmp_path):
    out = tmp_path / "model"
    killed = temporary_dir(out)  # what a write killed with SIGKILL leaves: .model.XXXXXXXX.tmp
    (killed / "model-00001-of-00002.safetensors").write_bytes(b"half")
    file_tmp = tmp_path / ".model.abcd1234.tmp"
    file_tmp.write_bytes(b"half a file")
    keep = {".model.old": b"left by an older version: may hold the user's data", ".other.abcd1234.tmp": b"x",
            ".model.abcd1234.tmp.bak": b"y", "model.abcd1234.tmp": b"z"}
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    assert stale_temporaries(out) == sorted([killed, file_tmp])
    claim_output(out, MODEL)
    assert tree(tmp_path) == keep


def test_gguf_marker_is_read_from_files_the_gguf_package_writes(tmp_path):
    gguf = pytest.importorskip("gguf")

    def write(path: Path, marked: bool) -> Path:
        writer = gguf.GGUFWriter(str(path), "llama")
        if marked:
            writer.add_bool(GGUF_MARKER_KEY, True)
        writer.add_string("general.name", "x" * 100)
        writer.add_uint32("llama.block_count", 2)
        writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    ours, theirs = write(tmp_path / "ours.gguf", True), write(tmp_path / "theirs.gguf", False)
    assert claim_output(ours, GGUF_FILE, flag="--gguf").replaces
    assert "not a GGUF file written by mlx-qlora" in refused(lambda: claim_output(theirs, GGUF_FILE, flag="--gguf"))
    (tmp_path / "cut.gguf").write_bytes(ours.read_bytes()[:30])
    assert not is_ours(tmp_path / "cut.gguf", GGUF_FILE)
