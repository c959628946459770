"""The settings of the fast paths, as data: one frozen dataclass read once from the environment.

Every ``MLX_QLORA_*`` variable that changes a kernel or the path a model takes is a field of
``KernelSettings``, with its default, the variable it is read from, its kind and a one-line doc as field
metadata. Two kinds:

- ``switch``: user-facing; turns a fast path off or trades memory for speed;
- ``knob``: a measurement knob; tunes a kernel's shape or threshold, for the probes in ``benchmarks/``.

``current()`` reads the environment the first time it is called (a bad value raises ``UserError`` naming
the variable) and keeps the result; code reads ``settings.current().field`` when it runs or traces, so
``override(field=value)`` (a context manager for tests and benchmarks) takes effect on the next call.
A graph that ``mx.compile`` traced keeps the settings it was traced with.

``environment_table()`` renders the table of ``docs/ARCHITECTURE.md`` (``python -m mlx_qlora.settings``
prints it), with the variables read elsewhere (``OTHER_VARIABLES``) marked as such.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Mapping, Optional

from .errors import UserError

SWITCH = "switch"  # user-facing: a fast path on or off, or memory against speed
KNOB = "knob"  # measurement knob: a kernel's shape or threshold


def _setting(default: Any, env: str, kind: str, doc: str, values: Optional[Mapping[str, Any]] = None,
             check: Optional[Callable[[Any], bool]] = None, expect: str = "") -> Any:
    """A field with its metadata. ``values``: the variable's accepted strings and what each means (else
    the field's type parses it); ``check``/``expect``: a condition on the value and how to say it."""
    meta = dict(env=env, kind=kind, doc=doc, values=values, check=check, expect=expect)
    return field(default=default, metadata=meta)


_ON_OFF = {"1": True, "0": False}


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


