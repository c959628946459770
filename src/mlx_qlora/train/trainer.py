"""The training loop: LoRA on a frozen (4-bit) base, AdamW, accumulation, clipping, evaluation,
checkpoints, exact resume, Ctrl-C and NaN handling, metrics.

A run directory holds:
- ``run_config.json``: the resolved configuration, its paths absolute (and what the data and model were);
- ``metrics.jsonl``: one JSON object per logged step and per evaluation;
- ``checkpoints/step-XXXXXXX/``: adapters, optimizer state, trainer state (see ``checkpoint.py``);
- ``adapter_model.safetensors`` + ``adapter_config.json``: the final adapters, in PEFT's format;
- ``loss.png``: the loss curve (when matplotlib is installed).

Under ``mlx.launch`` (several ranks, see ``distributed.py``) every rank trains on its rows of each global
batch and the gradients are summed across ranks before the update; only rank 0 writes the run folder
and shows the progress bar, and every stop decision (Ctrl-C, time budget, a callback) is agreed by all ranks.

Code that drives a run observes it, or stops it, through callbacks (``TrainerCallback``) rather than by
replacing the trainer's methods.
"""

from __future__ import annotations

import hashlib
import math
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import TrainConfig
from ..data.dataset import BatchIterator, PreparedDataset, check_context, check_tokenizer
from ..data.tokenizer import load_tokenizer
from ..device import device_type
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text, json_line
from ..model import load_model
from ..model.loading import compute_dtype, model_args_from_config, read_config, resolve_dtype
from ..model.mistral import checkpoint_span
from ..outputs import RUN, claim_output
from ..lora.adapters import WEIGHTS_NAME, save_adapters
from ..lora.apply import apply_lora, format_trainable, model_targets
from ..lora.loftq import init_from_loftq
from .checkpoint import (
    CHECKPOINTS_DIR, LATEST_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME, CheckpointDamaged, find_resumable,
    read_latest_pointer, save_checkpoint,
)
from .distributed import World, all_sum_step, check_same_everywhere, init_world, rank_seed
from .optimizer import AdamW
from .plot import plot_losses
from .run_ahead import bound_run_ahead
from .run_config import parse_duration
from .run_state import RunState, run_state_from, trim_metrics
from .schedule import build_schedule
from .throughput import step_done_at
from .flat import FLAT, MOMENTS, FlatLayout
from .params import TrainableSlots
from .step import add_trees, make_eval_fn, make_grad_fn, make_update_fn


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainerCallback(Protocol):
    """What ``Trainer(..., callbacks=[...])`` calls. Any object with this method will do."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict[str, float]) -> Optional[bool]:
        """Called on every rank after optimizer step ``step`` (1-based; ``trainer.state.step``) is counted,
        logged, evaluated and saved as the configuration asks. ``metrics``: the step's ``loss``, ``lr``,
        ``grad_norm``, ``learned_tokens`` and ``tokens``. Return True to stop the run as Ctrl-C does: a step
        already queued (``overlap_steps``) is finished too, a checkpoint is saved, and the summary's
        ``stop_reason`` is ``"interrupted"``; None or False to go on."""
        ...


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of optimizer step ``step``: dropout masks depend on (seed, step) only, so resume is exact."""
    return (seed * 1_000_003 + step) % (2**63)


def lora_parameters(model) -> dict[str, mx.array]:
    """The trainable parameters, flat, keyed by module path (``model.layers.0.self_attn.q_proj.lora_A``)."""
    return dict(tree_flatten(model.trainable_parameters()))


def batch_arrays(batch: dict[str, np.ndarray], packed: bool) -> tuple[mx.array, ...]:
    """The arrays the compiled step takes, in order."""
    names = ("input_ids", "labels", "position_ids", "segment_ids") if packed else ("input_ids", "labels")
    return tuple(mx.array(batch[name]) for name in names)


