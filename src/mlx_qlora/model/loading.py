"""Load a Hugging Face (or converted) checkpoint directory into ``MistralForCausalLM``.

Loading is strict: every parameter of the model must be in the checkpoint with the right shape, and
every tensor of the checkpoint must belong to the model (a few known extras are skipped, see
``IGNORED_KEY_SUFFIXES``). Tensors are read shard by shard and assigned straight into the model, so
the weights are never held twice: MLX builds the model's initial arrays lazily and never computes the
ones that are replaced. Every floating-point tensor is checked for NaN and infinite values as it is read
(``check_finite``, one reduction per tensor, evaluated with the shard).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError
from ..io import SAFETENSORS_INDEX_NAME, read_json, read_safetensors_header
from .args import ModelArgs
from .mistral import MistralForCausalLM

# Checkpoint tensors that carry no parameters of ours.
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
# The seven projections of a decoder layer, the ones that are quantized (Phi-3: four, two of them fused).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_PROJECTIONS = ("self_attn.qkv_proj", "mlp.gate_up_proj")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def read_config(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Parsed ``config.json`` of a checkpoint directory, with a clear error when it is missing or broken."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    return read_json(path / "config.json", missing="missing (not a Hugging Face or converted checkpoint folder)")


def model_args_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArgs:
    """``ModelArgs`` from a parsed config (a multimodal one's language model: ``families.text_config``), turning
    a bad value into a ``UserError`` naming the file and key."""
    from .families import text_config

    try:
        return ModelArgs.from_hf_config(text_config(config))
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {e}") from None


def weight_files(path: Union[str, os.PathLike]) -> list[Path]:
    """The safetensors files of a checkpoint, in the order of its index when there is one."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise UserError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(Path(p) for p in glob.glob(str(path / "*.safetensors")))
    if not files:
        pickles = glob.glob(str(path / "*.bin")) + glob.glob(str(path / "*.pt")) + glob.glob(str(path / "*.pth"))
        hint = " (found PyTorch pickle files, which are not loaded for safety; convert them to safetensors)" if pickles else ""
        raise UserError(f"{path}: no *.safetensors weight files{hint}")
    return files


# safetensors' dtype codes of the floating dtypes we compute in
_STORED = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def stored_dtype(path: Union[str, os.PathLike]) -> Optional[str]:
    """The dtype a checkpoint stores its embeddings in (``"bfloat16"``, ``"float16"`` or ``"float32"``),
    read from the safetensors headers only; None when no floating ``embed_tokens`` is found."""
    for file in weight_files(path):
        for name, (code, _, _) in read_safetensors_header(file).items():
            if name.endswith("embed_tokens.weight"):
                return _STORED.get(code)
    return None


def compute_dtype(choice: str, path: Union[str, os.PathLike], device: str) -> tuple[str, str]:
    """``(dtype, why)``: the compute dtype for ``choice`` (``"auto"`` or a dtype name) and the checkpoint at
    ``path`` on ``device`` (``"cpu"`` or ``"gpu"``), and the reason, for the run's first lines.

    ``auto`` is float32 on the CPU, where MLX's half-precision matmuls are much slower, and on a GPU the
    checkpoint's half-precision dtype (bfloat16 for a float32 checkpoint: float32 only where asked for).
    """
    if choice != "auto":
        return choice, "--dtype"
    if device == "cpu":
        return "float32", "auto: the CPU computes in float32"
    stored = stored_dtype(path)
    if stored in ("bfloat16", "float16"):
        return stored, "auto: the checkpoint's dtype"
    return "bfloat16", f"auto: the checkpoint stores {stored or 'no floating embeddings'}; half precision on a GPU"


def finite_flags(tensors: dict[str, mx.array]) -> tuple[list[str], Optional[mx.array]]:
    """The names of the floating-point tensors of ``tensors`` and, lazily, one boolean per name: all of its
    values are finite. Evaluate the flags with the tensors (one pass over them) and give both to
    ``raise_not_finite``."""
    names = [name for name, value in tensors.items() if mx.issubdtype(value.dtype, mx.floating)]
    if not names:
        return names, None
    return names, mx.stack([mx.all(mx.isfinite(tensors[name])) for name in names])


NOT_FINITE_WHY = "the file is corrupt or was written from a diverged model"


def raise_not_finite(names: list[str], flags: Optional[mx.array], source: Union[str, os.PathLike],
                     why: str = NOT_FINITE_WHY) -> None:
    """``UserError`` naming ``source`` and the first tensor whose flag (``finite_flags``) is False."""
    if flags is None:
        return
    bad = np.flatnonzero(~np.array(flags))
    if bad.size:
        more = f" (and {bad.size - 1} more tensor(s))" if bad.size > 1 else ""
        raise UserError(f"{source}: tensor {names[bad[0]]} holds NaN or infinite values{more}; {why}")


def check_finite(tensors: dict[str, mx.array], source: Union[str, os.PathLike], why: str = NOT_FINITE_WHY) -> None:
    """``UserError`` naming ``source`` and the tensor when a floating-point tensor of ``tensors`` holds a NaN
    or an infinite value (one reduction per tensor; it evaluates the tensors). ``why``: the likely cause."""
    names, flags = finite_flags(tensors)
    if flags is not None:
        mx.eval(flags)
    raise_not_finite(names, flags, source, why)


def quantize_layers(model: MistralForCausalLM, bits: int, group_size: Optional[int]) -> None:
    """Replace the seven projections of every decoder layer with empty ``QuantizedLinear`` layers."""
    from ..quant.quantized_linear import QuantizedLinear

    swaps = []
    for i, layer in enumerate(model.model.layers):
        for name in PROJECTIONS + FUSED_PROJECTIONS:
            parent_name, leaf = name.split(".")
            if leaf not in getattr(layer, parent_name):  # q/k/v or gate/up of a fused model
                continue
            linear = getattr(layer, parent_name)[leaf]
            out_features, in_features = linear.weight.shape
            swaps.append((f"model.layers.{i}.{name}",
                          QuantizedLinear(in_features, out_features, bits, group_size, bias="bias" in linear)))
    model.update_modules(tree_unflatten(swaps))


def build_model(config: dict[str, Any], source: str = "config.json") -> MistralForCausalLM:
    """An uninitialised model for a parsed config (quantized layers when it has a ``quantization`` section)."""
    args = model_args_from_config(config, source)
    model = MistralForCausalLM(args)
    quant = config.get("quantization")
    if quant:
        if not isinstance(quant, dict) or "bits" not in quant:
            raise UserError(f"{source}: quantization: expected an object with 'bits' and 'group_size'")
        try:
            quantize_layers(model, int(quant["bits"]), quant.get("group_size"))
        except (TypeError, ValueError) as e:  # bits 3, a group size of 48, ...
            raise UserError(f"{source}: quantization: {e}") from None
    model.quantization = quant or None
    return model


def load_weights(model: nn.Module, files: list[Path], dtype: Optional[mx.Dtype] = None, strict: bool = True,
                 rename: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Assign the tensors of ``files`` to ``model`` by name, shard by shard; floating tensors cast to ``dtype``.
    rename: checkpoint name -> ours, None to skip the tensor (a multimodal checkpoint's vision weights)."""
    expected = dict(tree_flatten(model.parameters()))
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    seen: set[str] = set()
    for file in files:
        try:
            tensors = mx.load(str(file))
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"{file}: cannot be read as safetensors ({e})") from None
        updates, read = [], {}
        for key, value in tensors.items():
            if rename is not None:
                try:
                    key = rename(key)
                except ValueError as e:
                    raise UserError(f"{file}: {e}") from None
                if key is None:
                    continue
            if key.endswith(IGNORED_KEY_SUFFIXES) or (tied and key == "lm_head.weight"):
                continue
            if key not in expected:
                if strict:
                    raise UserError(f"{file}: unexpected tensor {key!r} (not a parameter of this model)")
                continue
            if tuple(value.shape) != tuple(expected[key].shape):
                raise UserError(
                    f"{file}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
                )
            read[key] = value
            if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(dtype)
            updates.append((key, value))
            seen.add(key)
        model.update(tree_unflatten(updates))
        names, flags = finite_flags(read)  # of the values as stored, before any cast
        mx.eval(model.parameters(), flags)  # materialise this shard before reading the next
        raise_not_finite(names, flags, file)
        del tensors, updates, read, flags
    missing = [k for k in expected if k not in seen]
    if missing and strict:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")


def resolve_dtype(dtype: Union[None, str, mx.Dtype]) -> Optional[mx.Dtype]:
    """``"float16"`` / ``mx.float16`` / None -> an MLX dtype or None."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(path: Union[str, os.PathLike], dtype: Union[None, str, mx.Dtype] = None) -> MistralForCausalLM:
    """Load a local Hugging Face or converted checkpoint folder.

    dtype: cast floating-point tensors to it (None keeps the stored dtypes). The model is frozen by
    nothing here; training code decides what is trainable. The parsed config stays on ``model.config``: for a
    multimodal checkpoint (``families/multimodal.py``) its language model's, whose weights alone are loaded.
    """
    from .families import multimodal_of

    path = Path(path)
    config = read_config(path)
    multimodal = multimodal_of(config)
    rename = None
    if multimodal is not None:
        try:
            config = multimodal.text_config(config)
        except ValueError as e:
            raise UserError(f"{path / 'config.json'}: {e}") from None
        rename = multimodal.rename
    model = build_model(config, source=str(path / "config.json"))
    load_weights(model, weight_files(path), resolve_dtype(dtype), rename=rename)
    model.config = config
    model.eval()
    return model
