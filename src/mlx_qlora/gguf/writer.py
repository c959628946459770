"""Write a model folder (Hugging Face, merged, or our 4-bit format) as a GGUF file for llama.cpp / Ollama.

Tensors get llama.cpp's names (``mapping.TENSOR_NAMES`` plus the family's own) and, for the ``llama``
architecture, the query/key rows llama.cpp's order; the ``<architecture>.*`` metadata (``llama``, ``qwen2``,
``qwen3``: ``Family.gguf_architecture``) comes from ``config.json`` and the ``tokenizer.*`` metadata from the folder's
tokenizer (``vocab.tokenizer_metadata``), the chat template included. Matrices are stored as float16
(``F16``) or ``Q8_0`` (8 bits per weight, one float16 scale per 32 weights), vectors (the norms) as
float32, as llama.cpp's own converter does. A 4-bit folder is dequantized first (``w = scale * q + bias``).

The file is written under a temporary name beside ``out`` and renamed when complete (``io.atomic_write_file``).
Its first metadata key after ``general.architecture`` is ``mlx_qlora.exported = true``: the mark by which an
existing file at ``out`` is recognised as ours, and replaced; any other file there is refused
(``outputs.GGUF_FILE``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import UserError
from ..model.families import family_of
from ..model.families.base import gguf_shape_metadata
from ..model.layers import llama3_inv_freq
from ..outputs import GGUF_FILE, GGUF_MARKER_KEY, Output, as_output
from .mapping import gguf_name, reorder_to_gguf
from .reader import _gguf
from .vocab import tokenizer_metadata, tokenizer_notes

FILE_TYPES = ("f16", "q8_0", "f32")
Q8_0_BLOCK = 32


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote."""

    out: Path
    file_type: str
    n_tensors: int
    bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return [*self.notes, f"wrote {self.out} ({self.file_type}): {self.n_tensors} tensors ({types}), "
                             f"{self.bytes / 2**20:.1f} MiB"]


def check_exportable(args, source: Path) -> None:
    """Refuse (``UserError`` naming ``source``) a model whose GGUF this writer cannot make faithfully."""
    family = family_of(args.model_type)
    if family.gguf_architecture is None:
        raise UserError(f"{source}: model_type {args.model_type!r} cannot be exported to GGUF yet")
    if args.attention_bias or (args.qkv_bias and "blk.{i}.attn_q.bias" not in family.gguf_names):
        raise UserError(f"{source}: attention_bias: llama.cpp's {family.gguf_architecture!r} architecture has no "
                        f"biases on these attention projections")
    if args.rope_type == "longrope" and not _has_tensor(family.gguf_architecture, "ROPE_FACTORS_LONG"):
        raise UserError(f"{source}: longrope scaling cannot be exported to llama.cpp's "
                        f"{family.gguf_architecture!r} architecture (it has no rope_factors tensors)")
    if family.gguf_metadata is not None:
        try:
            family.gguf_metadata(args)
        except ValueError as e:  # llama.cpp would compute another model from the file
            raise UserError(f"{source}: cannot be exported to GGUF faithfully: {e}") from None
    if args.rope_type == "llama3" and not _has_tensor(family.gguf_architecture, "ROPE_FREQS"):
        raise UserError(f"{source}: rope_type 'llama3' cannot be exported to llama.cpp's "
                        f"{family.gguf_architecture!r} architecture (it has no rope_freqs tensor)")


