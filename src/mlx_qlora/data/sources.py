"""Load records (instructions, conversations, completions or text: ``formats.py``) from the Hugging Face Hub or local files, checking every row.

Accepted sources: a hub id (``databricks/databricks-dolly-15k``, read with ``datasets.load_dataset``), a local
``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, a folder written by ``datasets``' ``save_to_disk``, or a
local folder of data files that ``datasets.load_dataset`` understands.

Columns: Dolly's ``instruction`` / ``context`` / ``response`` / ``category`` and Alpaca's ``instruction`` /
``input`` / ``output`` are recognised; ``ColumnMap`` names other columns. Instruction and response are
required, non-empty strings; context and category are optional strings (missing or null: empty / none).
Text is stripped of leading and trailing whitespace.

A bad row (malformed JSON, missing column, empty instruction or response, wrong type, bytes that are not
UTF-8) raises ``UserError`` naming the file, the line (or record number) and the key; with ``skip_bad`` it
is skipped and counted instead. An empty file, or one with no usable row, is always an error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..config import SourceConfig
from ..errors import UserError
from .formats import FORMATS, NO_CATEGORY, BadRow, category_of, detect_format, parse_row

PathLike = Union[str, os.PathLike]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Column names tried, in order, for each field when no explicit name is given.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction",),
    "context": ("context", "input"),
    "response": ("response", "output"),
    "category": ("category",),
}


@dataclass(frozen=True)
class Record:
    """One instruction example (all fields stripped strings; ``context`` may be empty)."""

    instruction: str
    context: str
    response: str
    category: str = NO_CATEGORY


@dataclass
class ColumnMap:
    """Explicit source column names; ``None`` means: recognise Dolly's or Alpaca's name."""

    instruction: Optional[str] = None
    context: Optional[str] = None
    response: Optional[str] = None
    category: Optional[str] = None

    def to_dict(self) -> dict[str, Optional[str]]:
        return {name: getattr(self, name) for name in ("instruction", "context", "response", "category")}


@dataclass
class LoadResult:
    """What ``load_records`` read: the good records, how many rows were seen, and the skipped ones."""

    records: list[Record]
    source: str
    rows: int
    skipped: list[str] = field(default_factory=list)  # one "where: why" line per skipped row
    columns: dict[str, Optional[str]] = field(default_factory=dict)  # field -> source column used
    format: str = "instruction"  # formats.FORMATS: what the rows hold
    where: list[str] = field(default_factory=list)  # "file, line n" of each record, for messages


_BadRow = BadRow  # a row-level problem; becomes a UserError or a skip


class _Reader:
    """Turns raw rows into ``Record``s, resolving column names once and collecting skips."""

    def __init__(self, source: str, columns: ColumnMap, skip_bad: bool, fmt: str = "auto"):
        if fmt not in FORMATS:
            raise UserError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.source = source
        self.requested = fmt
        self.format: Optional[str] = None  # resolved on the first row
        self.explicit = columns.to_dict()
        self.skip_bad = skip_bad
        self.resolved: Optional[dict[str, Optional[str]]] = None
        self.records: list = []  # Record, or formats.Conversation / Completion / Text
        self.where: list[str] = []  # "file, line n" of each record
        self.skipped: list[str] = []
        self.rows = 0

    def resolve(self, keys, where: str) -> dict[str, Optional[str]]:
        keys = set(keys)
        resolved: dict[str, Optional[str]] = {}
        for name, guesses in DEFAULT_COLUMNS.items():
            explicit = self.explicit[name]
            if explicit is not None:
                if explicit not in keys:
                    raise UserError(
                        f"{where}: missing column {explicit!r} (given for {name}); columns are {sorted(keys)}"
                    )
                resolved[name] = explicit
                continue
            found = next((g for g in guesses if g in keys), None)
            if found is None and name in ("instruction", "response"):
                raise UserError(
                    f"{where}: missing column for {name} (looked for {', '.join(map(repr, guesses))}; columns "
                    f"are {sorted(keys)}); name it with --{name}-column"
                )
            resolved[name] = found
        return resolved

    def resolve_format(self, keys, where: str) -> str:
        """The format of the source: the requested one, or the one its first row's columns show."""
        if self.requested == "auto":
            return detect_format(keys) or "instruction"
        needed = {"messages": ("messages",), "sharegpt": ("conversations",), "completion": ("prompt", "completion"),
                  "text": ("text",)}.get(self.requested, ())
        missing = [k for k in needed if k not in keys]
        if missing:
            raise UserError(f"{where}: format {self.requested!r} needs the column(s) {', '.join(map(repr, missing))}; "
                            f"columns are {sorted(keys)}")
        return self.requested

    def fail(self, where: str, message: str) -> None:
        if not self.skip_bad:
            raise UserError(f"{where}: {message}")
        self.skipped.append(f"{where}: {message}")

    def add(self, row: Any, where: str) -> None:
        """Check one parsed row and keep it, or raise / skip with a message naming ``where`` and the key."""
        self.rows += 1
        try:
            if not isinstance(row, dict):
                raise _BadRow(f"expected an object with named fields, got {type(row).__name__}")
            if self.format is None:
                self.format = self.resolve_format(row.keys(), where)
            if self.format != "instruction":
                self.records.append(parse_row(row, self.format, category_of(row)))
                self.where.append(where)
                return
            if self.resolved is None:
                self.resolved = self.resolve(row.keys(), where)
            values = {}
            for name, column in self.resolved.items():
                values[name] = self.field(row, name, column)
        except _BadRow as e:
            self.fail(where, str(e))
            return
        self.records.append(
            Record(values["instruction"], values["context"], values["response"], values["category"] or NO_CATEGORY)
        )
        self.where.append(where)

    def field(self, row: dict, name: str, column: Optional[str]) -> str:
        required = name in ("instruction", "response")
        if column not in row and self.explicit[name] is None:
            # Rows of a JSON-lines file may differ in which optional keys they carry.
            column = next((g for g in DEFAULT_COLUMNS[name] if g in row), column)
        if column is None:
            return ""
        if column not in row:
            if required or self.explicit[name] is not None:
                raise _BadRow(f"missing key {column!r}")
            return ""
        value = row[column]
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise _BadRow(f"key {column!r} must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")  # lone surrogates: undecodable bytes of a CSV file, or escapes in JSON
        except UnicodeEncodeError:
            raise _BadRow(f"key {column!r} is not valid UTF-8") from None
        value = value.strip()
        if required and not value:
            raise _BadRow(f"key {column!r} is empty")
        return value

    def result(self) -> LoadResult:
        if self.rows == 0:
            raise UserError(f"{self.source}: no records (the file is empty)")
        if not self.records:
            raise UserError(
                f"{self.source}: none of the {self.rows} records is usable; first problem: {self.skipped[0]}"
            )
        return LoadResult(self.records, self.source, self.rows, self.skipped, dict(self.resolved or {}),
                          self.format or "instruction", self.where)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _utf8_error(where: str, error: UnicodeDecodeError) -> str:
    return f"{where}: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at byte {error.start} of the line)"


