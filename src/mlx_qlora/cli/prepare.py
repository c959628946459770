"""Turn instruction, chat, completion or text data into tokenized, label-masked train / validation (/ test) splits.

  python scripts/prepare_data.py --dataset databricks/databricks-dolly-15k \\
      --tokenizer models/mistral-7b-4bit --out data/dolly

--dataset takes a Hugging Face hub id or a local .jsonl / .json / .parquet / .csv file or saved data-set
folder (default: the sample shipped in data/sample). Records hold instructions (Dolly, Alpaca), chat
"messages", ShareGPT "conversations", "prompt"/"completion" or "text" (--format). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..config import DataConfig, SourceConfig
from ..errors import run_cli
from .flags import build, given, parser, shown

COLUMNS = ("instruction", "context", "response", "category")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags; every value flag defaults to None (the defaults are ``DataConfig``'s and
    ``SourceConfig``'s; --dataset's is the shipped sample, ``mlx_qlora.tiny.SAMPLE_DATA``)."""
    from ..data import TEMPLATES
    from ..data.conversation import LEARN_MODES
    from ..data.formats import FORMATS

    d, source = DataConfig(), SourceConfig()
    p = parser(__doc__, prog)
    p.add_argument("--dataset", help="hub id or local file/folder (default: the shipped sample)")
    p.add_argument("--source-split",
                   help=f"split of a hub data set or saved DatasetDict to read (default {source.split})")
    p.add_argument("--tokenizer", required=True, help="model directory, tokenizer.model or tokenizer.json")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or prepared data of ours (replaced atomically); "
                        "anything else is refused")
    p.add_argument("--template", choices=["auto", "chat"] + sorted(TEMPLATES),
                   help="prompt template: chat is the model's own chat template (tokenizer_config.json); default "
                        "auto: chat for conversations, dolly for instructions, none for completions and text")
    p.add_argument("--format", choices=list(FORMATS),
                   help="record format (default auto: messages, conversations (ShareGPT), prompt/completion, text "
                        "or instruction columns, detected from the first record)")
    p.add_argument("--learn", choices=list(LEARN_MODES),
                   help=f"conversations: learn every assistant turn, only the last one, or all tokens "
                        f"(default {d.learn})")
    p.add_argument("--max-seq-len", type=int, help=f"longest example in tokens (default {d.max_seq_len})")
    p.add_argument("--min-response-tokens", type=int,
                   help="truncation keeps at least this many response tokens, else drops the example "
                        f"(default {d.min_response_tokens})")
    p.add_argument("--val-fraction", type=float,
                   help=f"validation share, stratified by category (default {shown(d.val_fraction)})")
    p.add_argument("--test-fraction", type=float, help=f"test share (default {shown(d.test_fraction)})")
    p.add_argument("--seed", type=int, help=f"seed of the split (default {d.seed})")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    for name in COLUMNS:
        p.add_argument(f"--{name}-column", help=f"source column holding the {name}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> None:
    """Prepare the data as ``args`` say; print the skipped records (up to 10) on standard error and a
    summary (counts, truncation, split sizes, lengths, categories) on standard output."""
    from ..data import ColumnMap, load_records, load_tokenizer, prepare_dataset
    from ..outputs import PREPARED_DATA, claim_output
    from ..tiny import SAMPLE_DATA

    config = build(DataConfig, given(args, DataConfig))
    source = build(SourceConfig, given(args, SourceConfig, source_split="split"))
    dataset = str(SAMPLE_DATA) if args.dataset is None else args.dataset
    columns = ColumnMap(*(getattr(args, f"{name}_column") for name in COLUMNS))
    output = claim_output(args.out, PREPARED_DATA, inputs=(dataset, args.tokenizer))
    tokenizer = load_tokenizer(args.tokenizer)
    loaded = load_records(dataset, columns=columns, skip_bad=args.skip_bad, split=source.split, fmt=config.format)
    meta = prepare_dataset(
        dataset, tokenizer, output, config, columns, args.skip_bad, source.split,
        progress=not args.no_progress, loaded=loaded,
    )
    counts, lengths = meta["counts"], meta["token_lengths"]
    skipped = meta["skipped_examples"]
    for line in skipped[:10]:
        print(f"skipped {line}", file=sys.stderr)
    if counts["skipped_bad"] > 10:
        print(f"... and {counts['skipped_bad'] - 10} more skipped (meta.json lists the first 20)", file=sys.stderr)
    if counts["cut_turns"]:
        print(f"note: {counts['cut_turns']} conversation(s) kept only a cut first assistant turn (no end-of-turn) "
              f"to fit --max-seq-len {meta['max_seq_len']}", file=sys.stderr)
    print(f"source      {meta['source']} ({counts['rows']} rows, {counts['skipped_bad']} skipped as bad)")
    print(f"tokenizer   {tokenizer.path.name} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.checksum[:12]})")
    print(f"format      {meta['format']}, template {meta['template']}, max_seq_len {meta['max_seq_len']}"
          + (f", learn {meta['learn']}" if meta["format"] in ("messages", "sharegpt") else ""))
    print(f"truncated   {counts['truncated'] + counts['truncated_turns']} (context {counts['truncated_context']}, "
          f"response {counts['truncated_response']}, later turns dropped {counts['truncated_turns']}, "
          f"assistant turn cut {counts['cut_turns']})")
    print(f"dropped     {counts['dropped']} (too long to fit)")
    for name, split in meta["splits"].items():
        print(f"{name:<11} {split['examples']:>6} examples {split['tokens']:>9} tokens  "
              f"learned {split['learned_fraction']:.1%}")
    print(f"lengths     mean {lengths['mean']:.0f}  p50 {lengths['p50']:.0f}  p90 {lengths['p90']:.0f}  "
          f"p99 {lengths['p99']:.0f}  max {lengths['max']}")
    print(f"categories  {', '.join(meta['category_names'])}")
    print(f"wrote       {args.out}")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``prepare``: parse ``argv`` (None: the command line) and run; a ``UserError`` exits 2 with one line.
    Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