def _config_metadata(args, name: str, arch: str = "llama") -> dict[str, Any]:
    """``<arch>.*`` / ``general.*`` metadata for ``ModelArgs`` (``arch``: llama.cpp's architecture name;
    ``llama``, ``qwen2`` and ``qwen3`` read the same keys)."""
    meta: dict[str, Any] = {
        "general.name": name,
        **gguf_shape_metadata(args, arch),
        f"{arch}.rope.dimension_count": args.rotary_dims,  # partial rotary embeddings: fewer than head_dim
    }
    if args.head_dim * args.num_attention_heads != args.hidden_size:
        meta[f"{arch}.attention.key_length"] = args.head_dim
        meta[f"{arch}.attention.value_length"] = args.head_dim
    if args.rope_type == "longrope":  # with rope_factors_long / _short (``rope_tensors``), as llama.cpp's phi3
        meta[f"{arch}.rope.scaling.attn_factor"] = float(args.rope_attention_factor)
        meta[f"{arch}.rope.scaling.original_context_length"] = int(args.rope_original_max_position_embeddings)
    if args.rope_type == "linear" or (args.rope_type == "default" and args.rope_scaling_factor != 1.0):
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(args.rope_scaling_factor)
    return meta


def _has_tensor(arch: str, tensor: str) -> bool:
    """Whether llama.cpp's architecture ``arch`` reads the tensor ``tensor`` (a ``gguf.MODEL_TENSOR`` member
    name: ``ROPE_FREQS``, ``ROPE_FACTORS_LONG``), by the gguf package's tables."""
    gguf = _gguf()
    arch_id = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    return arch_id is not None and getattr(gguf.MODEL_TENSOR, tensor) in gguf.MODEL_TENSORS.get(arch_id, ())


