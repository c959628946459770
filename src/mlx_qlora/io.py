"""Shared file helpers: atomic output (write to a temporary name in the same folder, then rename), sharded
safetensors folders with their index, and strict JSON reading with one-line errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

from .errors import UserError

SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
_REQUIRED = object()  # read_json's default: a missing file is an error
_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "true or false", type(None): "null"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike, missing_ok: bool = False) -> None:
    """Flush a written file, or a folder's entries (a rename inside it), to disk.

    Folders cannot be opened on every platform; with ``missing_ok`` such failures are ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not missing_ok:
            raise
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """Make ``path`` with ``write(tmp)``, which writes a whole file at ``tmp`` (a temporary name beside
    ``path`` ending in ``suffix``); then flush it to disk and rename it to ``path``.

    Readers see the old file or the whole new one, never a part; on any error the temporary file is
    removed and ``path`` is left as it was. The file gets the usual permissions (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _name_the_output(e, path)
        raise


def json_line(record: Any) -> str:
    """``record`` as one line of JSON (a row of ``metrics.jsonl``), a NaN or infinite number written as
    ``null``: JSON has no such numbers, and a reader of the file must not fail on one row."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(record), allow_nan=False)


def _name_the_output(error: BaseException, path: Path) -> None:
    """A write that failed without naming its file (a full disk: ``write()`` has no file name) names the
    output it was making, so the one-line error says where."""
    if isinstance(error, OSError) and error.errno is not None and error.filename is None:
        error.filename = str(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) so that readers see the old file or the whole new one, never a part."""
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write_text`` of ``obj`` as indented JSON; NaN or an infinity is a ``ValueError`` (JSON has none)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


# Temporary names of atomic writes: ``.<name>.XXXXXXXX.tmp`` beside ``<name>`` (8 characters of tempfile's
# alphabet). A process killed mid-write leaves one behind; ``stale_temporaries`` finds them again.
_TEMP_RANDOM = r"[a-z0-9_]{8}"


def temporary_dir(path: str | os.PathLike) -> Path:
    """A new empty hidden folder beside ``path`` named as atomic writes of ``path`` name theirs
    (``.<name>.XXXXXXXX.tmp``); its parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files and folders that atomic writes of ``path`` (``atomic_write_file``, ``atomic_dir``,
    ``outputs.Output``) left beside it when their process was killed: ``.<name>.XXXXXXXX.tmp``."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{_TEMP_RANDOM}\.tmp$")
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.match(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` in one rename.

    ``path`` must not exist: this never replaces anything (a ``UserError`` says so, before the work and
    again at the rename). Replacing an existing output goes through ``outputs.claim_output``, which first
    checks that it is one of ours. On any error the temporary folder is removed.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise UserError(f"{path}: already exists; it is not replaced")
    tmp = temporary_dir(path)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if os.path.lexists(path):  # made by someone else while we worked
            raise UserError(f"{path}: appeared while it was being written; it is not replaced")
        os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_the_output(e, path)
        raise


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``{name: (dtype code, shape, data start)}`` of a safetensors file, from its header only; a header
    that is not one, or tensors that end past the end of the file (a truncated download), is a
    ``UserError`` naming the file, before anything is written."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
        header.pop("__metadata__", None)
        tensors = {name: (info["dtype"], tuple(info["shape"]), info["data_offsets"][0], info["data_offsets"][1])
                   for name, info in header.items()}
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    end = max((stop for *_, stop in tensors.values()), default=0)
    if 8 + length + end > size:
        raise UserError(f"{path}: truncated: its tensors need {8 + length + end:,} bytes, the file has {size:,} "
                        "(an incomplete download or copy?)")
    return {name: (code, shape, start) for name, (code, shape, start, _) in tensors.items()}


# --- sharded safetensors folders ---------------------------------------------------------------------------


def natural_key(name: str) -> list:
    """Sort key that orders the numbers inside a name by value: ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split the tensors ``{name: bytes}``, in the mapping's order, into consecutive shards.

    A tensor starts a new shard when it would take the current one over ``max_shard_bytes``; a single
    tensor larger than the bound gets a shard to itself. Returns the names of each shard (at least one,
    possibly empty, shard).
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(n_shards: int, numbered: bool = False) -> list[str]:
    """Hugging Face's shard names: ``model.safetensors`` for one shard (unless ``numbered``), else
    ``model-00001-of-0000n.safetensors`` ..."""
    if n_shards == 1 and not numbered:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def write_safetensors_shards(
    folder: Union[str, os.PathLike],
    sizes: Mapping[str, int],
    max_shard_bytes: int,
    write_shard: Callable[[Path, list[str]], None],
    *,
    natural_order: bool = True,
    numbered: bool = False,
) -> list[str]:
    """Write a model's tensors into ``folder`` as Hugging Face safetensors shards; return the file names.

    sizes: ``{tensor name: bytes}`` of every tensor, taken in natural order of their names
    (``natural_key``), or in the mapping's own order without ``natural_order`` (for a writer that must
    produce tensors in a given order). ``plan_shards`` groups them into shards of at most
    ``max_shard_bytes``; ``write_shard(path, names)`` writes the safetensors file ``path`` holding the
    tensors ``names`` (the caller's library and metadata). One shard is ``model.safetensors`` (unless
    ``numbered``); several are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
    mapping every tensor to its file, ``total_size`` being the tensors' bytes (headers not counted).

    ``folder`` (created if needed) should be a temporary folder (``atomic_dir``): the files are written in
    place.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(sizes, key=natural_key) if natural_order else list(sizes)
    shards = plan_shards({name: sizes[name] for name in order}, max_shard_bytes)
    names = shard_file_names(len(shards), numbered)
    weight_map: dict[str, str] = {}
    mode = 0o666 & ~_umask()
    for file, shard in zip(names, shards):
        write_shard(folder / file, shard)
        os.chmod(folder / file, mode)  # some writers make their files private
        weight_map.update({name: file for name in shard})
    if len(names) > 1 or numbered:
        atomic_write_json(folder / SAFETENSORS_INDEX_NAME,
                          {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return names


# --- JSON ----------------------------------------------------------------------------------------------------


def _json_type_name(types: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_JSON_TYPE_NAMES.get(t, t.__name__) for t in types))


def read_json(
    path: Union[str, os.PathLike],
    expect: Optional[Union[type, tuple[type, ...]]] = dict,
    *,
    default: Any = _REQUIRED,
    missing: str = "not found",
) -> Any:
    """The parsed JSON file at ``path``, with every failure a one-line ``UserError`` that names the file.

    expect: the type(s) the top-level value must have (default ``dict``, a JSON object; None: any).
    default: returned when the file does not exist; without it a missing file is an error whose message
    is ``"<path>: <missing>"``. A file that cannot be read (a folder, no permission, not UTF-8), text that is
    not JSON (the message gives the line and column) or a top-level value of another type is an error.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        if default is _REQUIRED:
            raise UserError(f"{path}: {missing}") from None
        return default
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: cannot read: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if expect is not None:
        types = expect if isinstance(expect, tuple) else (expect,)
        # bool is an int in Python but not a number in JSON
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UserError(f"{path}: expected {_json_type_name(types)} at the top level, "
                            f"found {_json_type_name((type(value),))}")
    return value
