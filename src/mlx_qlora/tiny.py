"""The embedded default: a tiny Mistral and a sentencepiece tokenizer trained on our sample data.

It lets the whole chain (convert, prepare, fine-tune, generate, evaluate) run in minutes on a laptop
CPU without downloading anything. The tokenizer is real (BPE with byte fallback, ids unk 0 / bos 1 /
eos 2 like Mistral's). The weights start random and are then pre-trained briefly, all of them, as a
plain language model on the *instructions and contexts* of the sample data (never its responses): the
result is a weak base model that knows some words but not the instruction format or the answers, which
is what LoRA fine-tuning then teaches it. A LoRA on a purely random base barely moves its loss.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .io import atomic_dir, atomic_write_json
from .model.args import ModelArgs

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "sample" / "dolly_sample.jsonl"

TINY_ARGS = dict(
    model_type="mistral",
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=256,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def sample_texts(path: Path = SAMPLE_DATA) -> Iterable[str]:
    """Every instruction, context and response of a Dolly-schema JSONL file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                for key in ("instruction", "context", "response"):
                    if record.get(key):
                        yield record[key]


def train_tokenizer(texts: Iterable[str], out_file: Path, vocab_size: int = 1024) -> Path:
    """Train a BPE sentencepiece model (byte fallback; unk 0, bos 1, eos 2, no pad) on ``texts``."""
    import sentencepiece as spm

    out_file = Path(out_file)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            character_coverage=1.0, num_threads=1, minloglevel=2,
            remove_extra_whitespaces=False, split_digits=True,
        )
        out_file.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / "tokenizer.model", out_file)
    return out_file


def random_weights(args: ModelArgs, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Hugging Face-named float32 tensors: normal(0, std) for matrices, ones for norms."""
    rng = np.random.default_rng(seed)
    D, F, hd = args.hidden_size, args.intermediate_size, args.head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (args.num_attention_heads * hd, D),
            p + "self_attn.k_proj.weight": (args.num_key_value_heads * hd, D),
            p + "self_attn.v_proj.weight": (args.num_key_value_heads * hd, D),
            p + "self_attn.o_proj.weight": (D, args.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        })
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, D)
    return {
        name: (np.ones(shape, np.float32) if len(shape) == 1 else rng.normal(0, std, shape).astype(np.float32))
        for name, shape in shapes.items()
    }


def pretrain_texts(path: Path = SAMPLE_DATA) -> list[str]:
    """The instructions and contexts of a Dolly-schema JSONL file (the responses are left for fine-tuning)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                texts += [record[k] for k in ("instruction", "context") if record.get(k)]
    return texts


def pretrain(weights: dict[str, np.ndarray], args: ModelArgs, token_rows: np.ndarray, steps: int,
             learning_rate: float = 3e-3, batch_size: int = 8, seed: int = 0, progress: bool = True
             ) -> dict[str, np.ndarray]:
    """Train every weight as a causal language model on ``token_rows`` (n, L) for ``steps`` AdamW steps."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from tqdm import tqdm

    from .model.mistral import MistralForCausalLM
    from .train.loss import loss_sums
    from .train.optimizer import AdamW

    model = MistralForCausalLM(args)
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    optimizer = AdamW(weight_decay=0.0)
    params = dict(tree_flatten(model.trainable_parameters()))
    state = optimizer.init(params)

    def loss_fn(model, ids):
        hidden = model.hidden_states(ids[:, :-1])
        total, count = loss_sums(hidden, model.logits_from_hidden, ids[:, 1:], chunk=4096, fused=False)
        return total / mx.maximum(count, 1)

    value_and_grad = nn.value_and_grad(model, loss_fn)

    @mx.compile
    def step_fn(params, state, batch, lr):
        model.update(tree_unflatten(list(params.items())))
        loss, grads = value_and_grad(model, batch)
        params, state = optimizer.update(params, dict(tree_flatten(grads)), state, lr)
        return params, state, loss

    rng = np.random.default_rng(seed)
    for step in tqdm(range(steps), desc="pre-training the tiny base", disable=not progress):
        batch = mx.array(token_rows[rng.integers(0, len(token_rows), batch_size)])
        lr = learning_rate * min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / steps))
        params, state, loss = step_fn(params, state, batch, mx.array(lr, dtype=mx.float32))
        mx.eval(params, state, loss)
    model.update(tree_unflatten(list(params.items())))
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _token_rows(tokenizer_file: Path, texts: list[str], length: int = 128) -> np.ndarray:
    """Concatenate ``BOS text EOS`` for every text and cut the stream into rows of ``length`` tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    stream = [t for ids in sp.encode(texts) for t in [sp.bos_id(), *ids, sp.eos_id()]]
    n = len(stream) // length
    return np.array(stream[: n * length], dtype=np.int32).reshape(n, length)


def make_tiny_model(out_dir: Path, data: Optional[Path] = None, seed: int = 0, pretrain_steps: int = 200,
                    progress: bool = True, **overrides) -> Path:
    """Write a Hugging Face-style folder (config.json, model.safetensors, tokenizer.model) for the tiny default."""
    from safetensors.numpy import save_file

    args = ModelArgs(**{**TINY_ARGS, **overrides})
    data = Path(data) if data else SAMPLE_DATA
    with atomic_dir(out_dir) as tmp:
        train_tokenizer(sample_texts(data), tmp / "tokenizer.model", args.vocab_size)
        weights = random_weights(args, seed)
        if pretrain_steps:
            rows = _token_rows(tmp / "tokenizer.model", pretrain_texts(data))
            weights = pretrain(weights, args, rows, pretrain_steps, seed=seed, progress=progress)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = args.to_hf_config()
        config["torch_dtype"] = "float32"
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                          "unk_token": "<unk>", "add_bos_token": True})
    return Path(out_dir)
