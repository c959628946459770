"""Where commands write: every output path is claimed before any work starts, and only an output of ours
is ever replaced (the contract: ``docs/outputs.md``).

The rule: a command replaces what is at its output path only when that is an output of the same kind written
by mlx-qlora, recognised by the marker its writer leaves (the kinds below), and only when the caller allows it
(``replace``: always for outputs that are cheap to make again, only on request for a training run). Anything
else at the path -- a file where a folder goes, a folder holding other files, the command's own input or a
folder holding it -- is refused with a one-line ``UserError`` before anything is read or written. An empty
folder is free to use.

Replacing happens only through the ``Output`` that ``claim_output`` returns (``io.atomic_dir`` never
replaces an existing path), and the old output stays intact until the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import UserError
from .io import atomic_dir, atomic_write_file, stale_temporaries, temporary_dir

PathLike = Union[str, os.PathLike]

# Entries that the system, not the user, puts in folders (Finder's view settings): never a reason to refuse.
IGNORED_ENTRIES = frozenset({".DS_Store"})
# A hidden temporary of an interrupted atomic write inside one of our folders (see ``io.stale_temporaries``).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _json_object(path: Path, *keys: str) -> bool:
    """Whether ``path`` is a JSON file holding an object with every key of ``keys``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


@dataclass(frozen=True)
class OutputKind:
    """A kind of output and how to recognise one that mlx-qlora wrote.

    name: what it is, for messages (``"prepared data folder"``). marker: the file whose presence and content
    mark a folder as ours (for a file kind: what marks the file, for messages). is_marked: the test of the
    marker, given the folder (or the file). entries: a regular expression every entry of the folder must match
    (``fullmatch``); any other entry, a user's file, makes the folder not ours, except, with ``nested``, a
    sub-folder that is itself an output of ours (an evaluation kept inside its run). folder: False for a
    single-file output. describe: a phrase for an existing one, for messages (``"holds a training run
    stopped at step 20 of 30"``).
    """

    name: str
    marker: str
    is_marked: Callable[[Path], bool]
    entries: str = ".*"
    folder: bool = True
    nested: bool = False
    describe: Optional[Callable[[Path], str]] = None

    @property
    def a_name(self) -> str:
        """The name with its article: "a model folder", "an evaluation folder"."""
        return ("an " if self.name[0] in "aeiou" else "a ") + self.name


# --- the kinds of output ------------------------------------------------------------------------------------

PREPARED_DATA = OutputKind(
    "prepared data folder", "meta.json",
    lambda folder: _json_object(folder / "meta.json", "format_version", "splits", "tokenizer"),
    entries=r"(train|validation|test)\.safetensors|(validation|test)\.jsonl|meta\.json",
)

MODEL_META_NAME = "mlx_qlora.json"  # written by convert and merge into every model folder they make
_MODEL_FILES = (r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|"
                r"generation_config\.json|mlx_qlora\.json|tokenizer\.model|tokenizer\.json|tokenizer_config\.json|"
                r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja")


def _is_model_folder(folder: Path) -> bool:
    """``mlx_qlora.json``, or a folder converted before convert wrote one: our ``quantization`` section
    (bits, group_size, mode "affine") over numbered shards with their index."""
    if (folder / MODEL_META_NAME).exists():
        return _json_object(folder / MODEL_META_NAME)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization") if isinstance(config, dict) else None
    return (isinstance(quantization, dict) and set(quantization) == {"bits", "group_size", "mode"}
            and quantization["mode"] == "affine" and (folder / "model.safetensors.index.json").is_file()
            and any(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p.name) for p in folder.iterdir()))


MODEL = OutputKind("model folder", MODEL_META_NAME, _is_model_folder, entries=_MODEL_FILES)