@dataclass(frozen=True)
class KernelSettings:
    """Which fast paths run and how their kernels are shaped (see the module docstring)."""

    # Few-row 4-bit matmuls (kernels/cuda/qmv.py, chosen by quant/matmul.py). The defaults were the fastest
    # measured on an H100 (qmv_probe.py, decode_layer_probe.py, decode_sweep.py): alone, small layers keep
    # MLX's quantized_matmul (a custom-kernel call costs more host time); the tensor-core body only for
    # gate/up-sized launches, whose blocks of 4 warps all fit on the GPU at once; the CUDA-core loop
    # unrolled 4 times (more loads in flight); staged inputs only for the RMSNorm launches (q/k/v faster,
    # o and down slower staged).
    qmv: bool = _setting(True, "MLX_QLORA_QMV", SWITCH,
                         "`mlx`: few-row per-row 4-bit matmuls on CUDA use MLX's `quantized_matmul` instead of "
                         "our kernels", values={"ours": True, "mlx": False})
    qmv_min_weights: int = _setting(1 << 25, "MLX_QLORA_QMV_MIN", KNOB,
                                    "weights a layer needs before it takes our few-row kernel alone (not fused)",
                                    check=_non_negative, expect="an integer >= 0")
    qmv_min_warps: int = _setting(2048, "MLX_QLORA_QMV_MIN_WARPS", KNOB,
                                  "warps a launch keeps when grouping 2 or 4 output rows per warp",
                                  check=_positive, expect="an integer > 0")
    qmv_mma: bool = _setting(True, "MLX_QLORA_QMV_MMA", SWITCH,
                             "`0`: the few-row 4-bit kernels never use their tensor-core body", values=_ON_OFF)
    qmv_mma_min_rows: int = _setting(8192, "MLX_QLORA_QMV_MMA_MIN_ROWS", KNOB,
                                     "output rows a launch needs before it takes the tensor-core body",
                                     check=_non_negative, expect="an integer >= 0")
    qmv_mma_chunks: int = _setting(2, "MLX_QLORA_QMV_MMA_CHUNKS", KNOB,
                                   "adjacent 16-byte chunks a lane of the tensor-core body loads per iteration",
                                   check=_positive, expect="an integer > 0")
    qmv_mma_warps: int = _setting(4, "MLX_QLORA_QMV_MMA_WARPS", KNOB,
                                  "warps per block of the tensor-core body (K split over them)",
                                  check=lambda v: v in (1, 2, 4, 8, 16), expect="1, 2, 4, 8 or 16")
    qmv_unroll: int = _setting(4, "MLX_QLORA_QMV_UNROLL", KNOB,
                               "unrolling of the CUDA-core body's weight loop (loads in flight per lane)",
                               check=_positive, expect="an integer > 0")
    qmv_stage: str = _setting("norm", "MLX_QLORA_QMV_STAGE", KNOB,
                              "which CUDA-core launches stage their input rows in shared memory once per block: "
                              "`norm` (the RMSNorm kernels: q/k/v) or `none`",
                              values={"norm": "norm", "none": "none"})
    qmv_stage_bytes: int = _setting(32 * 1024, "MLX_QLORA_QMV_STAGE_BYTES", KNOB,
                                    "the most shared memory a staged input may take (larger inputs are read per "
                                    "warp)", check=_non_negative, expect="an integer >= 0")
    fused: bool = _setting(True, "MLX_QLORA_FUSED", SWITCH,
                           "`0`: q/k/v and gate/up are launched one by one (`quant/matmul.py`)", values=_ON_OFF)
    # Compiled decoding's decoder layer (model/fused_decode.py) and its L2 prefetching: 32 appended blocks
    # and 4 MB of gate/up were faster than 64 blocks and 8 or 16 MB (decode_sweep.py, kernel_profile.py).
    fused_decode: bool = _setting(True, "MLX_QLORA_FUSED_DECODE", SWITCH,
                                  "each decoder layer of compiled CUDA decoding in six launches "
                                  "(`model/fused_decode.py`); `0`: layer by layer in MLX operations",
                                  values=_ON_OFF)
    lora_scratch: bool = _setting(True, "MLX_QLORA_LORA_SCRATCH", SWITCH,
                                  "adapters in the fused layer: each launch writes the next one's A-products "
                                  "into the layer's scratch (`model/fused_decode.py`); `0`: each launch's "
                                  "A-products by a small launch of their own beside it", values=_ON_OFF)
    prefetch: bool = _setting(True, "MLX_QLORA_PREFETCH", SWITCH,
                              "blocks appended to some decoding launches prefetch the next kernels' weights into "
                              "L2, one prefetch per 128-byte line (`kernels/cuda/l2_prefetch.py`); `0`: none",
                              values={"l2": True, "0": False})
    prefetch_blocks: int = _setting(32, "MLX_QLORA_PREFETCH_BLOCKS", KNOB,
                                    "blocks appended to a launch that prefetches (0: no prefetching)",
                                    check=_non_negative, expect="an integer >= 0")
    prefetch_o: bool = _setting(True, "MLX_QLORA_PREFETCH_O", SWITCH,
                                "`0`: attention's first pass does not prefetch o_proj's arrays", values=_ON_OFF)
    prefetch_gate_up_mb: float = _setting(4.0, "MLX_QLORA_PREFETCH_GATE_UP_MB", KNOB,
                                          "MB of gate's and of up's packed weights (each) that o_proj's launch "
                                          "prefetches", check=_non_negative, expect="a number >= 0")
    # One-token attention over the static cache (kernels/cuda/attention.py), inside the fused layer: ranges
    # of 64 slots, blocks of 8 warps reading runs of 8 slots were faster than 32 slots, 4 warps and runs
    # of 4 (decode_layer_probe.py, decode_sweep.py).
    attention_slots: int = _setting(64, "MLX_QLORA_ATTENTION_SLOTS", KNOB,
                                    "cache slots per range of the one-token attention's first pass",
                                    check=_positive, expect="an integer > 0")
    attention_threads: int = _setting(256, "MLX_QLORA_ATTENTION_THREADS", KNOB,
                                      "threads per block of the attention's first pass (halved while its shared "
                                      "arrays exceed 48 KB)", check=lambda v: v in (32, 64, 128, 256, 512, 1024),
                                      expect="32, 64, 128, 256, 512 or 1024")
    attention_unroll: int = _setting(8, "MLX_QLORA_ATTENTION_UNROLL", KNOB,
                                     "consecutive slots a warp of the first pass reads per run",
                                     check=_positive, expect="an integer > 0")
    # Dequantization (kernels/cuda/dequant.py, chosen by quant/dequant.py; dequant_probe.py) and the group
    # size MLX's quantized_matmul reads per-row layers in (64 was faster than 128: gpu_generate.py).
    dequant: bool = _setting(True, "MLX_QLORA_DEQUANT", SWITCH,
                             "`mlx`: MLX's `mx.dequantize` on CUDA instead of our per-row kernel",
                             values={"ours": True, "mlx": False})
    dequant_words: int = _setting(4, "MLX_QLORA_DEQUANT_WORDS", KNOB,
                                  "32-bit words (8 weights each) one thread of the dequantization kernel converts",
                                  check=_positive, expect="an integer > 0")
    expand_group: int = _setting(0, "MLX_QLORA_EXPAND_GROUP", KNOB,
                                 "the MLX group size per-row layers are expanded to for `quantized_matmul` "
                                 "(0: the first of 64, 128, 32 that divides the layer's inputs)",
                                 check=lambda v: v in (0, 32, 64, 128), expect="0, 32, 64 or 128")
    # Attention in training (kernels/cuda/sdpa.py, chosen by model/attention.py; sdpa_probe.py, step_probe.py).
    sdpa_pad: bool = _setting(True, "MLX_QLORA_SDPA_PAD", SWITCH,
                              "`0`: training attention on CUDA runs at its own length instead of padded to "
                              "cuDNN's tile of 128 query rows", values=_ON_OFF)
    # Sliding-window attention without a cache on CUDA (model/banded.py, chosen by model/attention.py): chunks
    # of this many queries, each against the keys its window reaches, through cuDNN's fused attention.
    attention_chunk: int = _setting(1024, "MLX_QLORA_ATTENTION_CHUNK", SWITCH,
                                    "on CUDA, sliding-window attention without a cache over more tokens than its "
                                    "window runs in chunks of this many queries, each against the keys its "
                                    "window reaches, through the fused kernel (`model/banded.py`): memory linear "
                                    "in the length; a multiple of 128; 0: never",
                                    check=lambda v: v >= 0 and v % 128 == 0, expect="0 or a multiple of 128")
    # Measured on an H100 (Mistral-7B shapes) at 16,384 tokens (7,770 tokens/s in 15.2 GB against block-wise's
    # 2,451 in 15.0 GB), 32,768 (7,548 against 2,258) and 65,536 (5,763 against 2,176, checkpoint segments on).
    attention_chunk_up_to: int = _setting(0, "MLX_QLORA_ATTENTION_CHUNK_UP_TO", SWITCH,
                                          "the longest sequence that `MLX_QLORA_ATTENTION_CHUNK` applies to (longer "
                                          "ones run block-wise, see `MLX_QLORA_BLOCKWISE_FROM`); 0: no bound",
                                          check=_non_negative, expect="an integer >= 0")
    # Causal attention without a window, segments or padding on CUDA (model/causal_chunks.py): one cuDNN call
    # over 32,768 tokens took 2.02 GB above its inputs (forward and backward, Llama 3 8B's heads, an H100) and
    # one over 65,536 ran out of 80 GB, so longer sequences run as calls of at most as many query-key pairs.
    causal_call_pairs: int = _setting(1 << 30, "MLX_QLORA_CAUSAL_CALL_PAIRS", SWITCH,
                                      "on CUDA, causal attention without a cache whose one call would cover more "
                                      "query-key pairs than this runs as calls of fewer queries, each against the "
                                      "keys before them, through the fused kernel (`model/causal_chunks.py`); "
                                      "0: one call at any length", check=_non_negative,
                                      expect="an integer >= 0")
    # Attention without a cache on long sequences (model/blockwise.py, chosen by model/attention.py): memory
    # linear in the length instead of the plain path's (B, H, L, L) scores and (L, L) mask; below the
    # threshold the plain path (cuDNN's fused kernel on CUDA) runs as before.
    blockwise_from: int = _setting(8192, "MLX_QLORA_BLOCKWISE_FROM", SWITCH,
                                   "attention without a cache (training, evaluation) over this many tokens or more "
                                   "runs block-wise with memory linear in the length (`model/blockwise.py`); "
                                   "0: never", check=_non_negative, expect="an integer >= 0")
    # Block-wise attention trades speed for memory (an H100 at 8,192 tokens: 2,727 tokens/s in 10.9 GB against
    # the plain path's 7,069 in 15.1 GB), so from the threshold on it runs only where the plain path's scores
    # would take more than this share of MLX's memory limit.
    blockwise_share: float = _setting(0.4, "MLX_QLORA_BLOCKWISE_SHARE", SWITCH,
                                      "from `MLX_QLORA_BLOCKWISE_FROM` tokens on, attention still runs plain (faster) "
                                      "while its scores, two (B, H, L, L) arrays in the compute dtype, fit in this "
                                      "share of MLX's memory limit (`mx.get_memory_limit()`); 0: block-wise from the "
                                      "threshold whatever the memory", check=_non_negative,
                                      expect="a number >= 0")
    blockwise_block: int = _setting(512, "MLX_QLORA_BLOCKWISE_BLOCK", KNOB,
                                    "query (and key) rows per chunk of block-wise attention; halved for full "
                                    "attention while a chunk's float32 scores exceed 512 MB (down to 64)",
                                    check=_positive, expect="an integer > 0")
    # Gradient checkpointing in segments of layers (model/mistral.py): the layer inputs kept are one per segment,
    # the inputs inside a segment recomputed when the backward pass reaches it, at one more forward pass of the
    # segment's layers but its last.
    checkpoint_span: int = _setting(0, "MLX_QLORA_CHECKPOINT_SPAN", SWITCH,
                                    "with gradient checkpointing, the decoder layers whose inputs are kept are one "
                                    "in this many (each segment of layers recomputed as a whole, its layers "
                                    "checkpointed inside it): for N layers about N / span + span layer inputs "
                                    "held instead of N, at up to one more forward pass; 1: every layer's input; "
                                    "0: 1 while every layer's input takes at most a tenth of MLX's memory limit, "
                                    "else the whole number nearest the square root of N",
                                    check=_non_negative, expect="an integer >= 0")
    # 4,096 rather than 8,192 tokens: at 16,384 tokens on an H100, 13.3 GB against 15.1 GB at 5% of the speed
    # (7,585 tokens/s against 7,988); at 32,768 with checkpoint segments, 16.0 GB against 16.9.
    layer_tile: int = _setting(4096, "MLX_QLORA_LAYER_TILE", SWITCH,
                               "without a cache, a sequence longer than this many tokens runs each decoder layer's "
                               "per-token parts (norms, projections, MLP) in tiles of this many tokens, each "
                               "recomputed in the backward pass (`model/tiled.py`): activations per tile, at "
                               "about one more forward pass of compute; 0: never", check=_non_negative,
                               expect="an integer >= 0")
    # Generation (generate/generator.py): a layer at a time held less memory and was faster than the whole
    # prompt pass queued at once (gpu_generate.py's ours-prefill variants).
    prefill_eval_layers: int = _setting(1, "MLX_QLORA_PREFILL_EVAL_LAYERS", SWITCH,
                                        "generation's prompt pass queued in groups of this many layers, each group "
                                        "waited for while the next is queued (bounds the dequantized weights a GPU "
                                        "holds; 0: the whole pass at once)", check=_non_negative,
                                        expect="an integer >= 0")

    # Compiled CUDA kernels kept across processes (kernels/cuda/kernel_cache.py): MLX 0.32.4 keeps
    # mx.fast.cuda_kernel's compilations in the process only (a fresh generate.py: 10 s before decoding).
    kernel_cache: str = _setting("~/.cache/mlx-qlora/kernels", "MLX_QLORA_KERNEL_CACHE", SWITCH,
                                 "the folder where our CUDA kernels, compiled once, are kept for every later "
                                 "process (`kernels/cuda/kernel_cache.py`); `off`: each process compiles them "
                                 "again")

    # What a precompiled kernel is launched as (kernels/cuda/fatbin.py): MLX 0.32.4 hashes the whole image
    # at every launch, so a compressed one should cost the host less per launch (not yet timed on a GPU).
    kernel_image: str = _setting("cubin", "MLX_QLORA_KERNEL_IMAGE", KNOB,
                                 "what our compiled CUDA kernels are launched as (`kernels/cuda/fatbin.py`): "
                                 "`cubin`, the cubin itself; `size`, a fatbin compressed as small as nvFatbin "
                                 "can; `default`, nvFatbin's faster compression (either falls back on the "
                                 "cubin where nvFatbin is missing)",
                                 values={"size": "size", "default": "default", "cubin": "cubin"})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            ok = _type_ok(f, value) and (f.metadata["values"] is None or value in f.metadata["values"].values())
            if ok and f.metadata["check"] is not None:
                ok = f.metadata["check"](value)
            if not ok:
                raise ValueError(f"setting {f.name} ({f.metadata['env']}): {value!r} is not {_expected(f)}")