def rope_freqs(args) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` (head_dim/2,) float32 for Llama 3.1-style RoPE (``rope_type``
    llama3): per frequency, the factor ggml's rope divides it by, ``theta_i = p * base**(-2i/D) /
    rope_freqs[i]``; that is, plain RoPE's frequency over the scaled one (``llama3_inv_freq``): 1 for the
    kept frequencies, ``factor`` for the divided ones, between them for the smoothed band."""
    dims = args.head_dim
    plain = 1.0 / (args.rope_theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims))  # (D/2,)
    return (plain / np.array(llama3_inv_freq(args), dtype=np.float64)).astype(np.float32)


def rope_tensors(args) -> dict[str, np.ndarray]:
    """The RoPE tensors llama.cpp reads beside the weights, float32 by its names: ``rope_freqs.weight`` for
    llama3 scaling, ``rope_factors_long.weight`` and ``rope_factors_short.weight`` (rotated dimensions / 2
    each: the per-frequency divisors, llama.cpp picking one set by the context length as transformers does by
    the sequence's) for longrope; none otherwise."""
    if args.rope_type == "llama3":
        return {"rope_freqs.weight": rope_freqs(args)}
    if args.rope_type == "longrope":
        return {"rope_factors_long.weight": np.array(args.rope_long_factor, dtype=np.float32),
                "rope_factors_short.weight": np.array(args.rope_short_factor, dtype=np.float32)}
    return {}


def _add_metadata(writer, meta: dict[str, Any]) -> None:
    """Add ``{key: value}`` with GGUF's usual types: uint32 for integers, float32, bool, string, arrays."""
    for key, value in meta.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it itself
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            raise TypeError(f"{key}: cannot write a {type(value).__name__} to GGUF")


def _encode(values: np.ndarray, file_type: str) -> tuple[np.ndarray, Optional[Any], str]:
    """``(data, raw GGML type or None, type name)`` of one tensor for ``file_type``."""
    gguf = _gguf()
    if values.ndim == 1 or file_type == "f32":
        return values.astype(np.float32), None, "F32"
    if file_type == "q8_0" and values.shape[-1] % Q8_0_BLOCK == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(values.astype(np.float32), q), q, "Q8_0"
    half = values.astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise UserError("a weight does not fit in float16 (|w| > 65504); export with file type f32")
    return half, None, "F16"


def model_tensors(folder: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """``(ModelArgs, {Hugging Face name: float32 numpy array})`` of a model folder, 4-bit layers dequantized."""
    import mlx.core as mx

    from ..model.modules import dense_state
    from ..model import load_model

    model = load_model(folder)
    state = dense_state(model)
    tensors = {}
    for name, value in state.items():
        tensors[name] = np.array(value.astype(mx.float32))
    del model, state
    return model_args(folder), tensors


def model_args(folder: Path):
    from ..model.loading import model_args_from_config, read_config

    return model_args_from_config(read_config(folder), str(Path(folder) / "config.json"))


def export_gguf(model_path: Union[str, Path], out: Union[str, Path, Output], file_type: str = "f16",
                name: Optional[str] = None, progress: bool = False) -> ExportReport:
    """Write ``model_path`` (a model folder with its tokenizer) as the GGUF file ``out``.

    file_type: ``f16`` (float16 matrices), ``q8_0`` (8-bit blocks of 32; a matrix whose input size is not
    a multiple of 32 stays float16) or ``f32``. name: ``general.name`` (default: the folder's name).
    ``out`` is claimed first (``outputs.claim_output``): a GGUF file we exported is replaced, anything else
    refused; a caller that claimed it already passes the ``Output``.
    """
    output = as_output(out, GGUF_FILE, inputs=(model_path,), flag="--gguf")
    gguf = _gguf()
    model_path, out = Path(model_path), output.path
    if file_type not in FILE_TYPES:
        raise UserError(f"file type {file_type!r} is not one of {', '.join(FILE_TYPES)}")
    args = model_args(model_path)
    check_exportable(args, model_path / "config.json")
    token_meta = tokenizer_metadata(model_path)
    notes = tokenizer_notes(model_path)
    family = family_of(args.model_type)
    arch = family.gguf_architecture
    if args.sliding_window is not None and not family.gguf_sliding_window:
        notes.append(f"note: llama.cpp's {arch!r} architecture has no sliding window: the GGUF attends to the "
                     f"whole context (the model was trained with a window of {args.sliding_window})")
    _, tensors = model_tensors(model_path)
    if args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    extra = rope_tensors(args)

    ggml_file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                      "f32": gguf.LlamaFileType.ALL_F32}[file_type]
    general_name = name or model_path.resolve().name
    if family.gguf_metadata is not None:  # a family with metadata of its own (Gemma)
        config_meta = {"general.name": general_name, **family.gguf_metadata(args)}
    else:
        config_meta = _config_metadata(args, general_name, arch)
    meta = {GGUF_MARKER_KEY: True, **config_meta}
    if args.sliding_window is not None and family.gguf_sliding_window:
        meta[f"{arch}.attention.sliding_window"] = args.sliding_window
    meta["general.file_type"] = int(ggml_file_type)
    if file_type == "q8_0":
        meta["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    meta.update(token_meta)

    report = ExportReport(out, file_type, 0, 0, notes=notes)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_metadata(writer, meta)
        for hf, values in tensors.items():
            target = gguf_name(hf, family)
            if target is None:
                raise UserError(f"{model_path}: tensor {hf!r} has no llama.cpp name")
            if family.gguf_permute_qk:  # llama.cpp's llama rotates adjacent pairs; the others halves, as transformers
                values = reorder_to_gguf(hf, values, args.num_attention_heads, args.num_key_value_heads)
            if family.gguf_norm_shift and hf.endswith("norm.weight"):
                values = values + np.float32(family.gguf_norm_shift)  # llama.cpp's Gemma stores 1 + w
            data, raw_type, type_name = _encode(values, file_type)
            if raw_type is None:
                writer.add_tensor(target, data)
            else:
                writer.add_tensor(target, data, raw_dtype=raw_type)  # byte rows; the writer derives the shape
            report.tensor_types[type_name] = report.tensor_types.get(type_name, 0) + 1
            report.n_tensors += 1
        tensors.clear()
        for target, values in extra.items():  # float32 vectors, as llama.cpp's converter writes them
            writer.add_tensor(target, values)
            report.tensor_types["F32"] = report.tensor_types.get("F32", 0) + 1
            report.n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()

    output.write_file(write)
    report.bytes = out.stat().st_size
    return report