def _describe_run(folder: Path) -> str:
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and isinstance(summary.get("step"), int):
        total = summary.get("total_steps")
        if summary.get("stop_reason") == "done":
            return f"holds a finished training run (step {summary['step']} of {total})"
        return f"holds a training run stopped at step {summary['step']} of {total}"
    with contextlib.suppress(OSError, ValueError):
        name = (folder / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
        return f"holds a training run stopped at step {int(name.removeprefix('step-'))}"
    return "holds a training run (started, no checkpoint yet)"


RUN = OutputKind(
    "training run folder", "run_config.json",
    lambda folder: _json_object(folder / "run_config.json", "lora"),
    entries=(r"run_config\.json|metrics\.jsonl|summary\.json|loss\.png|\.loss\.png\.tmp\.png|"
             r"adapter_model\.safetensors|adapter_config\.json|checkpoints"),
    nested=True, describe=_describe_run,
)

EVALUATION = OutputKind(
    "evaluation folder", "results.json",
    lambda folder: _json_object(folder / "results.json", "overall", "examples"),
    entries=r"generations\.jsonl|results\.json|results\.md",
)

CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
                    "trainer_state.json", "config.json")
CHECKPOINT = OutputKind(
    "checkpoint folder", "its place, checkpoints/step-XXXXXXX in a run folder",
    lambda folder: folder.parent.name == "checkpoints" and re.fullmatch(r"step-\d+", folder.name) is not None,
    entries="|".join(map(re.escape, CHECKPOINT_FILES)),
)

# GGUF files: export_gguf writes this boolean key right after general.architecture.
GGUF_MARKER_KEY = "mlx_qlora.exported"


def _gguf_has_marker(path: Path, limit: int = 16) -> bool:
    """Whether the GGUF file ``path`` has ``GGUF_MARKER_KEY`` among its first ``limit`` metadata entries
    (read without the gguf package: only the first few scalar and string values are parsed)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    try:
        if head[:4] != b"GGUF" or struct.unpack_from("<I", head, 4)[0] < 2:
            return False
        n_kv = struct.unpack_from("<Q", head, 16)[0]
        at = 24
        for _ in range(min(n_kv, limit)):
            (length,) = struct.unpack_from("<Q", head, at)
            key = head[at + 8: at + 8 + length].decode("utf-8")
            (kind,) = struct.unpack_from("<I", head, at + 8 + length)
            at += 12 + length
            if key == GGUF_MARKER_KEY:
                return kind == 7 and head[at] == 1
            if kind == 8:
                at += 8 + struct.unpack_from("<Q", head, at)[0]
            elif kind in sizes:
                at += sizes[kind]
            else:
                return False  # an array: our key comes before any
    except (struct.error, UnicodeDecodeError, IndexError):
        return False
    return False


GGUF_FILE = OutputKind("GGUF file", f"metadata key {GGUF_MARKER_KEY}", _gguf_has_marker, folder=False)

# The kinds an existing folder is checked against, to say what it is when it is refused.
KINDS = (PREPARED_DATA, MODEL, RUN, EVALUATION, CHECKPOINT)


# --- recognising an existing output -------------------------------------------------------------------------


def _entries(folder: Path) -> list[Path]:
    """What a folder holds that counts: not the system's files nor temporaries of our interrupted writes."""
    return sorted((p for p in folder.iterdir() if p.name not in IGNORED_ENTRIES and not _TEMPORARY.match(p.name)),
                  key=lambda p: p.name)


def _foreign(folder: Path, kind: OutputKind) -> list[str]:
    """The entries of ``folder`` that a ``kind`` writer does not make."""
    return [p.name for p in _entries(folder) if not re.fullmatch(kind.entries, p.name)
            and not (kind.nested and p.is_dir() and any(is_ours(p, k) for k in KINDS))]


def is_ours(path: PathLike, kind: OutputKind) -> bool:
    """Whether ``path`` exists and is a (non-empty, for a folder) output of ``kind`` written by us."""
    path = Path(path)
    if not path.exists() or path.is_dir() != kind.folder:
        return False
    if not kind.folder:
        return kind.is_marked(path)
    return bool(_entries(path)) and kind.is_marked(path) and not _foreign(path, kind)