def _type_ok(f: dataclasses.Field, value) -> bool:
    kind = type(f.default)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _expected(f: dataclasses.Field) -> str:
    values = f.metadata["values"]
    if values is not None:
        return " or ".join(values)
    return f.metadata["expect"] or f"a {type(f.default).__name__}"


def _parse(f: dataclasses.Field, raw: str):
    """The value of field ``f`` from its variable's string; ``UserError`` naming the variable otherwise."""
    values = f.metadata["values"]
    try:
        if values is not None:
            value = values[raw]
        else:
            value = type(f.default)(raw)
        if f.metadata["check"] is not None and not f.metadata["check"](value):
            raise ValueError
    except (KeyError, ValueError):
        raise UserError(f"{f.metadata['env']}={raw!r}: expected {_expected(f)}") from None
    return value


def from_environment(environ: Mapping[str, str] = os.environ) -> KernelSettings:
    """The settings from ``environ``: each variable that is set and not empty replaces its default."""
    changes = {}
    for f in fields(KernelSettings):
        raw = environ.get(f.metadata["env"], "")
        if raw != "":
            changes[f.name] = _parse(f, raw)
    return KernelSettings(**changes)


_from_env: Optional[KernelSettings] = None
_overrides: list[KernelSettings] = []


def current() -> KernelSettings:
    """The settings in effect: the innermost ``override``, else those read from the environment (once)."""
    global _from_env
    if _overrides:
        return _overrides[-1]
    if _from_env is None:
        _from_env = from_environment()
    return _from_env


