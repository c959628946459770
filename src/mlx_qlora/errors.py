"""User-facing errors: a clear one-line message and a non-zero exit, no traceback.

The exit statuses of every command (``run_cli``):

- 0: done;
- 2: a user error (``UserError``; also a file the system refuses to read or write, ``OSError``): one line
  ``error: <file/key>: <what>`` on standard error;
- 130: interrupted (Ctrl-C, SIGINT), after whatever the command saves on an interrupt;
- 141: standard output was closed by its reader (``... | head``), as for a program killed by SIGPIPE;
  nothing is printed.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from typing import Callable, Optional

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's status of a program stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

# The temporary names of io's atomic writes, ".<name>.<random>.tmp[.safetensors]": an error about one of
# them is reported for <name>, the file or folder that was being written.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp(\.safetensors)?$")


_HINTS = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (the disk quota is used up)",
          errno.EFBIG: " (the file size limit, ulimit -f, is reached)", errno.EROFS: " (mounted read-only)"}


class UserError(Exception):
    """Bad input from the user (a file, a flag, a key). The message names what is wrong and where."""


def ensure_standard_streams() -> None:
    """Open ``/dev/null`` on each of the file descriptors 0, 1 and 2 that is closed (``script <&-``).

    Otherwise the next file opened takes the lowest free number, 0 for a closed standard input, and MLX's
    file loader treats descriptor 0 as a failure to open: every weight file would be refused as unreadable.
    ``sys.stdin`` / ``sys.stdout`` / ``sys.stderr`` are None when Python started with the descriptor closed:
    they are replaced by streams on ``/dev/null``.
    """
    for fd, mode, name in ((0, os.O_RDONLY, "stdin"), (1, os.O_WRONLY, "stdout"), (2, os.O_WRONLY, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, mode)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", closefd=False))


def one_line(text: str) -> str:
    """``text`` with its line breaks turned into spaces (a message from a library may hold several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _output_path(path: str) -> str:
    """``path`` with each of io's temporary names in it (a file, or a folder being written) replaced by the
    output it becomes: ``out/.run.ab12cd34.tmp/metrics.jsonl`` -> ``out/run/metrics.jsonl``."""
    parts = [(_TEMPORARY.match(part) or None) for part in path.split(os.sep)]
    return os.sep.join(m.group("name") if m else part for m, part in zip(parts, path.split(os.sep)))


def os_error_message(e: OSError) -> str:
    """``<path>: <reason>`` for an ``OSError`` (the path being written when it is one of io's temporaries)."""
    reason = (e.strerror or str(e)) + _HINTS.get(e.errno, "")
    path = e.filename
    if path is None:  # a failed write() or read() names no file
        return f"reading or writing a file failed: {reason}"
    path = _output_path(os.fsdecode(path))
    if e.filename2 is not None:
        return f"{path} -> {os.fsdecode(e.filename2)}: {reason}"
    return f"{path}: {reason}"


# What a compiler says when it cannot write its output (MLX's CPU backend compiles fused operations with the
# system's C++ compiler into a folder of its own, and gives the compiler's whole output when that fails).
_WRITE_FAILURES = ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
                   "Permission denied")


def library_file_error(e: Exception) -> Optional[str]:
    """The message of a library's failure to write a file, which is not an ``OSError``: MLX's
    (``[write] Unable to write 300092 bytes to file.``, ``[save_safetensors] Failed to open file ...``, and
    ``[Compile::eval_cpu] Failed to compile function ...`` where the compiler could not write its output:
    said in one line) and safetensors' (``SafetensorError: ... I/O error: ... (os error 28)``); None for any
    other exception."""
    text = one_line(e)
    if isinstance(e, RuntimeError) and re.match(r"^\[(write|save|save_safetensors|save_gguf)\] ", text):
        return text
    if isinstance(e, RuntimeError) and text.startswith("[Compile::eval_cpu]"):
        reason = next((r for r in _WRITE_FAILURES if r in text), None)
        target = re.search(r'-o "([^"]+)"', text)
        if reason is not None and target is not None:
            return f"MLX could not write the code it compiles into {os.path.dirname(target.group(1))}: {reason}"
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        return text
    return None


def _say(line: str) -> None:
    """Print ``line`` on standard error; say nothing when standard error is gone too."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush does not fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main`` with the exit statuses of the module docstring.

    A ``UserError``, or an ``OSError`` (no permission, a read-only or full disk, a folder where a file
    should be), prints one line ``error: ...`` and exits 2; Ctrl-C exits 130; a closed standard output
    exits 141 without a word. Standard streams that are closed are first opened on ``/dev/null``.
    """
    ensure_standard_streams()
    try:
        main()
    except UserError as e:
        _say(f"error: {one_line(e)}")
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except OSError as e:
        _say(f"error: {one_line(os_error_message(e))}")
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:
        message = library_file_error(e)
        if message is None:
            raise
        _say(f"error: writing a file failed: {message}")
        sys.exit(EXIT_USER_ERROR)