class Trainer:
    """Owns the model, data, optimizer and run directory of one fine-tuning run.

    ``world``: this process's rank among the data-parallel ranks (default: ``init_world()``, which is a
    single process unless started by ``mlx.launch``). ``config.batch_size`` is the global batch.
    ``callbacks``: ``TrainerCallback`` objects, called in order after every step.

    A new run (not ``resume``) claims ``config.out`` before loading anything (``outputs.claim_output``): a
    new or empty folder, or, with ``overwrite``, a run folder of ours, whose old contents are deleted once the
    model and data have loaded; anything else is refused.
    """

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True,
                 world: Optional[World] = None, callbacks: Sequence[TrainerCallback] = (), overwrite: bool = False):
        self.config = config
        self.run_dir = Path(config.out)
        bound_run_ahead(config.grad_checkpoint)  # before anything runs on the GPU
        self.world = world if world is not None else init_world()
        self.progress = progress and self.world.is_main
        self.callbacks = list(callbacks)
        self.interrupted = False
        self._queued = 0  # steps queued and not yet finished
        self.local_tokens = 0  # real tokens of this rank in the last step
        self._setup(resume, overwrite)

    # ---- set-up ---------------------------------------------------------------------------------

    def _setup(self, resume: bool, overwrite: bool = False) -> None:
        c = self.config
        if not c.model:
            raise UserError("model: give the converted model folder (--model)")
        if not c.data:
            raise UserError("data: give the prepared data folder (--data)")
        if not c.out:
            raise UserError("out: give the run folder (--out)")
        # Absolute from here on, so that run_config.json and the checkpoints name them from any directory.
        self.config = c = replace(c, model=str(Path(c.model).resolve()), data=str(Path(c.data).resolve()))
        output = None  # only rank 0 writes the run folder, so only it claims one
        if not resume and self.world.is_main:
            output = claim_output(c.out, RUN, inputs=(c.model, c.data), replace=overwrite, replace_hint=(
                f"continue it with --resume {c.out}, or give --overwrite to start a new run there (the old "
                "one's checkpoints, metrics and adapters are deleted)"))
        self.tokenizer = load_tokenizer(c.model)
        self.train_data = PreparedDataset(c.data, "train")
        check_tokenizer(self.train_data.meta, self.tokenizer)
        has_val = (Path(c.data) / "validation.safetensors").exists()
        self.val_data = PreparedDataset(c.data, "validation") if has_val else None
        model_config = Path(c.model) / "config.json"
        context = model_args_from_config(read_config(c.model), str(model_config)).max_position_embeddings
        for data in (self.train_data, self.val_data):  # before the weights are read: they may take minutes
            if data is not None:
                check_context(data, context, model_config)

        mx.random.seed(c.seed)
        # "auto" resolved once and recorded, so that a resumed run computes as this one did on any device
        dtype, why = compute_dtype(c.dtype, c.model, device_type())
        self.config = c = replace(c, dtype=dtype)
        self.dtype_note = f"compute dtype: {dtype} ({why}); adapters and optimizer state: float32"
        self.dtype = resolve_dtype(dtype)
        self.model = load_model(c.model, dtype=self.dtype)
        self.model.freeze()
        try:
            apply_lora(self.model, c.lora)
        except ValueError as e:  # targets this model does not have (qkv_proj on a Llama), a layer out of range
            raise UserError(f"{model_config}: lora: {e}") from None
        # recorded as the model names them (Phi-3's fused qkv_proj / gate_up_proj), as the adapter files do
        self.config = c = replace(c, lora=replace(c.lora, targets=model_targets(self.model, c.lora.targets)))
        if c.lora_init == "loftq" and not resume:
            init_from_loftq(self.model, c.model)
        # Adapters and their optimizer state stay in float32 whatever the compute dtype.
        self.model.update(tree_map(lambda p: p.astype(mx.float32), self.model.trainable_parameters()))
        self.model.model.grad_checkpoint = c.grad_checkpoint
        self.model.train()

        if c.max_batch_tokens is None and c.batch_size % self.world.size:
            raise UserError(f"batch_size: the global batch of {c.batch_size} rows cannot be split evenly over "
                            f"{self.world.size} ranks; give --batch-size a multiple of {self.world.size}")
        self.iterator = BatchIterator(
            self.train_data, batch_size=c.batch_size, seed=c.seed, shuffle=True, packing=c.packing,
            max_seq_len=self.train_data.meta.get("max_seq_len"), rank=self.world.rank, world_size=self.world.size,
            max_batch_tokens=c.max_batch_tokens,
        )
        self.total_steps = self._total_steps()
        self.schedule = build_schedule(c.schedule, c.learning_rate, self.total_steps, warmup_steps=c.warmup_steps,
                                       warmup_ratio=c.warmup_ratio, min_lr_ratio=c.min_lr_ratio)
        self.optimizer = AdamW(betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay)
        self.slots = TrainableSlots(self.model)
        self.layout = FlatLayout(self.slots.get())
        self.flat_params = self.layout.concat(self.slots.get())  # the update's input: one float32 vector
        self.flat_state = self.optimizer.init({FLAT: self.flat_params})
        self.state = RunState()
        self.resumed_from: Optional[Path] = None
        self.resume_notes: list[str] = []
        if resume:
            self._restore()
            self._check_steps_left()
        self.grad_fn = make_grad_fn(self.model, c.loss_chunk, c.packing)
        self.eval_fn = make_eval_fn(self.model, c.loss_chunk, c.packing)
        self.update_fn = make_update_fn(self.optimizer, c.max_grad_norm, self.layout)
        self._check_ranks_agree()
        if self.world.is_main:
            if resume:
                self._continue_run_folder()
            if output is not None:
                output.make_dir()  # a run replaced (--overwrite) goes now, after every check and load
            self._write_run_config()

    def _check_ranks_agree(self) -> None:
        """Ranks that disagree on the data, the schedule or the starting point would hang in a collective
        or drift apart silently: compare what fixes them and stop every rank with the same message."""
        if not self.world.distributed:
            return
        params = lora_parameters(self.model)
        digest = hashlib.sha256()  # of the exact bits: the same on every machine, whatever its reductions
        for key in sorted(params):
            digest.update(key.encode() + np.array(params[key].astype(mx.float32)).tobytes())
        problem = check_same_everywhere(self.world, {
            "train examples": len(self.train_data), "train tokens": self.train_data.num_tokens,
            "validation examples": len(self.val_data) if self.val_data is not None else -1,
            "total steps": self.total_steps, "start step": self.state.step,
            "global batch size": self.config.batch_size, "max batch tokens": self.config.max_batch_tokens or 0,
            "grad accum": self.config.grad_accum,
            "seed": self.config.seed, "trainable parameters": sum(v.size for v in params.values()),
            "adapter checksum": int.from_bytes(digest.digest()[:3], "little"),  # < 2**24: exact as float32
        })
        if problem:
            raise UserError(f"distributed run: {problem}; every rank needs the same model, data, flags and "
                            "checkpoint")

    def batch_note(self) -> str:
        """One line on how the training data is batched: the batch rule, batches per epoch, the share of
        computed tokens that are real, and the row lengths (the compiled step is built once per shape)."""
        it, c = self.iterator, self.config
        rule = (f"up to {c.max_batch_tokens:,} tokens (rows x padded length)" if c.max_batch_tokens is not None
                else f"{c.batch_size} rows")
        widths = it.row_lengths()
        return (f"batches: {rule}{', packed' if c.packing else ''}; {len(it):,} per epoch, "
                f"{it.epoch_efficiency():.0%} of computed tokens real; {len(widths)} row length(s) "
                f"{widths[0]}-{widths[-1]}")

    def checkpoint_note(self) -> Optional[str]:
        """With gradient checkpointing, one line on which layer inputs are kept for the largest batch
        (``model/mistral.checkpoint_span``); None without checkpointing."""
        c = self.config
        if not c.grad_checkpoint:
            return None
        tokens = c.max_batch_tokens
        if tokens is None:
            tokens = c.batch_size * self.iterator.row_lengths()[-1]
        layers = len(self.model.layers)
        input_bytes = tokens * self.model.args.hidden_size * self.dtype.size  # one layer's input, (B, L, D)
        span = checkpoint_span(layers, input_bytes, mx.get_memory_limit())
        if span == 1:
            return f"gradient checkpointing: every layer's input kept ({layers} layers)"
        return (f"gradient checkpointing: the largest batch ({tokens:,} tokens) keeps one input per segment of "
                f"{span} layers ({layers} layers; MLX_QLORA_CHECKPOINT_SPAN)")

    def _total_steps(self) -> int:
        c = self.config
        steps_per_epoch = max(1, len(self.iterator) // c.grad_accum)
        if c.iters is not None:
            return c.iters
        if c.epochs is not None:
            return max(1, math.ceil(c.epochs * steps_per_epoch))
        if c.max_time is not None:
            return 10**9  # bounded by the clock
        return steps_per_epoch  # one epoch by default

    def _config_record(self) -> dict[str, Any]:
        """The configuration as saved in run_config.json and in checkpoints: every path absolute."""
        return {**self.config.to_dict(), "out": str(self.run_dir.resolve())}

    def _write_run_config(self) -> None:
        record = self._config_record()
        record["data_meta"] = {k: self.train_data.meta.get(k) for k in ("template", "source", "max_seq_len",
                                                                        "tokenizer_checksum")}
        record["template"] = self.train_data.meta.get("template")
        record["total_steps"] = self.total_steps
        if self.world.distributed:
            record["world_size"] = self.world.size
        atomic_write_json(self.run_dir / "run_config.json", record)

    # ---- checkpoints ----------------------------------------------------------------------------

    def _restore(self) -> None:
        """Load the newest complete, readable checkpoint of the run (``find_resumable``): newer ones that are
        incomplete or damaged are passed over, with a note each; a checkpoint that this run's settings cannot
        continue (other adapters, another data order) stops the resume with one line."""
        chosen: dict[str, Any] = {}

        def validate(ckpt: dict[str, Any]) -> None:
            path = ckpt["path"]
            self._check_same_adapters(path, ckpt["adapters"], ckpt["lora_config"])
            chosen["state"] = run_state_from(path / TRAINER_STATE_NAME, ckpt["trainer_state"])
            self._finite_vector(ckpt["adapters"], path / WEIGHTS_NAME, "")
            chosen["flat_state"] = self._optimizer_state(path, ckpt)

        ckpt, self.resume_notes = find_resumable(self.run_dir, validate)
        path, state = ckpt["path"], chosen["state"]
        try:
            self.iterator.load_state_dict(state.data_cursor)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        self.model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in ckpt["adapters"].items()]))
        self.flat_params = self.layout.concat(self.slots.get())
        self.flat_state = chosen["flat_state"]
        self.state = state
        self.resumed_from = path

    def _finite_vector(self, tensors: dict[str, mx.array], source: Path, prefix: str) -> mx.array:
        """The layout's arrays of ``tensors`` as one float32 vector; ``CheckpointDamaged`` naming the first
        tensor (``prefix`` + path) that holds NaN or Inf."""
        vector = self.layout.concat(tensors)
        if not mx.all(mx.isfinite(vector)).item():
            name = next(k for k in self.layout.paths if not mx.all(mx.isfinite(tensors[k])).item())
            raise CheckpointDamaged(f"{source}: {prefix}{name} holds NaN or Inf")
        return vector

    def _optimizer_state(self, path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's AdamW state in the flat form of the update; ``CheckpointDamaged`` when a moment is
        missing, of another shape or not finite, or its step is not the checkpoint's."""
        source = path / OPTIMIZER_NAME
        try:
            state = AdamW.load_state_dict(ckpt["optimizer"])
        except KeyError as e:
            raise CheckpointDamaged(f"{source}: {e.args[0]}") from None
        if state["step"].item() != ckpt["step"]:
            raise CheckpointDamaged(f"{source}: at step {state['step'].item()}, the checkpoint at {ckpt['step']}")
        flat_state = {"step": state["step"]}
        for key in MOMENTS:
            for name, shape, _ in self.layout.entries:
                moment = state[key].get(name)
                if moment is None or tuple(moment.shape) != shape:
                    found = "missing" if moment is None else f"of shape {tuple(moment.shape)}"
                    raise CheckpointDamaged(f"{source}: {key}.{name} is {found}, expected {shape}")
            flat_state[key] = {FLAT: self._finite_vector(state[key], source, f"{key}.")}
        return flat_state

    def _check_steps_left(self) -> None:
        """A resumed run must have steps left under its settings: ``iters`` (or ``epochs``) below the steps
        already done, or a ``max_time`` already spent, is a one-line error rather than a run that reports
        "done" at a step past its end."""
        c, done = self.config, self.state.step
        where = f"{self.run_dir}: the run already did {done} steps ({CHECKPOINTS_DIR}/{self.resumed_from.name})"
        if done > self.total_steps:
            if c.iters is not None:
                raise UserError(f"{where}, more than iters {c.iters}; to train further give --iters above {done}")
            per_epoch = self.total_steps if c.epochs is None else max(1, len(self.iterator) // c.grad_accum)
            asked = f"epochs {c.epochs:g}" if c.epochs is not None else "one epoch (no iters or epochs given)"
            raise UserError(f"{where}, more than {asked} makes ({self.total_steps} steps of {per_epoch} per "
                            f"epoch); to train further give --epochs above {done / per_epoch:.4g} or --iters "
                            f"above {done}")
        max_seconds = parse_duration(c.max_time)
        if max_seconds is not None and self.state.elapsed >= max_seconds:
            raise UserError(f"{where} in {self.state.elapsed:.0f}s, all of max_time {c.max_time}; to train further "
                            f"give a longer --max-time")
        if done == self.total_steps:
            self.resume_notes.append(f"the run already did all {done} steps: nothing left to train")

    def _continue_run_folder(self) -> None:
        """Rank 0, once every check has passed: say where the run continues from (notes on stderr), drop the
        rows of ``metrics.jsonl`` after that step (they are trained again, so they would come twice), and
        point ``checkpoints/latest`` at the checkpoint resumed from."""
        step, name = self.state.step, self.resumed_from.name
        print(f"resuming {self.run_dir} from {CHECKPOINTS_DIR}/{name} (step {step} of {self.total_steps})")
        dropped, unreadable = trim_metrics(self.run_dir / "metrics.jsonl", step)
        if dropped:
            self.resume_notes.append(f"metrics.jsonl: dropped {dropped} row(s) after step {step} (those steps are "
                                     "trained again)")
        if unreadable:
            self.resume_notes.append(f"metrics.jsonl: dropped {unreadable} line(s) that are not JSON records (a "
                                     "write cut short)")
        for note in self.resume_notes:
            print(f"note: {note}", file=sys.stderr)
        if read_latest_pointer(self.run_dir)[0] != name:
            atomic_write_text(self.run_dir / CHECKPOINTS_DIR / LATEST_NAME, name + "\n")

    def _check_same_adapters(self, path: Path, params: dict, saved) -> None:
        """A resumed run continues the checkpoint's training exactly only with the same LoRA settings:
        the same adapters (layers, projections, rank) and the same scale and dropout."""
        hint = "resume with the LoRA settings of that run, or train into a new --out folder"
        expected = lora_parameters(self.model)
        for keys, what in ((set(expected) - set(params), "lack"), (set(params) - set(expected), "have an extra")):
            if keys:
                raise UserError(f"{path}: the checkpoint's adapters {what} {sorted(keys)[0]} (other layers or "
                                f"projections than this run's); {hint}")
        for key, value in expected.items():
            if params[key].shape != value.shape:
                raise UserError(f"{path}: {key} is {tuple(params[key].shape)} in the checkpoint (rank {saved.rank}) "
                                f"and {tuple(value.shape)} here (rank {self.config.lora.rank}); {hint}")
        for name in ("alpha", "use_rslora", "dropout"):
            there, here = getattr(saved, name), getattr(self.config.lora, name)
            if there != here:
                raise UserError(f"{path}: the checkpoint's adapters were trained with lora {name} {there}, this "
                                f"run asks for {here}; {hint}")

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (atomically) and return its folder (rank 0 only; other
        ranks write nothing and return None)."""
        if not self.world.is_main:
            return None
        self.state.data_cursor = self.iterator.state_dict()
        trainer_state = {
            "step": self.state.step, "tokens_seen": self.state.tokens_seen, "elapsed": self.state.elapsed,
            "best_val_loss": self.state.best_val_loss, "data_cursor": self.state.data_cursor,
            "seed": self.config.seed, "rng": "per-step seed: (seed * 1000003 + step)",
        }
        return save_checkpoint(
            self.run_dir, self.state.step, adapters=lora_parameters(self.model), lora_config=self.config.lora,
            base_model=self.config.model,
            optimizer_state=AdamW.state_dict(self.layout.tensor_state(self.flat_state)),
            trainer_state=trainer_state, config=self._config_record(), keep_last=self.config.keep_last,
        )

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> Optional[dict[str, float]]:
        """Mean loss and perplexity over (a fixed subset of) the validation split."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.eval()
        iterator = BatchIterator(self.val_data, batch_size=self.config.batch_size, seed=0, shuffle=False,
                                 packing=self.config.packing, repeat=False, rank=self.world.rank,
                                 world_size=self.world.size, max_batch_tokens=self.config.max_batch_tokens)
        total, count = 0.0, 0
        for i, batch in enumerate(iterator):  # every rank walks the same global batches
            if self.config.eval_batches is not None and i >= self.config.eval_batches:
                break
            if len(batch["input_ids"]) == 0:  # a final partial batch may leave this rank no rows
                continue
            loss_sum, n = self.eval_fn(*batch_arrays(batch, self.config.packing))
            mx.eval(loss_sum, n)
            total += loss_sum.item()
            count += int(n.item())
        self.model.train()
        if self.world.distributed:  # one collective per evaluation on every rank
            total, count = self.world.sum_exact([total, count])
            count = int(count)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}

    # ---- the loop -------------------------------------------------------------------------------

    def _queue_step(self) -> dict[str, Any]:
        """Build the next optimizer step and queue it on the device without waiting for it.

        The model's adapters and the optimizer state are replaced by the step's results (not yet computed),
        so a step queued after this one builds on them. Returns what ``_finish_step`` reads."""
        c = self.config
        step = self.state.step + self._queued  # steps before this one
        mx.random.seed(rank_seed(step_seed(c.seed, step), self.world.rank))
        loss_sum, n_learned, grad_sums, real_tokens = mx.array(0.0), mx.array(0), None, 0
        for _ in range(c.grad_accum):
            batch = next(self.iterator)  # this rank's rows of the next global batch
            if len(batch["input_ids"]) == 0:  # a final partial batch may leave this rank no rows
                continue
            real_tokens += int(batch["lengths"].sum())
            if grad_sums is not None:  # the previous micro-batch done before this one's activations exist
                mx.eval(loss_sum, n_learned, grad_sums)
            s, n, g = self.grad_fn(*batch_arrays(batch, c.packing))
            loss_sum, n_learned, grad_sums = loss_sum + s, n_learned + n, add_trees(grad_sums, g)
            # Queued in an evaluation of their own, not waited for: the update below is built while the GPU
            # runs the backward pass (in one evaluation with the update, MLX would hold more at its peak).
            mx.async_eval(loss_sum, n_learned, grad_sums)
        if grad_sums is None:
            grad_sums = {k: mx.zeros_like(v) for k, v in self.slots.get().items()}
        local_tokens = real_tokens
        # Sums over the ranks, divided once below: the step of one process on the whole global batch.
        grad_sums, loss_sum, n_learned, real_tokens = all_sum_step(self.world, grad_sums, loss_sum, n_learned,
                                                                   real_tokens)
        lr = self.schedule(step)
        self.flat_params, params, self.flat_state, norm = self.update_fn(
            self.flat_params, grad_sums, self.flat_state, mx.array(lr, dtype=mx.float32), n_learned)
        self.slots.set(params)
        loss = loss_sum / mx.maximum(n_learned, 1)
        mx.async_eval(self.flat_params, params, self.flat_state, loss, norm)
        self._queued += 1
        return {"loss": loss, "norm": norm, "n_learned": n_learned, "lr": lr, "tokens": real_tokens,
                "local_tokens": local_tokens}

    def _finish_step(self, queued: dict[str, Any]) -> dict[str, float]:
        """Wait for a step queued by ``_queue_step`` (the oldest one) and count it; its metrics."""
        loss_value, norm = queued["loss"].item(), queued["norm"].item()
        self._queued -= 1
        if not math.isfinite(loss_value) or not math.isfinite(norm):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {self.state.step + 1}; stopped without saving this step "
                f"(lower --learning-rate, or check the data); the last good checkpoint is kept"
            )
        self.state.step += 1
        self.state.tokens_seen += queued["tokens"]
        self.local_tokens = queued["local_tokens"]
        return {"loss": loss_value, "lr": float(queued["lr"]), "grad_norm": norm,
                "learned_tokens": int(queued["n_learned"].item()), "tokens": queued["tokens"]}

    def _one_step(self) -> dict[str, float]:
        """One optimizer step, waited for."""
        return self._finish_step(self._queue_step())

    def _may_overlap(self, step: int) -> bool:
        """Whether the step after ``step`` may be queued before ``step``'s results are read: not when
        ``step`` is evaluated, saved or the last, which need the adapters as they are after it."""
        c = self.config
        overlap = c.overlap_steps if c.overlap_steps is not None else device_type() == "gpu"
        return (overlap and step < self.total_steps and step % c.save_every != 0
                and not (self.val_data is not None and step % c.eval_every == 0))

    def _log(self, record: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json_line(record) + "\n")

    def train(self) -> dict[str, Any]:
        """Run until the step budget, the time budget or Ctrl-C; return a summary."""
        c = self.config
        max_seconds = parse_duration(c.max_time)
        main = self.world.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        start = time.perf_counter() - self.state.elapsed
        window_start, window_tokens = time.perf_counter(), 0
        last_saved = self.state.step if self.state.step else None
        stop_reason = "done"
        bar = _progress(self.state.step, self.total_steps, self.progress)
        try:
            if main:
                print(self.dtype_note)
                print(self.batch_note())
                note = self.checkpoint_note()
                if note:
                    print(note)
            if self.state.step == 0:
                if main:
                    print(format_trainable(self.model))
                result = self.evaluate()  # the base model's validation loss, for comparison
                if result:
                    self._log({"step": 0, **result})
                    if main:
                        bar.write(f"step 0: val_loss {result['val_loss']:.4f} ppl {result['val_ppl']:.2f}")
            queued, stopping = None, False
            while queued is not None or (not stopping and self.state.step < self.total_steps):
                if queued is None:
                    queued = self._queue_step()
                # The next step is queued before this one's loss is read, so the device never waits for the
                # host to build a step; a step that is being stopped after is not followed by another.
                ahead = None
                queue_start = time.perf_counter()
                if not stopping and self._may_overlap(self.state.step + 1):
                    ahead = self._queue_step()
                finish_start = time.perf_counter()
                metrics = self._finish_step(queued)
                done = step_done_at(queue_start, finish_start, time.perf_counter(), ahead is not None)
                queued = ahead
                bar.update(1)
                # this rank's tokens: with several ranks metrics["tokens"] counts all of them
                window_tokens += self.local_tokens if self.world.distributed else metrics["tokens"]
                self.state.elapsed = time.perf_counter() - start
                step = self.state.step
                if step % c.log_every == 0 or step == self.total_steps:
                    record = {"step": step, **metrics,
                              **self._throughput(window_tokens, done - window_start, mx.get_peak_memory() / 1e9),
                              "elapsed": self.state.elapsed}
                    window_start, window_tokens = done, 0
                    self._log(record)
                    tokens_per_sec = record["tokens_per_sec"]
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{tokens_per_sec:.0f}", mem=f"{record['peak_memory_gb']:.2f}GB")
                if step % c.eval_every == 0 or step == self.total_steps:
                    result = self.evaluate()
                    if result:
                        self._log({"step": step, **result})
                        if self.state.best_val_loss is None or result["val_loss"] < self.state.best_val_loss:
                            self.state.best_val_loss = result["val_loss"]
                        if main:
                            bar.write(f"step {step}: val_loss {result['val_loss']:.4f} "
                                      f"ppl {result['val_ppl']:.2f}")
                if step % c.save_every == 0:
                    self.save()
                    last_saved = step
                for callback in self.callbacks:  # all of them see the step, even after one asked to stop
                    if callback.on_step_end(self, step, metrics):
                        self.interrupted = True  # stopped as by Ctrl-C, so the ranks agree on it below
                time_up = max_seconds is not None and self.state.elapsed >= max_seconds
                if self.world.distributed:  # every rank stops after the same step, or the others would hang
                    self.interrupted, time_up = self.world.agree(self.interrupted, time_up)
                if not stopping and (self.interrupted or time_up):  # a step already queued still runs
                    stop_reason = "interrupted" if self.interrupted else "time budget reached"
                    stopping = True
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
        if last_saved != self.state.step:
            self.save()
        summary = {"stop_reason": stop_reason, "step": self.state.step, "total_steps": self.total_steps,
                   "tokens_seen": self.state.tokens_seen, "elapsed_s": self.state.elapsed,
                   "best_val_loss": self.state.best_val_loss, "run_dir": str(self.run_dir)}
        if self.world.distributed:
            summary["world_size"] = self.world.size
        if main:
            self._export_final()
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _throughput(self, tokens: int, seconds: float, peak_memory_gb: float) -> dict[str, Any]:
        """Tokens/s and peak memory of a logging window: this process's, or with several ranks the total
        tokens/s and the largest peak, plus every rank's (gathered, so every rank must call this)."""
        if not self.world.distributed:
            return {"tokens_per_sec": tokens / max(seconds, 1e-9), "peak_memory_gb": peak_memory_gb}
        table = self.world.gather([tokens, seconds, peak_memory_gb])  # (ranks, 3)
        per_rank = table[:, 0] / np.maximum(table[:, 1], 1e-9)
        return {"tokens_per_sec": float(table[:, 0].sum() / max(float(table[:, 1].max()), 1e-9)),
                "peak_memory_gb": float(table[:, 2].max()), "world_size": self.world.size,
                "tokens_per_sec_per_rank": [float(v) for v in per_rank],
                "peak_memory_gb_per_rank": [float(v) for v in table[:, 2]]}

    def _on_interrupt(self, signum, frame) -> None:
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.interrupted = True
        if self.world.is_main:
            print("\nCtrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    def _export_final(self) -> None:
        save_adapters(self.run_dir, lora_parameters(self.model), self.config.lora, self.config.model)
        plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def _progress(initial: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)
