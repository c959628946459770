"""User-facing errors: a clear one-line message and a non-zero exit, no traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (a file, a flag, a key). The message names what is wrong and where."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a ``UserError`` prints ``error: ...`` and exits with status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
