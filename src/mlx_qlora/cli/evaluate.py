"""Compare the base model and the tuned model (base + adapters) on a prepared split.

Reports ROUGE-1/2/L, exact match (normalised), mean response length and teacher-forced perplexity, per
category and overall, from greedy generations; writes generations.jsonl, results.md and results.json.

Example:
  python scripts/evaluate.py --model models/mistral-7b-4bit --adapter runs/dolly --data data/dolly \\
      --max-examples 200 --out runs/dolly/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..config import EvalConfig
from ..errors import run_cli
from .flags import build, given, parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags; every value flag defaults to None (the defaults are ``EvalConfig``'s)."""
    d = EvalConfig()
    p = parser(__doc__, prog)
    p.add_argument("--model", required=True, help="the base model folder (converted 4-bit or Hugging Face)")
    p.add_argument("--adapter", help="run or checkpoint folder of the tuned adapters (omit: base model only)")
    p.add_argument("--data", required=True, help="prepared data folder (prepare_data.py output)")
    p.add_argument("--split", help=f"split to evaluate (default {d.split})")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N examples of the split "
                                                    f"(default {'all' if d.max_examples is None else d.max_examples})")
    p.add_argument("--max-tokens", type=int, help=f"most tokens generated per answer (default {d.max_tokens})")
    p.add_argument("--batch-size", type=int, help=f"prompts generated together (default {d.batch_size})")
    p.add_argument("--out", required=True,
                   help="folder for generations.jsonl, results.md and results.json: new, empty, or an earlier "
                        "evaluation (replaced); anything else is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> None:
    """Evaluate as ``args`` say, print the results table and the files written."""
    from ..generate.evaluate import evaluate

    config = build(EvalConfig, given(args, EvalConfig))
    results = evaluate(args.model, args.data, args.out, adapter_path=args.adapter, split=config.split,
                       max_examples=config.max_examples, max_tokens=config.max_tokens,
                       batch_size=config.batch_size, progress=not args.no_progress)
    print()
    print(results["markdown"])
    print(f"wrote {Path(args.out) / 'generations.jsonl'}, results.md and results.json")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``evaluate``: parse ``argv`` (None: the command line) and run; a ``UserError`` exits 2 with one line.
    Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
