"""The project's main parameters, as dataclasses with defaults.

Every config is built with ``from_dict`` (unknown keys are an error naming the key), validated at
construction (a ``ValueError`` naming the key), and written next to a run's outputs with ``to_dict``.
Numbers are checked by ``number``: of the right kind, finite and in range, so a command-line flag and
the same key in a YAML/JSON file get the same one-line message.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Optional

# The seven linear projections of a Mistral decoder layer, in checkpoint order.
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3's fused projections (q, k and v in one layer; gate and up in one), which LoRA adapts as one layer each,
# as PEFT does; on such a model the names above map onto them (``lora.apply.model_targets``).
FUSED_TARGETS = ("qkv_proj", "gate_up_proj")
KNOWN_TARGETS = ALL_TARGETS + FUSED_TARGETS


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


def _rule(at_least=None, above=None, below=None, at_most=None) -> str:
    """The range ``number`` checks, in words: ``">= 1"``, ``"> 0"``, ``"in [0, 1)"`` (empty: any)."""
    low = f"[{at_least}" if at_least is not None else f"({above}" if above is not None else ""
    high = f"{at_most}]" if at_most is not None else f"{below})" if below is not None else ""
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {at_least}" if at_least is not None else f"> {above}"
    if high:
        return f"<= {at_most}" if at_most is not None else f"< {below}"
    return ""


def number(key: str, value: Any, *, integer: bool = False, optional: bool = False, at_least=None, above=None,
           below=None, at_most=None):
    """``value`` checked as the setting ``key``: a finite number (a whole one with ``integer``) within the
    given bounds (``at_least`` <= value, ``above`` < value, value < ``below``, value <= ``at_most``); None
    passes with ``optional``. Returns the value; a numeric string becomes a float (YAML 1.1 reads ``2e-4``
    as a string) and, with ``integer``, a whole float an int. Raises ``ValueError`` naming ``key``."""
    if value is None and optional:
        return None
    rule = _rule(at_least, above, below, at_most)
    wanted = ("a whole number" if integer else "a number") + (f" {rule}" if rule else "")
    if isinstance(value, str) and not integer:
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's numbers too
        raise ValueError(f"{key} must be {wanted}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number{f' {rule}' if rule else ''}, got {value}")
    if integer:
        if not float(value).is_integer():
            raise ValueError(f"{key} must be {wanted}, got {value!r}")
        value = int(value)
    if ((at_least is not None and value < at_least) or (above is not None and value <= above)
            or (below is not None and value >= below) or (at_most is not None and value > at_most)):
        raise ValueError(f"{key} must be {rule}, got {value}")
    return value


def choice(key: str, value: Any, choices: tuple, optional: bool = False):
    """``value`` if it is one of ``choices`` (or None with ``optional``), else ``ValueError`` naming ``key``."""
    if (value is None and optional) or any(type(value) is type(c) and value == c for c in choices):
        return value
    names = [str(c) for c in choices]
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    raise ValueError(f"{key} must be {listed}, got {value!r}")


SEED_LIMIT = 2**63  # seeds are MLX's and numpy's unsigned 64-bit ones; the trainer mixes them below 2**63
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def duration_seconds(text: Optional[str], key: str = "max_time") -> Optional[float]:
    """``"2h"``, ``"30m"``, ``"90s"``, ``"1.5h"`` or a number of seconds -> seconds > 0 (None stays None);
    ``ValueError`` naming ``key`` otherwise."""
    if text is None:
        return None
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{key}: cannot read {text!r} as a duration (use e.g. 90s, 30m, 2h)")
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{key}: the duration {text!r} must be longer than 0 seconds")
    return seconds


def byte_size(text: Any, key: str = "max_shard_size") -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes >= 1; ``ValueError`` naming ``key``
    otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"{key}: cannot read {text!r} as a size (use e.g. 5GB, 500MB, 2GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    if size < 1:
        raise ValueError(f"{key} must be at least 1 byte, got {text!r}")
    return size


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
        self.rank = number("lora rank", self.rank, integer=True, at_least=1)
        self.alpha = number("lora alpha", self.alpha, above=0)
        self.dropout = number("lora dropout", self.dropout, at_least=0, below=1)
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, int) and not isinstance(layers, bool):  # PEFT's layers_to_transform may be one
                layers = [layers]
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ValueError(f"lora layers must be a list of layer numbers (or null: every layer), got {layers!r}")
            self.layers = [number("lora layers", i, integer=True) for i in layers]  # -1: the last
        if not self.targets:
            raise ValueError("lora targets must name at least one projection")
        bad = [t for t in self.targets if t not in KNOWN_TARGETS]
        if bad:
            raise ValueError(f"unknown lora target(s) {bad}; choose from {', '.join(KNOWN_TARGETS)}")

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

    # "auto": the model's chat template ("chat") for conversations, "dolly" for instructions; completions
    # and text use none ("none")
    template: str = "auto"
    format: str = "auto"  # data.formats.FORMATS; "auto": detected from the columns
    learn: str = "assistant"  # conversations: "assistant" turns, the "last" one, or "all" tokens
    max_seq_len: int = 1024
    min_response_tokens: int = 16  # truncation never leaves fewer response tokens than this
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.max_seq_len = number("max_seq_len", self.max_seq_len, integer=True, at_least=8)
        self.min_response_tokens = number("min_response_tokens", self.min_response_tokens, integer=True, at_least=1)
        for key in ("val_fraction", "test_fraction"):
            setattr(self, key, number(key, getattr(self, key), at_least=0, below=1))
        self.seed = number("seed", self.seed, integer=True, at_least=0, below=SEED_LIMIT)
        formats = ("auto", "instruction", "messages", "sharegpt", "completion", "text")
        if self.format not in formats:
            raise ValueError(f"format must be one of {', '.join(formats)}, got {self.format!r}")
        if self.learn not in ("assistant", "last", "all"):
            raise ValueError(f"learn must be assistant, last or all, got {self.learn!r}")
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
    # Batch by a token budget instead: as many rows as fit in rows x padded length <= max_batch_tokens
    # (batch_size is then not used). None: batch_size rows.
    max_batch_tokens: Optional[int] = None
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
    dtype: str = "auto"  # compute dtype: auto (float32 on the CPU, the checkpoint's on a GPU) | float32 | bfloat16 | float16
    packing: bool = False
    seed: int = 0
    eval_every: int = 50
    eval_batches: Optional[int] = 16  # None: the whole validation split
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 3
    loss_chunk: int = 1024  # positions per chunk when computing logits for the loss
    # how new adapters start: "default" (PEFT's: Kaiming A, zero B) or "loftq" (the model folder's loftq/
    # factors, written by convert_weights.py --loftq-rank)
    lora_init: str = "default"

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        self.lora_init = choice("lora_init", self.lora_init, ("default", "loftq"))
        positive = ("batch_size", "grad_accum", "eval_every", "log_every", "save_every", "keep_last", "loss_chunk")
        for key in positive:
            setattr(self, key, number(key, getattr(self, key), integer=True, at_least=1))
        self.max_batch_tokens = number("max_batch_tokens", self.max_batch_tokens, integer=True, optional=True,
                                       at_least=1)
        self.learning_rate = number("learning_rate", self.learning_rate, above=0)
        self.weight_decay = number("weight_decay", self.weight_decay, at_least=0)
        for key in ("beta1", "beta2"):
            setattr(self, key, number(key, getattr(self, key), at_least=0, below=1))
        self.eps = number("eps", self.eps, at_least=0)
        self.schedule = choice("schedule", self.schedule, ("constant", "cosine", "linear"))
        self.dtype = choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        self.warmup_steps = number("warmup_steps", self.warmup_steps, integer=True, at_least=0)
        self.warmup_ratio = number("warmup_ratio", self.warmup_ratio, at_least=0, below=1)
        self.min_lr_ratio = number("min_lr_ratio", self.min_lr_ratio, at_least=0, at_most=1)
        self.iters = number("iters", self.iters, integer=True, optional=True, at_least=1)
        self.epochs = number("epochs", self.epochs, optional=True, above=0)
        duration_seconds(self.max_time)
        self.max_grad_norm = number("max_grad_norm", self.max_grad_norm, optional=True, at_least=0)
        self.seed = number("seed", self.seed, integer=True, at_least=0, below=SEED_LIMIT)
        self.eval_batches = number("eval_batches", self.eval_batches, integer=True, optional=True, at_least=1)
        for key in ("grad_checkpoint", "packing"):
            choice(key, getattr(self, key), (True, False))
        choice("overlap_steps", self.overlap_steps, (True, False), optional=True)


# The settings of the other commands (scripts/ and `mlx-qlora`). Each is the one place its defaults are
# written: the command's flags default to None ("not given") and its --help shows these values, and the
# library functions the command calls take their keyword defaults from here. The functions check the values.


@dataclass
class ConvertConfig(_Config):
    """How ``convert_weights.py`` (``mlx_qlora.convert.convert_checkpoint``) writes a checkpoint."""

    bits: int = 4
    group_size: Optional[int] = None  # None: one scale and bias per output row
    # of the unquantized tensors and of the scales / biases; auto: the checkpoint's half precision (bfloat16 or
    # float16; float16 for a float32 checkpoint)
    dtype: str = "auto"
    shard_size_gb: float = 3.0  # approximate size of each output shard, GiB
    rounding: str = "nearest"  # how each row's / group's range is chosen: "nearest" (min/max) or "search"
    calibration_examples: int = 128  # sequences of --calibration-data that GPTQ sees
    calibration_max_tokens: int = 512  # each cut to this many tokens

    def __post_init__(self):
        self.bits = choice("bits", self.bits, (2, 4, 8))
        self.rounding = choice("rounding", self.rounding, ("nearest", "search"))
        self.calibration_examples = number("calibration_examples", self.calibration_examples, integer=True,
                                           at_least=1)
        self.calibration_max_tokens = number("calibration_max_tokens", self.calibration_max_tokens, integer=True,
                                             at_least=1)
        self.group_size = choice("group_size", self.group_size, (32, 64, 128), optional=True)
        self.dtype = choice("dtype", self.dtype, ("auto", "float16", "bfloat16", "float32"))
        self.shard_size_gb = number("shard_size_gb", self.shard_size_gb, above=0)


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

    def __post_init__(self):
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split must name a split of the prepared data, got {self.split!r}")
        self.max_examples = number("max_examples", self.max_examples, integer=True, optional=True, at_least=1)
        self.max_tokens = number("max_tokens", self.max_tokens, integer=True, at_least=1)
        self.batch_size = number("batch_size", self.batch_size, integer=True, at_least=1)


@dataclass
class MergeConfig(_Config):
    """What ``merge_adapters.py`` (``mlx_qlora.generate.merge.merge_adapters``) writes."""

    dtype: Optional[str] = None  # None: the base's dtype
    max_shard_size: str = "5GB"
    group_size: Optional[int] = None  # of the --quantize copy; None: one scale per row
    gguf_type: str = "f16"  # f16 | q8_0 | f32

    def __post_init__(self):
        self.dtype = choice("dtype", self.dtype, ("float32", "bfloat16", "float16"), optional=True)
        byte_size(self.max_shard_size)
        self.group_size = choice("group_size", self.group_size, (32, 64, 128), optional=True)
        self.gguf_type = choice("gguf_type", self.gguf_type, ("f16", "q8_0", "f32"))


@dataclass
class DemoConfig(_Config):
    """``demo.py``: where it writes and how long the fine-tuning step runs."""

    out: str = "runs/demo"  # relative to the repository
    iters: int = 150

    def __post_init__(self):
        self.iters = number("iters", self.iters, integer=True, at_least=1)
