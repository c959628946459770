"""Train LoRA adapters on a frozen (4-bit) Mistral with our AdamW loop.

Example:
  python scripts/finetune.py --model models/mistral-7b-4bit --data data/dolly --out runs/dolly \\
      --batch-size 4 --grad-accum 4 --iters 1000 --learning-rate 2e-4 --grad-checkpoint
  python scripts/finetune.py --resume runs/dolly            # continue exactly where it stopped
  mlx.launch -n 2 -- python scripts/finetune.py --model ... --batch-size 8 ...   # 2 data-parallel ranks

Under mlx.launch, --batch-size is the global batch (a multiple of the number of ranks); only rank 0
writes the run folder. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import ALL_TARGETS, LoRAConfig, TrainConfig
from ..errors import EXIT_INTERRUPTED, UserError, run_cli
from .flags import parser, shown


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags. Every flag defaults to None so that only flags given on the command line
    override --config (or a resumed run's settings); the defaults are ``TrainConfig``'s and ``LoRAConfig``'s."""
    d, lora = TrainConfig(), LoRAConfig()
    overlap = {None: "on a GPU", True: "on", False: "off"}[d.overlap_steps]
    targets = "all seven" if lora.targets == ALL_TARGETS else ",".join(lora.targets)
    p = parser(__doc__, prog)
    p.add_argument("--config", help="YAML or JSON file with any of the settings below (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest complete checkpoint, with its saved settings "
                        "(flags given override them)")
    p.add_argument("--model", help="converted model folder (convert_weights.py output)")
    p.add_argument("--data", help="prepared data folder (prepare_data.py output)")
    p.add_argument("--out", help="run folder for checkpoints, metrics and adapters: new or empty (one that holds "
                                 "a run needs --resume or --overwrite; anything else is refused)")
    p.add_argument("--overwrite", action="store_const", const=True,
                   help="start a new run in --out even if it holds one: the old run's checkpoints, metrics and "
                        "adapters are deleted (once the model and data have loaded)")
    p.add_argument("--batch-size", type=int,
                   help=f"examples per micro-batch over all ranks (default {d.batch_size}; "
                        "a multiple of the rank count)")
    p.add_argument("--max-batch-tokens", type=int,
                   help="batch by a token budget instead of --batch-size: each micro-batch holds as many "
                        "examples as fit in rows x padded length <= this (short records fill a batch with many "
                        "rows, long ones with few; default: off)")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    p.add_argument("--learning-rate", type=float, help=f"peak learning rate (default {shown(d.learning_rate)})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW decoupled weight decay (default {shown(d.weight_decay)})")
    p.add_argument("--schedule", choices=["constant", "cosine", "linear"],
                   help=f"learning-rate decay (default {d.schedule})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default {d.warmup_steps})")
    p.add_argument("--warmup-ratio", type=float,
                   help=f"warm-up as a fraction of all steps (default {shown(d.warmup_ratio)})")
    p.add_argument("--iters", type=int, help="total optimizer steps (also when resuming)")
    p.add_argument("--epochs", type=float, help="train for this many passes over the data instead of --iters")
    p.add_argument("--max-time", help="wall-clock budget, e.g. 90s, 30m, 2h: stop cleanly and save")
    p.add_argument("--max-grad-norm", type=float,
                   help=f"global gradient-norm clip (default {shown(d.max_grad_norm)}; 0 disables)")
    p.add_argument("--grad-checkpoint", action="store_const", const=True,
                   help="recompute each decoder layer in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--overlap-steps", action=argparse.BooleanOptionalAction,
                   help="queue each step before the previous one's loss is read, so the device never waits for "
                        f"the host (default: {overlap})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help=f"compute dtype (default {d.dtype}: float32 on the CPU, the checkpoint's bfloat16 or float16 on a "
                        "GPU; adapters and optimizer state stay float32)")
    p.add_argument("--packing", action="store_const", const=True, help="pack several examples per row")
    p.add_argument("--lora-rank", type=int, help=f"adapter rank r (default {lora.rank})")
    p.add_argument("--lora-alpha", type=float, help=f"adapter alpha; scale = alpha / r (default {shown(lora.alpha)})")
    p.add_argument("--lora-dropout", type=float, help=f"dropout on the adapter input (default {shown(lora.dropout)})")
    p.add_argument("--lora-targets", help=f"comma-separated projections (default {targets}; on Phi-3 q/k/v "
                                          "and gate/up name its fused qkv_proj and gate_up_proj)")
    p.add_argument("--lora-init", choices=["default", "loftq"],
                   help=f"how new adapters start (default {d.lora_init}): 'loftq' starts them at the rank-r "
                        "correction of the quantization error that convert_weights.py --loftq-rank wrote into the "
                        "model folder (loftq/; --lora-rank must be that rank)")
    p.add_argument("--use-rslora", action="store_const", const=True, help="scale = alpha / sqrt(r)")
    p.add_argument("--seed", type=int, help=f"seed for data order, adapter init and dropout (default {d.seed})")
    p.add_argument("--eval-every", type=int, help=f"validate every N steps (default {d.eval_every})")
    p.add_argument("--eval-batches", type=int, help=f"validation batches per evaluation (default {d.eval_batches})")
    p.add_argument("--log-every", type=int, help=f"write metrics every N steps (default {d.log_every})")
    p.add_argument("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    p.add_argument("--keep-last", type=int, help=f"checkpoints to keep (default {d.keep_last})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> None:
    """Resolve the settings (defaults < --config or the resumed run's < flags), train, and print one line:
    why it stopped, the step, tokens and time. A diverged run exits with status 3."""
    from ..train.run_config import resume_config, resolve_config
    from ..train.trainer import Trainer, TrainingDiverged

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "no_progress", "overwrite")}
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run and --overwrite replaces it: give one of them")
    if args.resume and args.config:
        raise UserError(f"config: --config {args.config} with --resume: a resumed run takes its settings from "
                        f"{Path(args.resume) / 'run_config.json'}; give the settings to change as flags")
    if args.batch_size is not None and args.max_batch_tokens is not None:
        raise UserError("--batch-size and --max-batch-tokens both set the batch: give one of them")
    config = resume_config(args.resume, flags) if args.resume else resolve_config(flags, args.config)
    trainer = Trainer(config, resume=bool(args.resume), progress=not args.no_progress,
                      overwrite=bool(args.overwrite))
    main_rank = trainer.world.is_main  # the other ranks of an mlx.launch run stay quiet
    try:
        summary = trainer.train()
    except TrainingDiverged as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if main_rank:
        ranks = f" on {summary['world_size']} ranks" if "world_size" in summary else ""
        print(f"{summary['stop_reason']}: step {summary['step']}/{summary['total_steps']}, "
              f"{summary['tokens_seen']:,} tokens in {summary['elapsed_s']:.1f}s{ranks}; "
              f"adapters in {summary['run_dir']}")
    if summary["stop_reason"] == "interrupted":  # saved; `finetune.py ... && merge_adapters.py ...` stops here
        sys.exit(EXIT_INTERRUPTED)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``finetune``: parse ``argv`` (None: the command line) and run; a ``UserError`` exits 2 with one line,
    a diverged run 3, a run stopped by Ctrl-C 130 (after saving). Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