@contextlib.contextmanager
def override(**changes) -> Iterator[KernelSettings]:
    """``with settings.override(qmv_mma=False): ...``: the current settings with ``changes`` until the block
    ends (nested overrides stack). Unknown names and invalid values raise ``ValueError``."""
    names = {f.name for f in fields(KernelSettings)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(names)}")
    _overrides.append(dataclasses.replace(current(), **changes))
    try:
        yield _overrides[-1]
    finally:
        _overrides.pop()


@dataclass(frozen=True)
class OtherVariable:
    """A variable that changes a fast path but is not read through ``KernelSettings``: who reads it."""

    env: str
    reader: str
    default: str
    kind: str
    doc: str


# Read elsewhere, and documented in the same table: MLX's own variable, which training sets before MLX
# creates its GPU stream, and the BLAS choice, which must be read before MLX loads.
OTHER_VARIABLES = (
    OtherVariable("MLX_MAX_MB_PER_BUFFER", "MLX (set by `train/run_ahead.py`)",
                  "set to 20 by training with `--grad-checkpoint` on CUDA", SWITCH,
                  "MLX's own bound on queued work (MB of outputs per batch); a value already set wins"),
    OtherVariable("MLX_QLORA_BLAS", "`blas.py`, before MLX loads", "unset", SWITCH,
                  "`reference`: keep MLX's bundled reference BLAS on Linux instead of loading OpenBLAS"),
    OtherVariable("MLX_QLORA_OPENBLAS", "`blas.py`, before MLX loads", "unset", SWITCH,
                  "path of the BLAS library to load before MLX on Linux"),
)


def _default_text(f: dataclasses.Field) -> str:
    values = f.metadata["values"]
    if values is not None:  # the string that means the default
        return "`" + next(k for k, v in values.items() if v == f.default) + "`"
    default = f.default
    return str(int(default)) if isinstance(default, float) and default.is_integer() else str(default)


def environment_table() -> str:
    """The Markdown table of every variable: ``KernelSettings``'s fields, then ``OTHER_VARIABLES``."""
    rows = ["| variable | setting | default | kind | effect |", "|---|---|---|---|---|"]
    for f in fields(KernelSettings):
        m = f.metadata
        rows.append(f"| `{m['env']}` | `{f.name}` | {_default_text(f)} | {m['kind']} | {m['doc']} |")
    for v in OTHER_VARIABLES:
        rows.append(f"| `{v.env}` | none: read by {v.reader} | {v.default} | {v.kind} | {v.doc} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(environment_table(), end="")
