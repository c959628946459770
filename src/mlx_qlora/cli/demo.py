"""Run the whole chain on the embedded default: tiny random Mistral + our sample data.

  make the tiny model -> convert_weights.py (4-bit) -> prepare_data.py -> finetune.py -> generate.py -> evaluate.py

Every step is the real script, run as a user would run it; outputs go under --out.
Running it again replaces the previous demo's outputs there (a folder marked by its demo.json); any other
folder is refused.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..config import DemoConfig
from ..errors import UserError, run_cli
from ..io import atomic_write_json
from ..outputs import PREPARED_DATA, RUN, OutputKind, claim_output, is_ours
from .flags import build, given, parser

# The checkout the package runs from: the demo runs its scripts/ on its data/sample/.
ROOT = Path(__file__).resolve().parents[3]

# What the demo writes under --out, beside its marker demo.json; a new run replaces the whole folder.
OUTPUTS = ("tiny-hf", "tiny-4bit", "data", "run", "eval")
DEMO_MARKER = "demo.json"
DEMO = OutputKind(
    "demo folder", DEMO_MARKER,
    # a folder of an older demo, before the marker, is recognised by its prepared data and run
    lambda folder: ((folder / DEMO_MARKER).is_file()
                    or (is_ours(folder / "data", PREPARED_DATA) and is_ours(folder / "run", RUN))),
    entries="|".join((DEMO_MARKER.replace(".", r"\."), *OUTPUTS)),
)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags; every value flag defaults to None (the defaults are ``DemoConfig``'s)."""
    d = DemoConfig()
    p = parser(__doc__, prog)
    p.add_argument("--out", help=f"folder for every output of the demo (default {d.out})")
    p.add_argument("--iters", type=int, help=f"fine-tuning steps (default {d.iters})")
    return p


def step(title: str, args: list[str]) -> None:
    """Run ``python <args>`` in the checkout as a user would, with its time; ``UserError`` if it fails."""
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, *args], cwd=ROOT).returncode
    if code != 0:
        raise UserError(f"demo step '{title}' failed (exit {code}); its message is above")
    print(f"({time.perf_counter() - start:.1f}s)", flush=True)


def run(args: argparse.Namespace) -> None:
    """Make the tiny model, then convert, prepare, fine-tune, generate and evaluate under ``--out``."""
    config = build(DemoConfig, given(args, DemoConfig))
    if not (ROOT / "scripts" / "demo.py").is_file():
        raise UserError(f"{ROOT}: not a checkout of the repository (the demo runs its scripts/ on its data/sample/)")
    out = Path(config.out)
    if not out.is_absolute():
        out = ROOT / out
    output = claim_output(out, DEMO, inputs=(ROOT / "data" / "sample", ROOT / "scripts"))
    from ..tiny import make_tiny_model

    output.make_dir()  # the previous demo's outputs go; each step below writes a new folder in it
    atomic_write_json(out / DEMO_MARKER, {"written_by": "scripts/demo.py", "outputs": list(OUTPUTS)})
    start = time.perf_counter()
    print(f"=== tiny default model (tokenizer and a short pre-training on data/sample) -> {out / 'tiny-hf'}")
    make_tiny_model(out / "tiny-hf")
    step("convert to 4-bit", ["scripts/convert_weights.py", "--hf-path", str(out / "tiny-hf"),
                              "--mlx-path", str(out / "tiny-4bit"), "--dtype", "float32"])
    step("prepare data", ["scripts/prepare_data.py", "--dataset", "data/sample/dolly_sample.jsonl",
                          "--tokenizer", str(out / "tiny-4bit"), "--out", str(out / "data"),
                          "--max-seq-len", "256", "--val-fraction", "0.1"])
    step("fine-tune", ["scripts/finetune.py", "--model", str(out / "tiny-4bit"), "--data", str(out / "data"),
                       "--out", str(out / "run"), "--iters", str(config.iters), "--batch-size", "8",
                       "--learning-rate", "1e-3", "--warmup-steps", "10", "--lora-rank", "16",
                       "--eval-every", "50", "--save-every", "50", "--log-every", "10"])
    step("generate", ["scripts/generate.py", "--model", str(out / "tiny-4bit"), "--adapter", str(out / "run"),
                      "--prompt", "What is the boiling point of water at sea level in degrees Celsius?",
                      "--max-tokens", "40"])
    step("evaluate", ["scripts/evaluate.py", "--model", str(out / "tiny-4bit"), "--adapter", str(out / "run"),
                      "--data", str(out / "data"), "--max-examples", "32", "--max-tokens", "48",
                      "--out", str(out / "eval")])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; outputs under {out}")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``demo``: parse ``argv`` (None: the command line) and run; a ``UserError`` (a failed step) exits 2
    with one line. Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