def _read_jsonl(path: Path, reader: _Reader) -> None:
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}, line {number}"
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reader.rows += 1
            message = _utf8_error(where, e)
            if not reader.skip_bad:
                raise UserError(message) from None
            reader.skipped.append(message)
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            reader.rows += 1
            reader.fail(where, f"malformed JSON ({e})")
            continue
        reader.add(row, where)


def _read_json(path: Path, reader: _Reader) -> None:
    data = _read_bytes(path)
    if not data.strip():
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:
            json.loads(first)
        except ValueError:
            raise UserError(f"{path}, line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None
        _read_jsonl(path, reader)  # a JSON-lines file named .json
        return
    if isinstance(document, dict) and len(document) == 1 and isinstance(next(iter(document.values())), list):
        document = next(iter(document.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(document, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(document).__name__}")
    for number, row in enumerate(document, start=1):
        reader.add(row, f"{path}, record {number}")


def _read_csv(path: Path, reader: _Reader) -> None:
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # surrogateescape keeps undecodable bytes as lone surrogates; _Reader.field reports them per key and row.
    text = data.decode("utf-8", errors="surrogateescape")
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows)
    except StopIteration:
        return
    except csv.Error as e:
        raise UserError(f"{path}, line 1: malformed CSV ({e})") from None
    start = rows.line_num + 1
    while True:
        where = f"{path}, line {start}"
        try:
            values = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            reader.rows += 1
            reader.fail(where, f"malformed CSV ({e})")
            start = rows.line_num + 1
            continue
        start = rows.line_num + 1
        if not values:
            continue
        if len(values) != len(header):
            reader.rows += 1
            reader.fail(where, f"expected {len(header)} fields, got {len(values)}")
            continue
        reader.add(dict(zip(header, values)), where)


def _read_parquet(path: Path, reader: _Reader) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: cannot read as parquet ({e})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        reader.add(row, f"{path}, record {number}")


def _read_dataset(dataset, name: str, reader: _Reader) -> None:
    for number, row in enumerate(dataset.to_list() if hasattr(dataset, "to_list") else dataset, start=1):
        reader.add(row, f"{name}, record {number}")


def _pick_split(dataset, name: str, split: str):
    """A ``DatasetDict``'s ``split`` (or its only split); a ``Dataset`` as it is."""
    if isinstance(dataset, dict):  # datasets.DatasetDict is a dict of splits
        splits = list(dataset.keys())
        if split in splits:
            return dataset[split]
        if len(splits) == 1:
            return dataset[splits[0]]
        raise UserError(f"{name}: no split {split!r} (splits: {', '.join(splits)})")
    return dataset


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_with_datasets(name: str, split: str):
    """``datasets.load_dataset(name, split=split)``: a hub id or a local folder of data files."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing repo, bad files: all reported the same way
        raise UserError(f"{name}: could not load with datasets.load_dataset ({type(e).__name__}: {e})") from None


def load_records(
    source: PathLike,
    columns: Optional[ColumnMap] = None,
    skip_bad: bool = False,
    split: str = SourceConfig.split,
    fmt: str = "auto",
) -> LoadResult:
    """Read and check every record of ``source`` (see the module docstring for what is accepted).

    ``split`` picks the split of a hub data set or a saved ``DatasetDict``; ``fmt`` (``formats.FORMATS``) the
    record format, ``"auto"``: detected from the first row's columns (``formats.detect_format``). Returns a ``LoadResult``;
    raises ``UserError`` on bad input unless ``skip_bad`` (then bad rows are listed in ``result.skipped``).
    """
    columns = columns or ColumnMap()
    name = str(source)
    path = Path(source)
    reader = _Reader(name, columns, skip_bad, fmt)
    if path.is_dir():
        if _is_saved_dataset(path):
            import datasets

            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as e:
                raise UserError(f"{path}: cannot read the saved data set ({e})") from None
        else:
            loaded = _load_with_datasets(str(path), split)
        _read_dataset(_pick_split(loaded, name, split), name, reader)
    elif path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(FILE_SUFFIXES)}")
        readers[suffix](path, reader)
    elif path.suffix.lower() in FILE_SUFFIXES or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UserError(f"{name}: no such file or directory")
    else:
        _read_dataset(_pick_split(_load_with_datasets(name, split), name, split), name, reader)
    return reader.result()
