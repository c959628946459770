"""Talk to a model: one prompt (--prompt) or a multi-turn chat on standard input.

The prompt template is the one the adapters were trained with (from the run's run_config.json), a merged
model's mlx_qlora.json, or --template; without any of those, the model's own chat template when its tokenizer
has one (else dolly). --system gives the chat template a system prompt; --no-template sends the text as it is
after BOS. Replies stream
token by token; prompt and generation speeds are printed at the end (on standard error).

Examples:
  python scripts/generate.py --model models/mistral-7b-4bit --adapter runs/dolly --prompt "Name three rivers."
  python scripts/generate.py --model models/mistral-7b-4bit --adapter runs/dolly     # chat; /reset, /quit
  echo "Name three rivers." | python scripts/generate.py --model models/merged --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..config import SEED_LIMIT, number
from ..errors import UserError, run_cli
from .flags import build, default, given, parser, shown

# Flags that set a field of ChatSession (the others of its fields are not settings).
SESSION_FLAGS = ("max_tokens", "stop", "seed", "system")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags; every value flag defaults to None (the defaults are ``SamplerConfig``'s and
    ``ChatSession``'s)."""
    from ..generate.chat import ChatSession
    from ..generate.sampling import SamplerConfig

    s = SamplerConfig()
    p = parser(__doc__, prog)
    p.add_argument("--model", required=True, help="model folder: converted (4-bit), Hugging Face, or merged")
    p.add_argument("--adapter", help="LoRA adapters to attach: a run folder or a checkpoint folder")
    p.add_argument("--prompt", help="answer this one prompt and exit (default: chat on standard input)")
    p.add_argument("--template",
                   help="prompt template: chat (the model's own chat template), dolly, alpaca, mistral; default: the "
                        "one the adapters were trained with, else the model's chat template when it has one, else "
                        "dolly")
    p.add_argument("--system", help="system prompt, given to the chat template before the conversation")
    p.add_argument("--no-template", action="store_true", help="send the text as it is after BOS (no template)")
    p.add_argument("--temperature", type=float,
                   help=f"sampling temperature; 0 is greedy (default {shown(s.temperature)})")
    p.add_argument("--top-p", type=float,
                   help=f"nucleus sampling: keep tokens up to this mass (1 = off; default {shown(s.top_p)})")
    p.add_argument("--top-k", type=int, help=f"keep only the k most likely tokens (0 = off; default {s.top_k})")
    p.add_argument("--min-p", type=float,
                   help=f"drop tokens below min-p x the top probability (0 = off; default {shown(s.min_p)})")
    p.add_argument("--repetition-penalty", type=float,
                   help=f"> 1 discourages repeated tokens (1 = off; default {shown(s.repetition_penalty)})")
    p.add_argument("--seed", type=int, help=f"random seed for sampling (default {default(ChatSession, 'seed')})")
    p.add_argument("--max-tokens", type=int,
                   help=f"most tokens to generate per reply (default {default(ChatSession, 'max_tokens')})")
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default auto: float32 on the CPU, the checkpoint's bfloat16 or float16 on a "
                        "GPU, as finetune.py)")
    return p


def run(args: argparse.Namespace) -> None:
    """Answer ``--prompt`` (streamed to standard output) or chat on standard input; the template in use
    and the speeds go to standard error."""
    from ..generate.chat import ChatSession, chat_loop
    from ..generate.loading import load_for_inference, resolve_template
    from ..generate.sampling import SamplerConfig

    if args.no_template and args.template:
        raise UserError("--template and --no-template exclude each other")
    sampler = build(SamplerConfig, given(args, SamplerConfig))
    session_values = {k: getattr(args, k) for k in SESSION_FLAGS if getattr(args, k) is not None}
    try:
        number("max_tokens", session_values.get("max_tokens", 1), integer=True, at_least=1)
        number("seed", session_values.get("seed", 0), integer=True, at_least=0, below=SEED_LIMIT)
    except ValueError as e:
        raise UserError(str(e)) from None
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter, args.dtype)
    if adapter is not None and adapter.note:
        print(adapter.note, file=sys.stderr)
    template = None
    if not args.no_template:
        template, source = resolve_template(args.template, adapter, args.model, tokenizer)
        print(f"template: {template} (from {source})", file=sys.stderr)
        if template == "none":  # adapters trained on completions or plain text: raw prompts
            template = None
    if args.system is not None and template != "chat":
        raise UserError(f"--system needs the model's chat template (template 'chat'); the template in use is "
                        f"{template or 'none'}")
    session = ChatSession(model, tokenizer, template, sampler=sampler, **session_values)
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


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``generate``: parse ``argv`` (None: the command line) and run; a ``UserError`` exits 2 with one line.
    Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
