"""Merge LoRA adapters into full-precision weights and export a Hugging Face model folder.

For every adapted projection ``W' = W + scale * B @ A`` (A (r, in), B (out, r), ``scale`` from the
adapter config), computed in float32 and cast once to the output dtype. ``W`` is, in order of preference:

1. the original full-precision checkpoint (``base_weights``, or ``model_path`` itself when it is not
   quantized): the merge is lossless apart from the final cast;
2. otherwise the 4-bit base dequantized (``w = scale * q + bias``): exactly the weights the adapters were
   trained against, but not the original ones; the report says so.

The output folder holds ``config.json`` (without the ``quantization`` section), safetensors shards (with
``model.safetensors.index.json`` when there are several), the tokenizer files, and ``mlx_qlora.json`` (the
training template, for ``generate.py``). It is written atomically and loads with
``transformers.AutoModelForCausalLM.from_pretrained``. A check compares the logits of the merged model with
those of the base + adapters on a few prompts (both in float32) and reports the largest difference.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..config import MergeConfig, byte_size
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..io import atomic_write_json, write_safetensors_shards
from ..model import load_model, read_config
from ..model.loading import check_finite, model_args_from_config, resolve_dtype
from ..lora.adapters import load_adapters
from ..lora.merge import merge_state
from ..model.modules import dense_state
from ..outputs import GGUF_FILE, MODEL, Output, as_output, claim_output
from .loading import MODEL_META_NAME, attach_adapters, read_run_config, resolve_adapter_dir

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")
CHECK_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Classify each of the following as a fruit or a vegetable: apple, carrot, pear.",
)


@dataclass
class MergeReport:
    """What a merge did."""

    out: Path
    lossless: bool
    base_description: str
    dtype: str
    merged_layers: int
    shards: int
    max_logit_diff: Optional[float] = None  # merged model vs base + adapters, float32
    max_logit_diff_trained: Optional[float] = None  # merged from the originals vs the 4-bit model + adapters
    check_prompts: int = 0
    quantized_out: Optional[Path] = None
    notes: list[str] = field(default_factory=list)
    gguf_lines: list[str] = field(default_factory=list)  # what the GGUF export wrote

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        kind = "lossless merge into the original weights" if self.lossless else (
            "merge into the DEQUANTIZED 4-bit base (not the original weights: give --base-weights for a "
            "lossless merge)")
        out = [*self.notes, f"{kind}: {self.base_description}",
               f"merged {self.merged_layers} projection(s); wrote {self.shards} shard(s) in {self.dtype} to {self.out}"]
        if self.max_logit_diff is not None:
            out.append(f"max |logit difference| merged vs base + adapters (float32, {self.check_prompts} prompts): "
                       f"{self.max_logit_diff:.3g}")
        if self.max_logit_diff_trained is not None:
            out.append(f"max |logit difference| merged vs the 4-bit model + adapters (its quantization error): "
                       f"{self.max_logit_diff_trained:.3g}")
        if self.quantized_out is not None:
            out.append(f"4-bit copy of the merged model: {self.quantized_out}")
        return out + self.gguf_lines


def parse_size(text: Union[str, int]) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes -> bytes (``config.byte_size``)."""
    try:
        return byte_size(text)
    except ValueError as e:
        raise UserError(str(e)) from None


def _write_shards(tensors: dict[str, mx.array], folder: Path, max_shard_bytes: int) -> int:
    """Write ``tensors`` as Hugging Face shards (``io.write_safetensors_shards``, metadata ``format: pt`` as
    transformers writes); return the number of shards."""

    def write(path: Path, names: list[str]) -> None:
        mx.save_safetensors(str(path), {k: tensors[k] for k in names}, metadata={"format": "pt"})

    return len(write_safetensors_shards(folder, {k: v.nbytes for k, v in tensors.items()}, max_shard_bytes, write))


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