def not_ours(path: Path, kind: OutputKind) -> Optional[str]:
    """None when the existing ``path`` is an output of ``kind`` written by us (or an empty folder, for a
    folder kind); else why not, as a phrase for a message."""
    if not kind.folder:
        return None if path.is_file() and kind.is_marked(path) else f"it has no {kind.marker}"
    if not _entries(path):
        return None
    foreign = _foreign(path, kind)
    if not kind.is_marked(path):
        if (path / kind.marker).is_file():
            return f"its {kind.marker} was not written by mlx-qlora"
        other = next((k for k in KINDS if k is not kind and is_ours(path, k)), None)
        if other is not None:
            return f"it is {other.a_name} of mlx-qlora"
        return f"it has no {kind.marker}" + (f" and holds {_listing(foreign)}" if foreign else "")
    if foreign:
        return f"it also holds {_listing(foreign)}, which is not part of one"
    return None


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{names[0]!r}{more}"


# --- claiming -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """A claimed output path: write it only through these methods.

    path: where the output goes. kind: what it is. replaces: something is at ``path`` already (an output of
    ours, or an empty folder) and is replaced when the new output is complete.
    """

    path: Path
    kind: OutputKind
    replaces: bool = False

    def _check_unchanged(self) -> None:
        """Refuse to replace what is there now unless it is still what was claimed."""
        exists = os.path.lexists(self.path)
        if exists and not self.replaces:
            raise UserError(f"{self.path}: appeared while the {self.kind.name} was being written; it is not replaced")
        if exists:
            reason = (not_ours(self.path, self.kind) if self.path.is_dir() == self.kind.folder
                      else f"it is now a {'file' if self.kind.folder else 'folder'}")
            if reason:
                raise UserError(f"{self.path}: changed while the {self.kind.name} was being written ({reason}); "
                                "it is not replaced")

    @contextlib.contextmanager
    def atomic_dir(self) -> Iterator[Path]:
        """Yield a temporary folder beside ``path``; on success it becomes ``path`` in one rename, replacing the
        claimed old output (kept intact until then, and put back if the rename fails). On any error the
        temporary folder is removed and ``path`` is left as it was."""
        if not self.kind.folder:
            raise TypeError(f"{self.kind.a_name} is a file: use write_file")
        if not self.replaces:
            with atomic_dir(self.path) as tmp:
                yield tmp
            return
        tmp = temporary_dir(self.path)
        try:
            yield tmp
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
            self._check_unchanged()
            if os.path.lexists(self.path):
                aside = temporary_dir(self.path)  # an empty folder: a folder renamed onto it replaces it
                os.replace(self.path, aside)
                try:
                    os.rename(tmp, self.path)
                except BaseException:
                    os.replace(aside, self.path)
                    raise
                shutil.rmtree(aside, ignore_errors=True)  # if killed first: a stale temporary, removed next time
            else:
                os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def make_dir(self) -> Path:
        """Make ``path`` an empty folder now, deleting the claimed old output: for an output written piece by
        piece (a training run). Call it after the checks and loads that may still fail. Returns ``path``."""
        if not self.kind.folder:
            raise TypeError(f"{self.kind.a_name} is a file: use write_file")
        self._check_unchanged()
        if os.path.lexists(self.path):
            aside = temporary_dir(self.path)
            os.replace(self.path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self.path

    def write_file(self, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
        """Write a file output with ``io.atomic_write_file`` (``write(tmp)`` makes the whole file), replacing
        the claimed old one only when the new one is complete."""
        if self.kind.folder:
            raise TypeError(f"{self.kind.a_name} is a folder: use atomic_dir or make_dir")
        atomic_write_file(self.path, lambda tmp: (write(tmp), self._check_unchanged()), suffix=suffix)


def _local(path: Optional[PathLike]) -> Optional[Path]:
    """``path`` resolved when it names something on disk (hub ids and None: None)."""
    if path is None or str(path) == "":
        return None
    path = Path(path).expanduser()
    return path.resolve() if os.path.lexists(path) else None


def claim_output(
    path: PathLike,
    kind: OutputKind,
    *,
    inputs: Iterable[Optional[PathLike]] = (),
    others: Iterable[Optional[PathLike]] = (),
    replace: bool = True,
    flag: str = "--out",
    replace_hint: Optional[str] = None,
) -> Output:
    """Check that a ``kind`` output may be written at ``path`` and return the ``Output`` to write it through.

    Call it before any work: it reads only file names and the markers. Refused with a one-line ``UserError``
    naming ``path`` (nothing changed): ``path`` is one of ``inputs`` (the paths the command reads; None and
    hub ids are skipped) or a folder holding one, or the current folder or one holding it; it overlaps
    another output of the same command (``others``); it is a file where a folder goes (or the reverse); it
    holds something that is not a ``kind`` output of ours (see ``OutputKind``); its parent cannot be made
    or written. An existing output of ours is replaced only with ``replace`` (else refused, the message
    ending with ``replace_hint``, by default "give --overwrite to replace it"); an empty folder always.
    ``flag``: the option that names ``path``, for the messages.

    What an interrupted write of ``path`` left beside it (``io.stale_temporaries``) is deleted.
    """
    if path is None or str(path) == "":
        raise UserError(f"{flag}: give a path for the {kind.name}")
    path = Path(path).expanduser()
    where = path.resolve()
    choose = f"choose another {flag}"

    for given in inputs:
        source = _local(given)
        if source is None:
            continue
        if source == where:
            raise UserError(f"{path}: is the input {given}; {choose}")
        if where in source.parents:
            raise UserError(f"{path}: holds the input {given}, which writing the {kind.name} here would delete; "
                            f"{choose}")
    with contextlib.suppress(OSError):  # the current folder may have been deleted
        here = Path.cwd().resolve()
        if where == here or where in here.parents:
            raise UserError(f"{path}: is the current folder or holds it; {choose}")
    for other in others:
        if other is None:
            continue
        there = Path(other).expanduser().resolve()
        if there == where or where in there.parents or there in where.parents:
            raise UserError(f"{path}: overlaps {other}, another output of this command; {choose}")

    ancestor = where.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{path}: cannot be made: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write in {ancestor} (permission denied)")

    replaces = False
    if os.path.lexists(path):
        if kind.folder and not path.is_dir():
            raise UserError(f"{path}: is a file, not {kind.a_name}; {choose} (the file is left as it is)")
        if not kind.folder and path.is_dir():
            raise UserError(f"{path}: is a folder, not {kind.a_name}; {choose}")
        reason = not_ours(path, kind)
        if reason is not None:
            raise UserError(f"{path}: not {kind.a_name} written by mlx-qlora ({reason}); nothing was changed: "
                            + (f"give {flag} a new or empty folder" if kind.folder else choose))
        empty = kind.folder and not _entries(path)
        if not empty and not replace:
            what = kind.describe(path) if kind.describe else f"already exists ({kind.a_name} written by mlx-qlora)"
            raise UserError(f"{path}: {what}; " + (replace_hint or f"give --overwrite to replace it, or {choose}"))
        replaces = True

    for stale in stale_temporaries(path):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()
    return Output(path, kind, replaces)


def as_output(out: Union[PathLike, Output], kind: OutputKind, **claim: object) -> Output:
    """``out`` itself when the caller already claimed it (an ``Output`` of ``kind``), else
    ``claim_output(out, kind, **claim)``: library functions take either."""
    if isinstance(out, Output):
        if out.kind is not kind:
            raise ValueError(f"{out.path} was claimed as {out.kind.a_name}, not {kind.a_name}")
        return out
    return claim_output(out, kind, **claim)
