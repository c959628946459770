"""The embedded default: a tiny random Mistral and a sentencepiece tokenizer trained on our sample data.

It lets the whole chain (convert, prepare, fine-tune, generate, evaluate) run in minutes on a laptop
CPU without downloading anything. The weights are random, so the model knows nothing before
fine-tuning; the tokenizer is real (BPE with byte fallback, ids unk 0 / bos 1 / eos 2 like Mistral's).
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


def make_tiny_model(out_dir: Path, data: Optional[Path] = None, seed: int = 0, **overrides) -> Path:
    """Write a Hugging Face-style folder (config.json, model.safetensors, tokenizer.model) for the tiny default."""
    from safetensors.numpy import save_file

    args = ModelArgs(**{**TINY_ARGS, **overrides})
    with atomic_dir(out_dir) as tmp:
        train_tokenizer(sample_texts(Path(data) if data else SAMPLE_DATA), tmp / "tokenizer.model", args.vocab_size)
        save_file(random_weights(args, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = args.to_hf_config()
        config["torch_dtype"] = "float32"
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                          "unk_token": "<unk>", "add_bos_token": True})
    return Path(out_dir)