def export_config(config: dict[str, Any], dtype: mx.Dtype) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for merged weights: no ``quantization`` section, the new dtype."""
    config = {k: v for k, v in config.items() if k != "quantization"}
    args = model_args_from_config(config)
    defaults = args.to_hf_config()
    for key in ("architectures", "model_type"):
        config.setdefault(key, defaults[key])
    config["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = _dtype_name(dtype)
    return config


def _check_same_shape(model_config: dict, base_config: dict, model_path: Path, base_path: Path) -> None:
    a, b = model_args_from_config(model_config), model_args_from_config(base_config)
    for key in SHAPE_KEYS:
        if getattr(a, key) != getattr(b, key):
            raise UserError(f"{base_path}: {key} is {getattr(b, key)} but {model_path} has {getattr(a, key)}: "
                            f"--base-weights must be the checkpoint the model was converted from")


def _check_prompts(tokenizer, template: str, vocab_size: int) -> list[list[int]]:
    if tokenizer is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab_size, size=n).tolist() for n in (12, 20, 7)]
    from ..data.prepare import encode_chat

    return [encode_chat(tokenizer, template, [{"role": "user", "content": p}])[0] for p in CHECK_PROMPTS]


def max_logit_difference(model_a, model_b, prompts: list[list[int]]) -> float:
    """Largest |logit difference| between two models over ``prompts`` (each run on its own); NaN when either
    model gives a NaN logit (``max`` alone would skip it and report agreement)."""
    worst = 0.0
    for ids in prompts:
        x = mx.array(ids, dtype=mx.int32)[None]
        diff = float(mx.abs(model_a(x).astype(mx.float32) - model_b(x).astype(mx.float32)).max().item())
        if math.isnan(diff):
            return diff
        worst = max(worst, diff)
    return worst


def merge_adapters(
    model_path: Union[str, Path],
    adapter_path: Union[str, Path],
    out: Union[str, Path, Output],
    base_weights: Optional[Union[str, Path]] = None,
    dtype: Optional[str] = MergeConfig.dtype,
    max_shard_size: Union[str, int] = MergeConfig.max_shard_size,
    check: bool = True,
    quantize: bool = False,
    quantized_out: Optional[Union[str, Path]] = None,
    group_size: Optional[int] = MergeConfig.group_size,
    gguf: Optional[Union[str, Path]] = None,
    gguf_type: str = MergeConfig.gguf_type,
) -> MergeReport:
    """Merge the adapters at ``adapter_path`` (run or checkpoint folder) into a full-precision model at ``out``.

    model_path: the model the adapters were trained on (4-bit or full precision). base_weights: the original
    full-precision Hugging Face folder the 4-bit model was made from (lossless merge). dtype: output dtype
    (default: the base's). check: compare merged vs base + adapters logits. quantize: also write the merged
    model in our 4-bit format to ``quantized_out`` (default ``<out>-4bit``) with ``group_size`` (None:
    one scale per row), scales in the merged dtype. gguf: also write the merged model as this GGUF file
    for llama.cpp / Ollama, ``gguf_type`` ``f16`` or ``q8_0`` (``mlx_qlora.gguf.export_gguf``).

    Every output is claimed before anything is read (``outputs.claim_output``): a model folder (or GGUF file)
    of ours there is replaced, anything else, an input or a folder holding one, or two outputs inside one
    another, is refused. A caller that claimed ``out`` already passes the ``Output``.
    """
    inputs = (model_path, adapter_path, base_weights)
    out_path = out.path if isinstance(out, Output) else Path(out)
    quantized_path = None
    if quantize:
        quantized_path = Path(quantized_out) if quantized_out else out_path.with_name(out_path.name + "-4bit")
    output = as_output(out, MODEL, inputs=inputs, others=(quantized_path, gguf))
    quantized_output = None if quantized_path is None else claim_output(
        quantized_path, MODEL, inputs=inputs, others=(output.path, gguf), flag="--quantized-out")
    gguf_output = None if gguf is None else claim_output(
        gguf, GGUF_FILE, inputs=inputs, others=(output.path, quantized_path), flag="--gguf")
    model_path, out = Path(model_path), output.path
    adapter_dir, note = resolve_adapter_dir(adapter_path)
    adapters, lora_config = load_adapters(adapter_dir)
    run_config = read_run_config(adapter_dir) or {}
    model_config = read_config(model_path)
    if gguf_output is not None:  # before any work, not after the merge
        from ..gguf.writer import check_exportable

        source = model_path / "config.json"
        check_exportable(model_args_from_config(model_config, str(source)), source)
    quantized = bool(model_config.get("quantization"))
    notes = [note] if note else []

    if base_weights is not None:
        from ..convert import resolve_checkpoint

        base_path = resolve_checkpoint(base_weights)  # a local folder, or a hub id (from the local cache if offline)
        base_config = read_config(base_path)
        if base_config.get("quantization"):
            raise UserError(f"{base_path}: is quantized; --base-weights must be the original full-precision folder")
        _check_same_shape(model_config, base_config, model_path, base_path)
        lossless = True
    else:
        base_path, base_config, lossless = model_path, model_config, not quantized
    base_config, multimodal_note = _text_only(base_config, base_path)
    notes += [multimodal_note] if multimodal_note else []
    base = load_model(base_path)
    stored = base.model.embed_tokens.weight.dtype
    out_dtype = resolve_dtype(dtype) or stored
    what = "original weights" if lossless else "4-bit weights"
    base_description = f"{what} of {base_path} ({_dtype_name(stored)})"

    state = dense_state(base)
    merged, n_merged = merge_state(state, adapters, lora_config.scale, out_dtype)
    del state
    # base and adapters were checked as read: a value that is not finite now did not fit the output dtype
    check_finite(merged, f"merged model ({_dtype_name(out_dtype)})",
                 why=f"W + scale * B @ A leaves the range of {_dtype_name(out_dtype)}: choose --dtype float32")

    # where a tokenizer is (generation_config.json or a template alone is none): else the check uses random ids
    tokenizer_source = next((p for p in (model_path, base_path)
                             if any((p / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))), None)
    template = run_config.get("template")
    with output.atomic_dir() as tmp:
        n_shards = _write_shards(merged, tmp, parse_size(max_shard_size))
        atomic_write_json(tmp / "config.json", export_config(base_config, out_dtype))
        for name in TOKENIZER_FILES:
            for source in (model_path, base_path):
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
                    break
        atomic_write_json(tmp / MODEL_META_NAME, {
            "template": template,
            "merged": {"adapter": str(adapter_dir), "base": base_description, "lossless": lossless,
                       "lora": lora_config.to_dict(), "dtype": _dtype_name(out_dtype)},
        })

    report = MergeReport(out, lossless, base_description, _dtype_name(out_dtype), n_merged, n_shards, notes=notes)
    if check:
        tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source is not None else None
        prompts = _check_prompts(tokenizer, template or "dolly", base.args.vocab_size)
        merged_model = load_model(out, dtype="float32")
        report.max_logit_diff = max_logit_difference(merged_model, _with_adapters(base, adapter_dir), prompts)
        report.check_prompts = len(prompts)
        if base_path != model_path:
            trained = _with_adapters(load_model(model_path), adapter_dir)
            report.max_logit_diff_trained = max_logit_difference(merged_model, trained, prompts)
    if quantized_output is not None:
        report.quantized_out = _quantize_copy(out, quantized_output, group_size, report.dtype)
    if gguf_output is not None:
        from ..gguf.writer import export_gguf

        report.gguf_lines = export_gguf(out, gguf_output, gguf_type).lines()
    return report


def _text_only(config: dict[str, Any], path: Path) -> tuple[dict[str, Any], Optional[str]]:
    """A multimodal base's language-model config (the merged output is that text model alone: transformers
    loads it as the text family's ``...ForCausalLM``) and a note saying so; other configs as they are."""
    from ..model.families import family_of, multimodal_of

    multimodal = multimodal_of(config)
    if multimodal is None:
        return config, None
    try:
        text = multimodal.text_config(config)
    except ValueError as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    architecture = family_of(text["model_type"]).architecture
    return {**text, "architectures": [architecture]}, (
        f"{path} is a multimodal {multimodal.architecture}: merged its language model; the output is a text-only "
        f"{architecture} (the vision tower and projector are not written)")


def _with_adapters(model, adapter_dir: Path):
    """``model`` in float32 with the adapters attached (for the logit check)."""
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    attach_adapters(model, adapter_dir)
    return model


def _quantize_copy(hf_dir: Path, out: Output, group_size: Optional[int], dtype: str) -> Path:
    """Our 4-bit format of the merged Hugging Face folder (``convert.convert_checkpoint``); its
    ``mlx_qlora.json`` (the template) is carried over by the conversion."""
    from ..convert import convert_checkpoint

    return convert_checkpoint(hf_dir, out, bits=4, group_size=group_size, dtype=dtype, progress=False).path
