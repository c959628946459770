"""The project's main parameters, as dataclasses with defaults.

Every config is built with ``from_dict`` (unknown keys are an error naming the key), validated at
construction (a ``ValueError`` naming the key), and written next to a run's outputs with ``to_dict``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

# The seven linear projections of a Mistral decoder layer, in checkpoint order.
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Config:
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, strict: bool = True):
        """Build from a dict; with ``strict`` an unknown key raises ``ValueError`` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if strict and unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoRAConfig(_Config):
    """Which layers get adapters and how large they are."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    layers: Optional[list[int]] = None  # None: every decoder layer
    use_rslora: bool = False  # scale = alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora targets must name at least one projection")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad:
            raise ValueError(f"unknown lora target(s) {bad}; choose from {', '.join(ALL_TARGETS)}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The factor of a LoRA update ``scale * B @ A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA
    (PEFT's rule)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


@dataclass
class DataConfig(_Config):
    """How instruction records become token ids (``prepare_data.py``)."""

    template: str = "dolly"
    max_seq_len: int = 1024
    min_response_tokens: int = 16  # truncation never leaves fewer response tokens than this
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.max_seq_len < 8:
            raise ValueError(f"max_seq_len must be >= 8, got {self.max_seq_len}")
        if self.min_response_tokens < 1:
            raise ValueError(f"min_response_tokens must be >= 1, got {self.min_response_tokens}")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")


@dataclass
class TrainConfig(_Config):
    """Everything ``finetune.py`` needs; flags override values read from ``--config``."""

    model: str = ""
    data: str = ""
    out: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # the decay ends at learning_rate * min_lr_ratio
    iters: Optional[int] = None
    epochs: Optional[float] = None
    max_time: Optional[str] = None  # e.g. "2h", "30m", "90s"
    max_grad_norm: Optional[float] = 1.0  # None or 0 disables clipping
    grad_checkpoint: bool = False
    # Queue each step before the previous one's loss is read (Trainer.train). None: on a GPU, where the device
    # then never waits for the host; on the CPU the host's thread and the computation share the cores.
    overlap_steps: Optional[bool] = None
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    packing: bool = False
    seed: int = 0
    eval_every: int = 50
    eval_batches: Optional[int] = 16  # None: the whole validation split
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 3
    loss_chunk: int = 1024  # positions per chunk when computing logits for the loss

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        positive = ("batch_size", "grad_accum", "eval_every", "log_every", "save_every", "keep_last", "loss_chunk")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"schedule must be constant, cosine or linear, got {self.schedule!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


# The settings of the other commands (scripts/ and `mlx-qlora`). Each is the one place its defaults are
# written: the command's flags default to None ("not given") and its --help shows these values, and the
# library functions the command calls take their keyword defaults from here. The functions check the values.


@dataclass
class ConvertConfig(_Config):
    """How ``convert_weights.py`` (``mlx_qlora.convert.convert_checkpoint``) writes a checkpoint."""

    bits: int = 4
    group_size: Optional[int] = None  # None: one scale and bias per output row
    dtype: str = "float16"  # of the unquantized tensors and of the scales / biases
    shard_size_gb: float = 3.0  # approximate size of each output shard, GiB


@dataclass
class SourceConfig(_Config):
    """Which records ``prepare_data.py`` reads (``mlx_qlora.data.load_records``, ``prepare_dataset``)."""

    split: str = "train"  # of a hub data set or a saved DatasetDict


@dataclass
class EvalConfig(_Config):
    """What ``evaluate.py`` (``mlx_qlora.generate.evaluate.evaluate``) evaluates and how."""

    split: str = "validation"
    max_examples: Optional[int] = None  # None: the whole split
    max_tokens: int = 128  # most tokens generated per answer
    batch_size: int = 8  # prompts generated together


@dataclass
class MergeConfig(_Config):
    """What ``merge_adapters.py`` (``mlx_qlora.generate.merge.merge_adapters``) writes."""

    dtype: Optional[str] = None  # None: the base's dtype
    max_shard_size: str = "5GB"
    group_size: Optional[int] = None  # of the --quantize copy; None: one scale per row
    gguf_type: str = "f16"  # f16 | q8_0 | f32


@dataclass
class DemoConfig(_Config):
    """``demo.py``: where it writes and how long the fine-tuning step runs."""

    out: str = "runs/demo"  # relative to the repository
    iters: int = 150
