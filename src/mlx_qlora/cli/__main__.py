"""``python -m mlx_qlora.cli <command> [options]``: the same dispatcher as the installed ``mlx-qlora``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m mlx_qlora.cli"))
