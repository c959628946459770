#!/usr/bin/env python
"""Talk to a model: one prompt (--prompt) or a multi-turn chat on standard input.

The prompt template is the one the adapters were trained with (from the run's run_config.json), a merged
model's mlx_qlora.json, or --template; --no-template sends the text as it is after BOS. Replies stream
token by token; prompt and generation speeds are printed at the end (on standard error).

Examples:
  python scripts/generate.py --model models/mistral-7b-4bit --adapter runs/dolly --prompt "Name three rivers."
  python scripts/generate.py --model models/mistral-7b-4bit --adapter runs/dolly     # chat; /reset, /quit
  echo "Name three rivers." | python scripts/generate.py --model models/merged --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mlx_qlora  # noqa: E402,F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder: converted (4-bit), Hugging Face, or merged")
    p.add_argument("--adapter", help="LoRA adapters to attach: a run folder or a checkpoint folder")
    p.add_argument("--prompt", help="answer this one prompt and exit (default: chat on standard input)")
    p.add_argument("--template", help="prompt template (dolly, alpaca, mistral); default: the training one")
    p.add_argument("--no-template", action="store_true", help="send the text as it is after BOS (no template)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: as stored; float32 is fastest on a CPU)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mlx_qlora.generate.chat import ChatSession, chat_loop
    from mlx_qlora.generate.loading import load_for_inference, resolve_template
    from mlx_qlora.generate.sampling import SamplerConfig

    if args.no_template and args.template:
        raise UserError("--template and --no-template exclude each other")
    try:
        sampler = SamplerConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter, args.dtype)
    if adapter is not None and adapter.note:
        print(adapter.note, file=sys.stderr)
    template = None
    if not args.no_template:
        template, source = resolve_template(args.template, adapter, args.model)
        print(f"template: {template} (from {source})", file=sys.stderr)
    session = ChatSession(model, tokenizer, template, max_tokens=args.max_tokens, sampler=sampler,
                          stop=args.stop, seed=args.seed)
    if args.prompt is not None:
        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = session.reply(args.prompt, write)
        sys.stdout.write("\n")
        print(f"[{result.finish_reason}] {result.stats.summary()}", file=sys.stderr)
        return
    totals = chat_loop(session)
    print(f"session totals: {totals.summary()}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
