#!/usr/bin/env python
"""Train LoRA adapters on a frozen (4-bit) Mistral with our AdamW loop.

Example:
  python scripts/finetune.py --model models/mistral-7b-4bit --data data/dolly --out runs/dolly \
      --batch-size 4 --grad-accum 4 --iters 1000 --learning-rate 2e-4 --grad-checkpoint
  python scripts/finetune.py --resume runs/dolly            # continue exactly where it stopped
  mlx.launch -n 2 -- python scripts/finetune.py --model ... --batch-size 8 ...   # 2 data-parallel ranks

Under mlx.launch, --batch-size is the global batch (a multiple of the number of ranks); only rank 0
writes the run folder. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mlx_qlora  # noqa: E402,F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every flag defaults to None so that only flags given on the command line override --config.
    p.add_argument("--config", help="YAML or JSON file with any of the settings below (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--model", help="converted model folder (convert_weights.py output)")
    p.add_argument("--data", help="prepared data folder (prepare_data.py output)")
    p.add_argument("--out", help="run folder for checkpoints, metrics and adapters")
    p.add_argument("--batch-size", type=int,
                   help="examples per micro-batch over all ranks (default 4; a multiple of the rank count)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay (default 0)")
    p.add_argument("--schedule", choices=["constant", "cosine", "linear"], help="learning-rate decay (default cosine)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    p.add_argument("--warmup-ratio", type=float, help="warm-up as a fraction of all steps")
    p.add_argument("--iters", type=int, help="total optimizer steps (also when resuming)")
    p.add_argument("--epochs", type=float, help="train for this many passes over the data instead of --iters")
    p.add_argument("--max-time", help="wall-clock budget, e.g. 90s, 30m, 2h: stop cleanly and save")
    p.add_argument("--max-grad-norm", type=float, help="global gradient-norm clip (default 1.0; 0 disables)")
    p.add_argument("--grad-checkpoint", action="store_const", const=True,
                   help="recompute each decoder layer in the backward pass (less memory, ~30%% slower)")
    p.add_argument("--overlap-steps", action=argparse.BooleanOptionalAction,
                   help="queue each step before the previous one's loss is read, so the device never waits for "
                        "the host (default: on a GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32; adapters and optimizer state stay float32)")
    p.add_argument("--packing", action="store_const", const=True, help="pack several examples per row")
    p.add_argument("--lora-rank", type=int, help="adapter rank r (default 16)")
    p.add_argument("--lora-alpha", type=float, help="adapter alpha; scale = alpha / r (default 32)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default 0)")
    p.add_argument("--lora-targets", help="comma-separated projections (default all seven)")
    p.add_argument("--use-rslora", action="store_const", const=True, help="scale = alpha / sqrt(r)")
    p.add_argument("--seed", type=int, help="seed for data order, adapter init and dropout (default 0)")
    p.add_argument("--eval-every", type=int, help="validate every N steps (default 50)")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default 16)")
    p.add_argument("--log-every", type=int, help="write metrics every N steps (default 10)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100)")
    p.add_argument("--keep-last", type=int, help="checkpoints to keep (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mlx_qlora.train.run_config import resolve_config
    from mlx_qlora.train.trainer import Trainer, TrainingDiverged

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "no_progress")}
    config_file = args.config
    if args.resume:
        saved = Path(args.resume) / "run_config.json"
        if not saved.exists():
            raise UserError(f"{saved}: not found; --resume needs a run folder made by finetune.py")
        record = json.loads(saved.read_text(encoding="utf-8"))
        base = {k: v for k, v in record.items()
                if k not in ("data_meta", "template", "total_steps", "world_size")}
        base.update({k: v for k, v in flags.items() if v is not None})
        base["out"] = str(Path(args.resume))
        flags = base
        config_file = None
    config = resolve_config(flags, config_file)
    trainer = Trainer(config, resume=bool(args.resume), progress=not args.no_progress)
    main_rank = trainer.world.is_main  # the other ranks of an mlx.launch run stay quiet
    try:
        summary = trainer.train()
    except TrainingDiverged as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    if not main_rank:
        return
    ranks = f" on {summary['world_size']} ranks" if "world_size" in summary else ""
    print(f"{summary['stop_reason']}: step {summary['step']}/{summary['total_steps']}, "
          f"{summary['tokens_seen']:,} tokens in {summary['elapsed_s']:.1f}s{ranks}; "
          f"adapters in {summary['run_dir']}")


if __name__ == "__main__":
    run_cli(main)
