#!/usr/bin/env python
"""Turn instruction data into tokenized, label-masked train / validation (/ test) splits.

  python scripts/prepare_data.py --dataset databricks/databricks-dolly-15k \\
      --tokenizer models/mistral-7b-4bit --out data/dolly

--dataset takes a Hugging Face hub id or a local .jsonl / .json / .parquet / .csv file or saved data-set
folder (default: the sample shipped in data/sample). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlx_qlora  # noqa: E402,F401
from mlx_qlora.config import DataConfig  # noqa: E402
from mlx_qlora.data import TEMPLATES, ColumnMap, load_records, load_tokenizer, prepare_dataset  # noqa: E402
from mlx_qlora.errors import UserError, run_cli  # noqa: E402

DEFAULT_DATASET = ROOT / "data" / "sample" / "dolly_sample.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    defaults = DataConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(DEFAULT_DATASET),
                   help="hub id or local file/folder (default: the shipped sample)")
    p.add_argument("--source-split", default="train",
                   help="split of a hub data set or saved DatasetDict to read (default %(default)s)")
    p.add_argument("--tokenizer", required=True, help="model directory, tokenizer.model or tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--template", default=defaults.template, choices=sorted(TEMPLATES) + ["chat"],
                   help="prompt template (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len,
                   help="longest example in tokens (default %(default)s)")
    p.add_argument("--min-response-tokens", type=int, default=defaults.min_response_tokens,
                   help="truncation keeps at least this many response tokens, else drops the example "
                        "(default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="validation share, stratified by category (default %(default)s)")
    p.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                   help="test share (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split (default %(default)s)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    for name in ("instruction", "context", "response", "category"):
        p.add_argument(f"--{name}-column", help=f"source column holding the {name}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        config = DataConfig(
            template=args.template,
            max_seq_len=args.max_seq_len,
            min_response_tokens=args.min_response_tokens,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    columns = ColumnMap(args.instruction_column, args.context_column, args.response_column, args.category_column)
    tokenizer = load_tokenizer(args.tokenizer)
    loaded = load_records(args.dataset, columns=columns, skip_bad=args.skip_bad, split=args.source_split)
    for line in loaded.skipped[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if len(loaded.skipped) > 10:
        print(f"... and {len(loaded.skipped) - 10} more skipped", file=sys.stderr)
    meta = prepare_dataset(
        args.dataset, tokenizer, args.out, config, columns, args.skip_bad, args.source_split,
        progress=not args.no_progress, loaded=loaded,
    )
    counts, lengths = meta["counts"], meta["token_lengths"]
    print(f"source      {meta['source']} ({counts['rows']} rows, {counts['skipped_bad']} skipped as bad)")
    print(f"tokenizer   {tokenizer.path.name} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.checksum[:12]})")
    print(f"template    {meta['template']}, max_seq_len {meta['max_seq_len']}")
    print(f"truncated   {counts['truncated']} (context {counts['truncated_context']}, "
          f"response {counts['truncated_response']})")
    print(f"dropped     {counts['dropped']} (too long to fit)")
    for name, split in meta["splits"].items():
        print(f"{name:<11} {split['examples']:>6} examples {split['tokens']:>9} tokens  "
              f"learned {split['learned_fraction']:.1%}")
    print(f"lengths     mean {lengths['mean']:.0f}  p50 {lengths['p50']:.0f}  p90 {lengths['p90']:.0f}  "
          f"p99 {lengths['p99']:.0f}  max {lengths['max']}")
    print(f"categories  {', '.join(meta['category_names'])}")
    print(f"wrote       {args.out}")


if __name__ == "__main__":
    run_cli(main)
