#!/usr/bin/env python
"""Time data preparation at Dolly-15k size and measure how much padding the batch iterator wastes.

The shipped sample is repeated to 15,011 records (Dolly 15k's size) and prepared with the real Mistral v1
tokenizer (from the ``mistral-common`` package unless --tokenizer is given). Reported:

- the whole ``prepare_dataset`` run (read, tokenize with label masks, split, write) and its phases;
- tokenizing with the tokenizer's batch encoder next to the simple one-example-at-a-time loop;
- padding efficiency (real tokens / tokens computed) of the train split for plain shuffled batches,
  length-bucketed batches and packed rows, and how fast an epoch of batches is built.

  python benchmarks/prepare.py --json runs/bench/prepare.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlx_qlora  # noqa: E402,F401
from mlx_qlora.config import DataConfig  # noqa: E402
from mlx_qlora.data import (  # noqa: E402
    BatchIterator,
    PreparedDataset,
    load_records,
    load_tokenizer,
    prepare_dataset,
    split_indices,
    tokenize_example,
    tokenize_records,
)
from mlx_qlora.errors import UserError, run_cli  # noqa: E402
from mlx_qlora.io import atomic_write_json  # noqa: E402

DOLLY_SIZE = 15011


def default_tokenizer() -> Path:
    try:
        import mistral_common
    except ImportError:
        raise UserError("pass --tokenizer (or pip install mistral-common for the Mistral v1 tokenizer)") from None
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def timed(fn, repeats: int = 1):
    """(result of the last call, median seconds)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(ROOT / "data" / "sample" / "dolly_sample.jsonl"), help="records to repeat")
    p.add_argument("--records", type=int, default=DOLLY_SIZE, help="records after repeating (default %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json / model dir (default: Mistral v1)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the whole preparation (median)")
    p.add_argument("--long-fraction", type=float, default=0.02,
                   help="share of records whose context is made ~3,000 tokens long for the truncation run")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args()

    tokenizer_path = Path(args.tokenizer) if args.tokenizer else default_tokenizer()
    tokenizer = load_tokenizer(tokenizer_path)
    sample = Path(args.dataset).read_text(encoding="utf-8").splitlines()
    sample = [line for line in sample if line.strip()]
    lines = [sample[i % len(sample)] for i in range(args.records)]
    config = DataConfig(max_seq_len=args.max_seq_len)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "records": args.records,
        "tokenizer": tokenizer_path.name,
        "max_seq_len": args.max_seq_len,
    }
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dolly_sized.jsonl"
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")

        meta, total = timed(lambda: prepare_dataset(source, tokenizer, Path(tmp) / "out", config), args.repeats)
        loaded, t_load = timed(lambda: load_records(source))
        records = loaded.records
        _, t_split = timed(lambda: split_indices([r.category for r in records], config.val_fraction, seed=0))
        examples, t_batch = timed(lambda: tokenize_records(tokenizer, "dolly", records, args.max_seq_len, 16))
        _, t_loop = timed(
            lambda: [tokenize_example(tokenizer, "dolly", r.instruction, r.context, r.response, args.max_seq_len)
                     for r in records]
        )
        tokens = sum(len(e) for e in examples if e is not None)

        # The same size with some very long contexts: exercises truncation (tokenize again, cut, repeat).
        long_lines = []
        for i, line in enumerate(lines):
            row = json.loads(line)
            if (i * args.long_fraction) % 1 + args.long_fraction >= 1:
                row["context"] = ((row["context"] or row["response"]) + " ") * 40
            long_lines.append(json.dumps(row, ensure_ascii=False))
        long_source = Path(tmp) / "dolly_sized_long.jsonl"
        long_source.write_text("\n".join(long_lines) + "\n", encoding="utf-8")
        long_meta, t_long = timed(
            lambda: prepare_dataset(long_source, tokenizer, Path(tmp) / "long", config), args.repeats
        )
        results["prepare"] = {
            "total_s": round(total, 3),
            "load_s": round(t_load, 3),
            "split_s": round(t_split, 4),
            "tokenize_batch_s": round(t_batch, 3),
            "tokenize_loop_s": round(t_loop, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / t_batch),
            "examples": meta["counts"]["examples"],
            "truncated": meta["counts"]["truncated"],
            "dropped": meta["counts"]["dropped"],
            "learned_fraction": meta["learned_fraction"],
            "token_lengths": meta["token_lengths"],
            "long_context_total_s": round(t_long, 3),
            "long_context_tokens": long_meta["tokens"],
            "long_context_truncated": long_meta["counts"]["truncated"],
            "long_context_dropped": long_meta["counts"]["dropped"],
        }

        train = PreparedDataset(Path(tmp) / "out", "train")
        rows = []
        for batch_size in (4, 8):
            for name, kwargs in (("shuffled", dict(bucketing=False)), ("bucketed", {}), ("packed", dict(packing=True))):
                it = BatchIterator(train, batch_size=batch_size, seed=0, **kwargs)
                n_batches = len(it)
                _, t_epoch = timed(lambda: [next(it) for _ in range(n_batches)])
                rows.append({
                    "batch_size": batch_size,
                    "mode": name,
                    "batches": n_batches,
                    "efficiency": round(it.epoch_efficiency(0), 4),
                    "epoch_build_s": round(t_epoch, 3),
                })
        results["batching"] = rows

    r = results["prepare"]
    print(f"prepare_dataset: {args.records} records, {r['tokens']} tokens, {tokenizer_path.name}, "
          f"max_seq_len {args.max_seq_len}, {os.cpu_count()} CPUs")
    print(f"{'phase':<34}{'seconds':>10}")
    for label, key in (("whole run (median of %d)" % args.repeats, "total_s"), ("read + check records", "load_s"),
                       ("seeded stratified split", "split_s"), ("tokenize + mask (batch encoder)", "tokenize_batch_s"),
                       ("tokenize + mask (one at a time)", "tokenize_loop_s"),
                       ("whole run, long contexts (median)", "long_context_total_s")):
        print(f"{label:<34}{r[key]:>10.3f}")
    print(f"tokens/s (batch encoder): {r['tokens_per_s']:,}; truncated {r['truncated']}, dropped {r['dropped']}, "
          f"learned {r['learned_fraction']:.1%}")
    print(f"long-context run: {r['long_context_tokens']:,} tokens, truncated {r['long_context_truncated']}, "
          f"dropped {r['long_context_dropped']}")
    print()
    print(f"{'batch':>5} {'mode':<10}{'batches':>9}{'efficiency':>12}{'epoch build s':>15}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['mode']:<10}{row['batches']:>9}{row['efficiency']:>12.1%}"
              f"{row['epoch_build_s']:>15.3f}")
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    else:
        print("\n" + json.dumps(results))


if __name__ == "__main__":
    run_cli(main)
