#!/usr/bin/env python
"""Convert a Hugging Face Mistral/Llama checkpoint to an MLX checkpoint with 4-bit projections.

The command is ``mlx_qlora.cli.convert`` (installed: ``mlx-qlora convert``); ``--help`` lists its options.
"""

import sys
from pathlib import Path

# In a checkout, run the checkout's own package (installed or not: an installed copy may be another one's).
SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "mlx_qlora").is_dir():
    sys.path.insert(0, str(SRC))

from mlx_qlora.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
