"""Convert a Hugging Face checkpoint of a supported family (``model/families/``: Mistral, Llama, Qwen2,
Qwen3, Phi-3) into an MLX checkpoint with 4-bit projections (their linear biases, if any, kept as they are).
A multimodal checkpoint (Gemma 3's ``Gemma3ForConditionalGeneration``, ``families/multimodal.py``) becomes
a text-only one: its language model, renamed to the text family's names; the vision weights are dropped.

The conversion streams: the output's tensors and shards are planned from the input's safetensors
headers alone, each output shard file is opened with its header already written, and every tensor is
read (``mx.load`` reads a safetensors tensor only when it is evaluated), converted and appended to the
open file before the next one is read. Peak memory is about one tensor in float32 plus its output,
whatever the checkpoint's size. Everything is written into a temporary folder beside the output, checked
by loading it with ``mlx_qlora.model.load_model``, and renamed into place only then.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import mlx.core as mx
from tqdm import tqdm

from .config import ConvertConfig, LoRAConfig
from .errors import UserError
from .io import atomic_write_json, read_json, read_safetensors_header, temporary_dir, write_safetensors_shards
from .outputs import MODEL, MODEL_META_NAME, Output, as_output
from .model.loading import check_finite
from .quant.quantize import SUPPORTED_BITS, n_groups_for, quantize
from .quant.rounding import ROUNDINGS
from .lora.adapters import save_adapters
from .lora.loftq import LOFTQ_DIR, LOFTQ_ITERS, loftq_quantize

# What a conversion needs from a hub repository: never pickled *.bin weights.
ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# The seven projections of each decoder layer: the weights that get quantized.
QUANTIZED_KEY = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)\.weight$")
DROPPED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; not parameters
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
SAFETENSORS_DTYPES = {  # safetensors header code -> MLX dtype
    "F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32,
    "I64": mx.int64, "U8": mx.uint8, "I8": mx.int8, "BOOL": mx.bool_,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT_SHARD_BYTES = int(ConvertConfig.shard_size_gb * 2**30)
CHUNK_ELEMENTS = 2**22  # rows converted at a time: 16 MB of float32 per temporary


@dataclass
class _Tensor:
    """One output tensor: where it comes from and what it becomes."""

    name: str
    source: str  # input tensor name
    file: Path  # input file
    kind: str  # "weight" | "scales" | "biases" (quantized) or "copy"
    dtype: mx.Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


def _nbytes(dtype: mx.Dtype, shape) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``."""
    return dtype.size * math.prod(shape)


@dataclass
class ConvertResult:
    """What ``convert_checkpoint`` wrote."""

    path: Path
    source: Path
    n_tensors: int
    n_quantized: int
    n_shards: int
    input_bytes: int
    output_bytes: int
    seconds: float
    quantization: Optional[dict[str, Any]] = None
    shards: list[str] = field(default_factory=list)
    # a multimodal source: what was not converted, {part: {"tensors": n, "bytes": b}} (vision tower, projector)
    dropped: Optional[dict[str, dict[str, int]]] = None

    def dropped_line(self) -> Optional[str]:
        """One line saying which parts of a multimodal source were dropped, or None."""
        if not self.dropped:
            return None
        parts = ", ".join(f"{part} ({d['tensors']} tensors, {d['bytes'] / 2**20:.1f} MiB)"
                          for part, d in self.dropped.items())
        return f"multimodal checkpoint: converted its language model as a text model; dropped {parts}"


