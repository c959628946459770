#!/usr/bin/env python
"""Compare the base model and the tuned model (base + adapters) on a prepared split.

Reports ROUGE-1/2/L, exact match (normalised), mean response length and teacher-forced perplexity, per
category and overall, from greedy generations; writes generations.jsonl, results.md and results.json.

Example:
  python scripts/evaluate.py --model models/mistral-7b-4bit --adapter runs/dolly --data data/dolly \
      --max-examples 200 --out runs/dolly/eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mlx_qlora  # noqa: E402,F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base model folder (converted 4-bit or Hugging Face)")
    p.add_argument("--adapter", help="run or checkpoint folder of the tuned adapters (omit: base model only)")
    p.add_argument("--data", required=True, help="prepared data folder (prepare_data.py output)")
    p.add_argument("--split", default="validation", help="split to evaluate (default validation)")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N examples of the split")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens generated per answer (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--out", required=True, help="folder for generations.jsonl, results.md and results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mlx_qlora.generate.evaluate import evaluate

    results = evaluate(args.model, args.data, args.out, adapter_path=args.adapter, split=args.split,
                       max_examples=args.max_examples, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       progress=not args.no_progress)
    print()
    print(results["markdown"])
    print(f"wrote {Path(args.out) / 'generations.jsonl'}, results.md and results.json")


if __name__ == "__main__":
    run_cli(main)
