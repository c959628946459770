"""Calibrated 4-bit conversion: GPTQ on the inputs each projection sees on the user's own prepared data.

``calibrated_quantization`` runs the checkpoint one decoder layer at a time over a few hundred sequences
of a prepared data folder (``prepare_data.py``'s ``train`` split). In each layer the projections are
quantized in the order the data flows: q/k/v on the attention's inputs, then o_proj on the attention
output computed with the quantized q/k/v, then gate/up, then down_proj on the activations of the
quantized gate/up; the layer's output, from its quantized projections, is the next layer's input. Each
projection is quantized by ``quant.gptq.gptq_quantize`` with the sum of ``x^T x`` over its inputs.
With a LoftQ rank, each projection's remaining error ``W - Q`` also gets the rank-r factors that fit it best
on those same inputs (``lora.loftq.calibrated_factors``), and later stages see ``Q + B @ A``: the model the
adapters start from.

Memory: one layer in float32, the hidden states of the calibration tokens (tokens x hidden x 4 bytes:
65k tokens of a 4096-wide model are 1 GB), one ``in x in`` Hessian, and the quantized projections made
so far (the 4-bit model: about 4 GB for 7B), which ``convert.py`` then writes as it writes the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
from tqdm import tqdm

from .errors import UserError
from .model.args import ModelArgs
from .model.layers import DecoderLayer
from .model.mask import make_mask
from .lora.loftq import calibrated_factors
from .quant.gptq import DAMP, gptq_quantize
from .quant.quantize import dequantize

# The projections of a decoder layer, in the order the data reaches them; a group shares its inputs.
STAGES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def calibration_sequences(data_dir: Union[str, Path], n_examples: int, max_tokens: int, vocab_size: int,
                          seed: int = 0) -> list[np.ndarray]:
    """Up to ``n_examples`` token sequences (each cut to ``max_tokens``) of the prepared ``data_dir``'s
    train split, chosen at random with ``seed``; ``UserError`` for a folder that is not usable."""
    from .data.dataset import PreparedDataset

    data = PreparedDataset(data_dir, "train")
    n = len(data.lengths)
    if n == 0:
        raise UserError(f"{data_dir}: the train split holds no examples to calibrate with")
    chosen = np.sort(np.random.default_rng(seed).permutation(n)[:n_examples])
    sequences = [np.asarray(data[int(i)]["input_ids"][:max_tokens], dtype=np.int32) for i in chosen]
    sequences = [s for s in sequences if len(s)]
    top = max(int(s.max()) for s in sequences)
    if top >= vocab_size:
        raise UserError(f"{data_dir}: token id {top} is outside this model's vocabulary of {vocab_size}: the data "
                        "was prepared with another tokenizer")
    return sequences


class _InputRecorder(nn.Module):
    """Passes through to ``base`` and adds ``x^T x`` of its inputs (float64) to ``hessian``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.hessian: Optional[np.ndarray] = None

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, in)
        product = np.array(rows.T @ rows, dtype=np.float64)  # (in, in)
        self.hessian = product if self.hessian is None else self.hessian + product
        return self.base(x)


def _run_layer(layer: DecoderLayer, hidden: list[mx.array]) -> list[mx.array]:
    """Each sequence's hidden states (1, L, D) through ``layer`` (its own window), evaluated one by one."""
    outputs = []
    for h in hidden:
        length = h.shape[1]
        out = layer(h, lambda key_positions, window: make_mask(length, 0, key_positions, window, None, None))
        mx.eval(out)
        outputs.append(out)
    return outputs


def calibrated_quantization(
    tensor: Callable[[str], mx.array],
    args: ModelArgs,
    sequences: list[np.ndarray],
    bits: int,
    group_size: Optional[int],
    dtype: mx.Dtype,
    rounding: str = "search",
    progress: bool = True,
    loftq_rank: Optional[int] = None,
    factors: Optional[dict[str, mx.array]] = None,
) -> dict[str, tuple[mx.array, mx.array, mx.array]]:
    """GPTQ-quantize every decoder projection; returns ``{"model.layers.{i}.{...}.weight": (wq, scales,
    biases)}`` in ``quantize``'s format.

    ``tensor(name)`` returns a checkpoint tensor by its Hugging Face name (read when called);
    ``sequences`` are token-id arrays (``calibration_sequences``). With ``loftq_rank``, ``factors`` receives
    ``{"model.layers.{i}.{...}.lora_A": (r, in), ".lora_B": (out, r)}`` (float32, for a scale of 1)."""
    if loftq_rank and factors is None:
        raise ValueError("loftq_rank needs a factors dictionary to fill")
    if args.fused_projections:
        raise UserError(f"calibration: model_type {args.model_type!r} keeps q/k/v and gate/up in fused "
                        "projections, which GPTQ calibration does not handle yet; convert without --calibration-data")
    embed = tensor("model.embed_tokens.weight").astype(mx.float32)
    hidden = [embed[mx.array(s)][None] for s in sequences]  # (1, L, D) each
    if args.scale_embeddings:  # Gemma: embeddings times sqrt(hidden), as the model does
        hidden = [h * math.sqrt(args.hidden_size) for h in hidden]
    mx.eval(hidden)
    del embed
    results: dict[str, tuple[mx.array, mx.array, mx.array]] = {}
    tokens = sum(len(s) for s in sequences)
    bar = tqdm(total=args.num_hidden_layers, unit="layer", desc=f"calibrating on {tokens} tokens",
               disable=not progress)
    for index in range(args.num_hidden_layers):
        prefix = f"model.layers.{index}."
        layer = DecoderLayer(args, index)
        names = [name for name, _ in tree_flatten(layer.parameters())]  # every family's norms and biases too
        layer.load_weights([(name, tensor(prefix + name).astype(mx.float32)) for name in names])
        layer.eval()
        for block, projs in STAGES:
            parent = getattr(layer, block)
            recorder = _InputRecorder(getattr(parent, projs[0]))
            setattr(parent, projs[0], recorder)
            _run_layer(layer, hidden)
            setattr(parent, projs[0], recorder.base)
            for proj in projs:
                linear = getattr(parent, proj)
                wq, scales, biases = gptq_quantize(linear.weight, recorder.hessian, bits, group_size, dtype, rounding)
                mx.eval(wq, scales, biases)
                results[f"{prefix}{block}.{proj}.weight"] = (wq, scales, biases)
                # later stages see this projection as it will be stored (plus the adapters' start)
                restored = dequantize(wq, scales, biases, bits, group_size, dtype=mx.float32)
                if loftq_rank:
                    b, a = calibrated_factors(np.array(linear.weight - restored), recorder.hessian, loftq_rank, DAMP)
                    factors[f"{prefix}{block}.{proj}.lora_A"], factors[f"{prefix}{block}.{proj}.lora_B"] = (
                        mx.array(a), mx.array(b))
                    restored = restored + mx.array(b) @ mx.array(a)
                linear.weight = restored
        hidden = _run_layer(layer, hidden)
        bar.update(1)
    bar.close()
    return results
