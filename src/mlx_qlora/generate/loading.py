"""Load a model for generation: a base checkpoint (4-bit or full precision) plus, optionally, LoRA adapters
attached at run time (not merged), and the prompt template the adapters were trained with.

An adapter path is a run folder (``adapter_model.safetensors`` + ``adapter_config.json`` at its top level,
written when training ends) or a checkpoint folder (``<run>/checkpoints/step-XXXXXXX/``). A run folder
without final adapters falls back to its latest checkpoint (training was interrupted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import UserError
from ..io import read_json
from ..model import load_model
from ..model.loading import compute_dtype
from ..outputs import MODEL_META_NAME
from ..lora.adapters import CONFIG_NAME, WEIGHTS_NAME
from ..lora.attach import attach
from ..train.checkpoint import latest_checkpoint

RUN_CONFIG_NAME = "run_config.json"
# Written by merge into a merged model folder: which template the merged adapters were trained with.
DEFAULT_TEMPLATE = "dolly"
PathLike = Union[str, os.PathLike]


@dataclass
class AdapterInfo:
    """Where the attached adapters came from and what they were trained with."""

    path: Path  # the folder holding the two adapter files
    lora_config: Any  # LoRAConfig
    run_config: Optional[dict]  # the run's run_config.json, when found
    note: str = ""  # e.g. "no final adapters: using checkpoint step-0000100"

    @property
    def template(self) -> Optional[str]:
        if not self.run_config:
            return None
        return self.run_config.get("template") or (self.run_config.get("data_meta") or {}).get("template")

    @property
    def base_model(self) -> Optional[str]:
        return (self.run_config or {}).get("model")


def resolve_adapter_dir(path: PathLike) -> tuple[Path, str]:
    """The folder holding the adapter files for a run or checkpoint folder, and a note when it is a
    fallback. ``UserError`` naming the missing file(s) when there are no adapters."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: adapter folder not found (give a run folder or a checkpoint folder)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give the run or checkpoint folder, not a file)")
    present = [(path / name).is_file() for name in (WEIGHTS_NAME, CONFIG_NAME)]
    if all(present):
        return path, ""
    if not any(present):
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None:
            return checkpoint, f"{path} has no final adapters (training did not finish): using {checkpoint.name}"
    missing = [name for name, ok in zip((WEIGHTS_NAME, CONFIG_NAME), present) if not ok]
    raise UserError(f"{path}: missing {' and '.join(missing)} (not a run or checkpoint folder with LoRA adapters)")


def read_run_config(adapter_dir: Path) -> Optional[dict]:
    """``run_config.json`` of the run an adapter folder belongs to (the folder itself, or the run folder
    two levels above a checkpoint), or None."""
    for folder in (adapter_dir, adapter_dir.parent.parent):
        value = read_json(folder / RUN_CONFIG_NAME, default=None)
        if value is not None:
            return value
    return None


def attach_adapters(model, adapter_path: PathLike) -> AdapterInfo:
    """Wrap the adapted projections of ``model`` in LoRA layers and load the adapter weights of a run or
    checkpoint folder (``lora.attach``). ``UserError`` when the adapters do not fit this model's shape."""
    adapter_dir, note = resolve_adapter_dir(adapter_path)
    run_config = read_run_config(adapter_dir)
    lora_config = attach(model, adapter_dir, made_for=(run_config or {}).get("model"))
    return AdapterInfo(adapter_dir, lora_config, run_config, note)


def load_for_inference(model_path: PathLike, adapter_path: Optional[PathLike] = None, dtype: Optional[str] = None):
    """``(model, tokenizer, adapter_info or None)`` for generation or evaluation.

    model_path: a Hugging Face, converted (4-bit) or merged model folder holding its tokenizer.
    dtype: cast floating weights to it; None or ``"auto"`` as training resolves it
    (``model.loading.compute_dtype``: float32 on the CPU, where half-precision matmuls are much slower, the
    checkpoint's bfloat16 or float16 on a GPU).
    """
    from ..data.tokenizer import load_tokenizer
    from ..device import device_type

    dtype, _ = compute_dtype(dtype or "auto", model_path, device_type())
    model = load_model(model_path, dtype=dtype)
    tokenizer = load_tokenizer(model_path)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise UserError(f"{model_path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.args.vocab_size}")
    info = attach_adapters(model, adapter_path) if adapter_path else None
    model.eval()
    return model, tokenizer, info


def resolve_template(explicit: Optional[str], adapter: Optional[AdapterInfo], model_path: PathLike,
                     tokenizer=None) -> tuple[str, str]:
    """``(template name, where it came from)``: ``--template``, then the adapters' run, then a merged
    model's ``mlx_qlora.json``, then the model's own chat template (``"chat"``) when ``tokenizer`` has one,
    then ``DEFAULT_TEMPLATE``. ``"none"`` (adapters trained on completions or text) means raw prompts."""
    from ..data.chat_template import CHAT_TEMPLATE_NAME
    from ..data.prepare import NO_TEMPLATE
    from ..data.templates import get_template

    def checked(name: str) -> str:
        # "chat" is the model's own chat template (tokenizer_config.json), not one of ours
        return name if name in (CHAT_TEMPLATE_NAME, NO_TEMPLATE) else get_template(name).name

    if explicit:
        return checked(explicit), "--template"
    if adapter is not None and adapter.template:
        return checked(adapter.template), f"the {RUN_CONFIG_NAME} of the adapters' run"
    template = read_json(Path(model_path) / MODEL_META_NAME, default={}).get("template")
    if template:
        return checked(template), MODEL_META_NAME
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return CHAT_TEMPLATE_NAME, "the model's chat template: no training metadata found"
    return DEFAULT_TEMPLATE, "the default: no training metadata and no chat template found; choose with --template"