def resolve_checkpoint(hf_path_or_repo: Union[str, Path]) -> Path:
    """A local checkpoint folder, or a hub repo id downloaded (only the files in ``ALLOW_PATTERNS``)."""
    path = Path(hf_path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: not a directory (expected a checkpoint folder or a hub repo id)")
        return path
    text = str(hf_path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise UserError(f"{text}: no such directory")

    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except hub_errors.HFValidationError:
        raise UserError(f"{text}: neither an existing directory nor a valid hub repo id (owner/name)") from None
    try:
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=ALLOW_PATTERNS))
    except hub_errors.GatedRepoError:
        raise UserError(
            f"{text}: the repository is gated; accept its terms on the Hub and log in (`hf auth login`)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(
            f"{text}: repository not found on the Hugging Face Hub (check the name; private repos need a login)"
        ) from None
    except hub_errors.RevisionNotFoundError as e:
        raise UserError(f"{text}: revision not found ({e})") from None
    except hub_errors.LocalEntryNotFoundError:
        raise UserError(
            f"{text}: cannot reach the Hugging Face Hub (offline or HF_HUB_OFFLINE=1) and the repo is not in the "
            "local cache; download it elsewhere and pass its folder"
        ) from None
    except hub_errors.HfHubHTTPError as e:
        raise UserError(f"{text}: download failed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"{text}: disk full while downloading into the Hugging Face cache") from None
        raise UserError(f"{text}: download failed: {e}") from None


def _is_gguf_file(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a GGUF file (named ``*.gguf`` or starting with the GGUF magic bytes)."""
    from .gguf.reader import is_gguf

    return is_gguf(Path(path).expanduser())


def _check_config(config: dict[str, Any], source: Path, quantize: bool, bits: int, group_size: Optional[int]):
    """Reject what cannot be converted, with the file and key in the message; returns the ``ModelArgs``."""
    from .model.loading import model_args_from_config

    where = source / "config.json"
    if "quantization_config" in config:
        method = (config["quantization_config"] or {}).get("quant_method", "unknown")
        raise UserError(f"{where}: quantization_config: the checkpoint is already quantized ({method}); "
                        "convert its full-precision original")
    if "quantization" in config:
        raise UserError(f"{where}: quantization: already an MLX quantized checkpoint")
    architectures = config.get("architectures") or []
    from .model.families import ARCHITECTURES as known
    if architectures and not any(a in known for a in architectures):
        raise UserError(f"{where}: architectures: {architectures} is not supported (supported: {', '.join(known)})")
    args = model_args_from_config(config, str(where))
    if quantize:
        attn = args.num_attention_heads * args.head_dim
        for name, in_features in (("hidden_size", args.hidden_size), ("intermediate_size", args.intermediate_size),
                                  ("num_attention_heads * head_dim", attn)):
            try:
                n_groups_for(in_features, bits, group_size)
            except ValueError as e:
                raise UserError(f"{where}: {name} = {in_features} cannot be quantized this way: {e}") from None
    return args


def auto_dtype(files: list[Path]) -> str:
    """The output dtype of ``--dtype auto``: the checkpoint's own half precision (the one most of its
    floating-point bytes are stored in), float16 for a float32 checkpoint. Mistral, Llama, Qwen and Gemma
    publish bfloat16 weights; float16 would narrow their range (Gemma's activations overflow in it)."""
    by_dtype: dict[mx.Dtype, int] = {}
    for file in files:
        for code, shape, _ in read_safetensors_header(file).values():
            dtype = SAFETENSORS_DTYPES.get(code)
            if dtype is not None and mx.issubdtype(dtype, mx.floating):
                by_dtype[dtype] = by_dtype.get(dtype, 0) + _nbytes(dtype, shape)
    main = max(by_dtype, key=by_dtype.get) if by_dtype else mx.float32
    return DTYPE_NAMES[main] if main in (mx.bfloat16, mx.float16) else "float16"


def _plan(files: list[Path], quantize: bool, bits: int, group_size: Optional[int], dtype: mx.Dtype,
          tied: bool, multimodal=None) -> tuple[list[_Tensor], int, int, dict[str, dict[str, int]]]:
    """Output tensors in input order, the input bytes, the number of quantized weights and, for a
    ``multimodal`` source (``families.Multimodal``: its names are mapped to ours), the dropped parts."""
    plan: list[_Tensor] = []
    input_bytes = n_quantized = 0
    seen: dict[str, Path] = {}
    dropped: dict[str, dict[str, int]] = {}
    for file in files:
        header = read_safetensors_header(file)
        for name, (code, shape, _) in sorted(header.items(), key=lambda item: item[1][2]):
            if code not in SAFETENSORS_DTYPES:
                raise UserError(f"{file}: tensor {name!r} has dtype {code}, which is not supported")
            if name in seen:
                raise UserError(f"{file}: tensor {name!r} is also in {seen[name]}")
            seen[name] = file
            source_dtype = SAFETENSORS_DTYPES[code]
            size = _nbytes(source_dtype, shape)
            input_bytes += size
            source_name = name
            if multimodal is not None:
                try:
                    name = multimodal.rename(source_name)
                except ValueError as e:
                    raise UserError(f"{file}: {e}") from None
                if name is None:
                    part = dropped.setdefault(multimodal.dropped_part(source_name), {"tensors": 0, "bytes": 0})
                    part["tensors"] += 1
                    part["bytes"] += size
                    continue
            if name.endswith(DROPPED_KEY_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if quantize and QUANTIZED_KEY.match(name):
                out_features, in_features = shape
                n_groups = n_groups_for(in_features, bits, group_size)
                plan.append(_Tensor(name, source_name, file, "weight", mx.uint32,
                                    (out_features, in_features * bits // 32)))
                for kind in ("scales", "biases"):
                    plan.append(_Tensor(name[: -len("weight")] + kind, source_name, file, kind, dtype,
                                        (out_features, n_groups)))
                n_quantized += 1
            else:
                out_dtype = dtype if mx.issubdtype(source_dtype, mx.floating) else source_dtype
                plan.append(_Tensor(name, source_name, file, "copy", out_dtype, shape))
    return plan, input_bytes, n_quantized, dropped


def _write_header(f: BinaryIO, tensors: list[_Tensor]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def _write_bytes(f: BinaryIO, value: mx.array) -> None:
    f.write(memoryview(mx.contiguous(value)))


def _write_tensor(f: BinaryIO, tensor: _Tensor, chunks, source: Path) -> None:
    """Append the arrays ``chunks`` (consecutive rows of ``tensor``) to ``f``, checking them against the plan;
    a value that is not finite (the source's were checked: it left the range of the output dtype) is a
    ``UserError`` naming ``source`` and the tensor."""
    written = 0
    for value in chunks:
        if value.dtype != tensor.dtype or tuple(value.shape[1:]) != tensor.shape[1:]:
            raise AssertionError(f"{tensor.name}: produced {value.dtype} {value.shape}, planned {tensor.dtype} {tensor.shape}")
        if mx.issubdtype(value.dtype, mx.floating):
            check_finite({tensor.name: value}, source,
                         why=f"converted to {DTYPE_NAMES[value.dtype]}, its values leave that type's range: choose "
                             "another --dtype")
        _write_bytes(f, value)
        written += value.nbytes
    if written != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: wrote {written} bytes, planned {tensor.nbytes}")


def _row_chunks(source: mx.array) -> list[tuple[int, int]]:
    """Row ranges of about ``CHUNK_ELEMENTS`` elements: bounds the float32 temporaries of a conversion."""
    if source.ndim < 2:
        return [(0, source.shape[0])]
    rows = source.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, source.size // rows))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _disk_check(out_parent: Path, needed: int) -> None:
    free = shutil.disk_usage(out_parent).free
    if free < needed * 1.02 + 64 * 2**20:
        raise UserError(
            f"{out_parent}: not enough free disk space: the converted checkpoint needs about "
            f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free"
        )


def convert_checkpoint(
    hf_path_or_repo: Union[str, Path],
    mlx_path: Union[str, Path, Output],
    bits: int = ConvertConfig.bits,
    group_size: Optional[int] = ConvertConfig.group_size,
    dtype: str = ConvertConfig.dtype,
    quantize: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    rounding: str = ConvertConfig.rounding,
    calibration_data: Optional[Union[str, Path]] = None,
    calibration_examples: int = ConvertConfig.calibration_examples,
    calibration_max_tokens: int = ConvertConfig.calibration_max_tokens,
    loftq_rank: Optional[int] = None,
    *,
    source_name: Optional[str] = None,
) -> ConvertResult:
    """Convert a Hugging Face checkpoint of a supported family (folder, hub repo id, or a llama.cpp ``.gguf`` file)
    to an MLX checkpoint folder.

    The seven projections of every decoder layer are quantized to ``bits`` with one scale/bias per row
    (``group_size`` None) or per 32/64/128 inputs, their scales and biases stored in ``dtype``; every other
    floating-point tensor is cast to ``dtype`` (``"auto"``: ``auto_dtype``, the checkpoint's own). ``quantize=False`` writes a full-precision copy. Writes
    sharded ``model-XXXXX-of-YYYYY.safetensors`` of about ``shard_bytes`` each with
    ``model.safetensors.index.json``, ``config.json`` (with a ``quantization`` section when quantized), the
    tokenizer files and ``mlx_qlora.json`` (what was converted, plus the source's own ``mlx_qlora.json``, a
    merged model's template). With ``verify`` the result is loaded with ``load_model`` and checked for NaN/inf
    before it is moved into place. ``rounding`` chooses each row's or group's range (``quant/rounding.py``:
    ``nearest`` min/max, ``search`` a searched range; the format is the same). With ``calibration_data`` (a
    prepared data folder) the projections are quantized by GPTQ on the inputs they see on up to
    ``calibration_examples`` of its sequences (``calibration.py``), layer by layer before the shards are
    written, with ranges chosen by ``rounding``. With ``loftq_rank`` each projection is quantized by LoftQ's
    alternation (``lora/loftq.py``) and the rank-r factors of its remaining error are written as a PEFT
    adapter folder ``loftq/`` in the output, which ``finetune.py --lora-init loftq`` starts from (its
    ``base_model_name_or_path``: ``source_name``, default the checkpoint given; a GGUF file's own path, not
    the temporary folder it is read through). ``mlx_path`` is claimed first (``outputs.claim_output``): a model folder
    of ours there is replaced only with ``overwrite``, anything else is refused; a caller that claimed it
    already passes the ``Output``.
    """
    output = as_output(mlx_path, MODEL, inputs=(hf_path_or_repo,), replace=overwrite, flag="--mlx-path")
    if _is_gguf_file(hf_path_or_repo):
        # A llama.cpp GGUF: dequantize it into a temporary Hugging Face folder beside the output (named as the
        # output's temporaries are, so a killed run's is removed by the next one), convert that.
        from .gguf.reader import gguf_to_hf

        tmp = temporary_dir(output.path)
        try:
            hf = gguf_to_hf(hf_path_or_repo, tmp / "hf", progress=progress).out
            result = convert_checkpoint(hf, output, bits, group_size, dtype, quantize, shard_bytes, verify,
                                        overwrite, progress, rounding, calibration_data, calibration_examples,
                                        calibration_max_tokens, loftq_rank, source_name=str(hf_path_or_repo))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        result.source = Path(hf_path_or_repo)
        return result
    started = time.perf_counter()
    if dtype not in DTYPES and dtype != "auto":
        raise UserError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if quantize and bits not in SUPPORTED_BITS:
        raise UserError(f"bits: {bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    if quantize and group_size is not None and group_size not in (32, 64, 128):
        raise UserError(f"group_size: {group_size} is not supported (per-row by default, or 32, 64, 128)")
    if rounding not in ROUNDINGS:
        raise UserError(f"rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    if loftq_rank is not None and (not quantize or loftq_rank < 1):
        raise UserError("loftq_rank: LoftQ needs quantization and a rank >= 1")
    if shard_bytes < 1:
        raise UserError(f"shard_bytes must be >= 1, got {shard_bytes}")
    mlx_path = output.path

    source = resolve_checkpoint(hf_path_or_repo)

    from .model.loading import read_config, weight_files

    from .model.families import family_of, multimodal_of

    config = read_config(source)
    args = _check_config(config, source, quantize, bits, group_size)
    multimodal = multimodal_of(config)
    if multimodal is not None:  # its language model, as a text model (checked by _check_config)
        config = {**multimodal.text_config(config), "architectures": [family_of(args.model_type).architecture]}
    files = weight_files(source)
    dtype = auto_dtype(files) if dtype == "auto" else dtype
    out_dtype = DTYPES[dtype]
    plan, input_bytes, n_quantized, dropped = _plan(files, quantize, bits, group_size, out_dtype,
                                                    args.tie_word_embeddings, multimodal)
    output_bytes = sum(t.nbytes for t in plan)
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    _disk_check(mlx_path.parent, output_bytes)

    quantization = {"bits": bits, "group_size": group_size, "mode": "affine"} if quantize else None
    model_meta = {k: v for k, v in read_json(source / MODEL_META_NAME, default={}).items() if k != "converted"}
    model_meta["converted"] = {"quantization": quantization, "dtype": dtype}
    if multimodal is not None:
        model_meta["converted"]["multimodal"] = {"model_type": multimodal.model_type,
                                                 "architecture": multimodal.architecture, "dropped": dropped}
    if quantize and rounding != "nearest":  # today's folders (min/max) keep today's record
        model_meta["converted"]["rounding"] = rounding
    precomputed = None
    loftq: Optional[dict[str, mx.array]] = {} if loftq_rank else None
    if quantize and calibration_data is not None:
        if multimodal is not None:
            raise UserError(f"{source}: --calibration-data is not supported for multimodal checkpoints yet; "
                            "convert without it, or convert the text model's merged folder")
        from .calibration import calibrated_quantization, calibration_sequences

        sequences = calibration_sequences(calibration_data, calibration_examples, calibration_max_tokens,
                                          args.vocab_size)
        lazy: dict[str, mx.array] = {}
        for file in files:
            lazy.update(mx.load(str(file)))  # read only when a tensor is evaluated
        precomputed = calibrated_quantization(lambda name: lazy[name], args, sequences, bits, group_size, out_dtype,
                                              rounding, progress, loftq_rank, loftq)
        lazy.clear()
        model_meta["converted"]["calibration"] = {"method": "gptq", "examples": len(sequences),
                                                  "tokens": int(sum(len(s) for s in sequences))}
    if loftq_rank:  # calibrated: one closed-form fit on the calibration inputs; else LoftQ's alternation
        model_meta["converted"]["loftq"] = {"rank": loftq_rank, "adapters": LOFTQ_DIR,
                                            **({"fit": "calibrated"} if precomputed is not None
                                               else {"iters": LOFTQ_ITERS})}
    try:
        with output.atomic_dir() as tmp:
            read_bytes = input_bytes - sum(d["bytes"] for d in dropped.values())
            norms = (input_norms(plan, args.norm_weight_offset)
                     if quantize and rounding == "search" and group_size is None else None)
            names = _write_shards(tmp, plan, shard_bytes, bits, group_size, out_dtype, read_bytes, progress,
                                  rounding, precomputed, loftq_rank, loftq, norms)
            if loftq:
                save_adapters(tmp / LOFTQ_DIR, loftq, LoRAConfig(rank=loftq_rank, alpha=float(loftq_rank)),
                              source_name or str(source))
            out_config = dict(config)
            for key in ("torch_dtype", "dtype"):
                if key in out_config:
                    out_config[key] = dtype
            if quantization:
                out_config["quantization"] = quantization
            atomic_write_json(tmp / "config.json", out_config)
            atomic_write_json(tmp / MODEL_META_NAME, model_meta)  # marks the folder as ours (outputs.MODEL)
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
            if verify:
                _verify(tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"{mlx_path}: disk full while writing the converted checkpoint; nothing was written "
                            f"(it needs about {output_bytes / 2**30:.2f} GiB)") from None
        raise
    return ConvertResult(
        path=mlx_path, source=source, n_tensors=len(plan), n_quantized=n_quantized, n_shards=len(names),
        input_bytes=input_bytes, output_bytes=output_bytes, seconds=time.perf_counter() - started,
        quantization=quantization, shards=names, dropped=dropped or None,
    )


def _write_shards(out_dir: Path, plan: list[_Tensor], shard_bytes: int, bits: int, group_size: Optional[int],
                  dtype: mx.Dtype, input_bytes: int, progress: bool, rounding: str = "nearest",
                  precomputed: Optional[dict[str, tuple[mx.array, mx.array, mx.array]]] = None,
                  loftq_rank: Optional[int] = None, loftq: Optional[dict[str, mx.array]] = None,
                  norms: Optional[dict[str, mx.array]] = None) -> list[str]:
    """Read, convert and append every planned tensor to its shard file, one tensor in memory at a time;
    return the shard names.

    ``precomputed`` holds quantized weights made already (calibration), written as they are; with
    ``loftq_rank`` each weight is quantized by LoftQ and its factors are added to ``loftq``. ``norms``: the
    input norm's weight of each projection that reads one (``input_norms``), for the per-row search.
    The shards keep the plan's order (``natural_order=False``): a quantized weight is read before its
    scales and biases, which are made with it. Every shard is named ``model-0000i-of-0000n`` and indexed,
    even a single one.
    """
    by_name = {t.name: t for t in plan}
    loaded: dict[Path, dict[str, mx.array]] = {}
    pending: dict[str, tuple[mx.array, mx.array]] = {}  # scales, biases of the weight just quantized
    bar = tqdm(total=input_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress)

    def write_shard(path: Path, names: list[str]) -> None:
        shard = [by_name[name] for name in names]
        with open(path, "wb") as f:
            _write_header(f, shard)
            for tensor in shard:
                if tensor.kind in ("scales", "biases"):
                    chunks = [pending.pop(tensor.name)]
                else:
                    if tensor.file not in loaded:
                        loaded.clear()  # inputs are read in order: drop the previous file's lazy arrays
                        try:
                            loaded[tensor.file] = mx.load(str(tensor.file))
                        except RuntimeError as e:  # changed since its header was read
                            raise UserError(f"{tensor.file}: cannot be read as safetensors ({e})") from None
                    source = _evaluated(loaded[tensor.file].pop(tensor.source))  # reads this tensor only
                    check_finite({tensor.source: source}, tensor.file)
                    bar.update(source.nbytes)
                    if tensor.kind == "weight" and precomputed is not None and tensor.source in precomputed:
                        chunks = _precomputed_chunks(precomputed.pop(tensor.source), tensor.name, pending)
                    elif tensor.kind == "weight" and loftq_rank:
                        triple, a, b = loftq_quantize(source, loftq_rank, bits, group_size, dtype, rounding,
                                                      column_weights=(norms or {}).get(tensor.source))
                        stem = tensor.source[: -len(".weight")]
                        loftq[stem + ".lora_A"], loftq[stem + ".lora_B"] = mx.array(a), mx.array(b)
                        chunks = _precomputed_chunks(triple, tensor.name, pending)
                    elif tensor.kind == "weight":
                        chunks = _quantized_chunks(source, bits, group_size, dtype, tensor.name, pending, rounding,
                                                   (norms or {}).get(tensor.source))
                    else:
                        chunks = _cast_chunks(source, tensor.dtype)
                    del source
                _write_tensor(f, tensor, chunks, tensor.file)
                del chunks
            f.flush()

    try:
        return write_safetensors_shards(out_dir, {t.name: t.nbytes for t in plan}, shard_bytes, write_shard,
                                        natural_order=False, numbered=True)
    finally:
        bar.close()
        loaded.clear()


# projections that read an RMSNorm's output, and the norms they may read (the first that exists)
NORM_READERS = {"self_attn": (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("input_layernorm",)),
                "mlp": (("gate_proj", "up_proj", "gate_up_proj"), ("pre_feedforward_layernorm",
                                                                   "post_attention_layernorm"))}


def input_norm_name(weight: str, names) -> Optional[str]:
    """The checkpoint name of the RMSNorm whose output the projection ``weight`` reads, among ``names``:
    attention's q/k/v (Phi-3's qkv_proj) read ``input_layernorm``, the MLP's gate/up (gate_up_proj) read
    ``pre_feedforward_layernorm`` (Gemma 2/3) or else ``post_attention_layernorm``; None for o_proj and
    down_proj (their inputs come from no norm) and anything else."""
    for block, (readers, norms) in NORM_READERS.items():
        prefix, marker, rest = weight.rpartition(f".{block}.")
        if marker and rest.split(".")[0] in readers:
            return next((f"{prefix}.{norm}.weight" for norm in norms if f"{prefix}.{norm}.weight" in names), None)
    return None


def input_norms(plan: list[_Tensor], offset: float = 0.0) -> dict[str, mx.array]:
    """For the per-row search: each quantized projection's input norm weight (``offset + w``: Gemma's
    norms store ``w`` and compute with ``1 + w``), by the projection's source name; small vectors, read
    once before the shards are written."""
    sources = {t.source: t for t in plan}
    wanted = {t.source: input_norm_name(t.source, sources) for t in plan if t.kind == "weight"}
    by_file: dict[Path, set[str]] = {}
    for norm in filter(None, wanted.values()):
        by_file.setdefault(sources[norm].file, set()).add(norm)
    values: dict[str, mx.array] = {}
    for file, norms in by_file.items():
        try:
            lazy = mx.load(str(file))
        except RuntimeError as e:  # changed since its header was read
            raise UserError(f"{file}: cannot be read as safetensors ({e})") from None
        for norm in norms:
            values[norm] = _evaluated(lazy[norm].astype(mx.float32) + offset)
    return {weight: values[norm] for weight, norm in wanted.items() if norm is not None}


def _evaluated(value: mx.array) -> mx.array:
    mx.eval(value)
    return value


def _cast_chunks(source: mx.array, dtype: mx.Dtype):
    """Yield ``source`` cast to ``dtype``, block of rows by block."""
    if source.ndim == 0:
        yield _evaluated(source.astype(dtype))
        return
    for start, stop in _row_chunks(source):
        yield _evaluated(source[start:stop].astype(dtype))


def _quantized_chunks(source: mx.array, bits: int, group_size: Optional[int], dtype: mx.Dtype, name: str,
                      pending: dict[str, mx.array], rounding: str = "nearest",
                      column_weights: Optional[mx.array] = None):
    """Yield the packed words of ``source`` block of rows by block; leave its scales/biases in ``pending``."""
    scales, biases = [], []
    for start, stop in _row_chunks(source):
        wq, s, b = quantize(source[start:stop], bits, group_size, dtype=dtype, rounding=rounding,
                            column_weights=column_weights)
        mx.eval(wq, s, b)
        scales.append(s)
        biases.append(b)
        yield wq
    stem = name[: -len("weight")]
    pending[stem + "scales"] = _evaluated(mx.concatenate(scales))
    pending[stem + "biases"] = _evaluated(mx.concatenate(biases))


def _precomputed_chunks(triple: tuple[mx.array, mx.array, mx.array], name: str, pending: dict[str, mx.array]):
    """Yield packed words made already, block of rows by block; leave their scales/biases in ``pending``."""
    wq, scales, biases = triple
    stem = name[: -len("weight")]
    pending[stem + "scales"], pending[stem + "biases"] = scales, biases
    rows = max(1, CHUNK_ELEMENTS // max(1, wq.shape[1] * 8))
    for start in range(0, wq.shape[0], rows):
        yield wq[start:start + rows]


def _verify(path: Path) -> None:
    """Load the converted folder strictly (every name, shape and dtype; ``load_model`` also checks that no
    value is NaN/inf).

    A forward pass is not run: in float16 on a CPU it costs minutes for a 7B model and checks nothing more.
    """
    from .model.loading import load_model

    load_model(path)
