#!/usr/bin/env python
"""Run the whole chain on the embedded default: tiny random Mistral + our sample data.

  make the tiny model -> convert_weights.py (4-bit) -> prepare_data.py -> finetune.py -> generate.py -> evaluate.py

Every step is the real script, run as a user would run it; outputs go under --out (default runs/demo).
Running it again replaces the previous demo's outputs there.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlx_qlora  # noqa: E402,F401
from mlx_qlora.errors import UserError, run_cli  # noqa: E402

# What the demo writes under --out; a new run removes them first.
OUTPUTS = ("tiny-hf", "tiny-4bit", "data", "run", "eval")


def step(title: str, args: list[str]) -> None:
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, *args], cwd=ROOT).returncode
    if code != 0:
        raise UserError(f"demo step '{title}' failed (exit {code}); its message is above")
    print(f"({time.perf_counter() - start:.1f}s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for every output of the demo")
    p.add_argument("--iters", type=int, default=150, help="fine-tuning steps")
    args = p.parse_args()
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    from mlx_qlora.tiny import make_tiny_model

    for name in OUTPUTS:
        shutil.rmtree(out / name, ignore_errors=True)
    start = time.perf_counter()
    print(f"=== tiny default model (tokenizer and a short pre-training on data/sample) -> {out / 'tiny-hf'}")
    make_tiny_model(out / "tiny-hf")
    step("convert to 4-bit", ["scripts/convert_weights.py", "--hf-path", str(out / "tiny-hf"),
                              "--mlx-path", str(out / "tiny-4bit"), "--dtype", "float32"])
    step("prepare data", ["scripts/prepare_data.py", "--dataset", "data/sample/dolly_sample.jsonl",
                          "--tokenizer", str(out / "tiny-4bit"), "--out", str(out / "data"),
                          "--max-seq-len", "256", "--val-fraction", "0.1"])
    step("fine-tune", ["scripts/finetune.py", "--model", str(out / "tiny-4bit"), "--data", str(out / "data"),
                       "--out", str(out / "run"), "--iters", str(args.iters), "--batch-size", "8",
                       "--learning-rate", "1e-3", "--warmup-steps", "10", "--lora-rank", "16",
                       "--eval-every", "50", "--save-every", "50", "--log-every", "10"])
    step("generate", ["scripts/generate.py", "--model", str(out / "tiny-4bit"), "--adapter", str(out / "run"),
                      "--prompt", "What is the boiling point of water at sea level in degrees Celsius?",
                      "--max-tokens", "40"])
    step("evaluate", ["scripts/evaluate.py", "--model", str(out / "tiny-4bit"), "--adapter", str(out / "run"),
                      "--data", str(out / "data"), "--max-examples", "32", "--max-tokens", "48",
                      "--out", str(out / "eval")])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; outputs under {out}")


if __name__ == "__main__":
    run_cli(main)
