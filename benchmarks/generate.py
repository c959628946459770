#!/usr/bin/env python
"""Prompt and decode speed of our generator next to mlx-lm's, on the same random small Mistral.

A random Mistral (default: vocab 32000, hidden 512, 8 layers, GQA 8/2; the real Mistral v1 tokenizer
from the ``mistral-common`` package) is saved once as a Hugging Face folder; our ``load_model`` and
``mlx_lm.load`` both read it. Each side then processes the same prompt and decodes greedily for a fixed
number of tokens (EOS is not allowed to end ours early; mlx-lm's count is reported as it ran), in float32
and with 4-bit weights in the seven projections of every layer (group size 64 on both sides: our
``quantize_model``, mlx-lm's ``nn.quantize``; embeddings and the head stay float32).
Reported: prompt tokens/s and generation tokens/s, the median of --repeats runs after one warm-up; the
two sides alternate run by run. Tokens/s are each library's own statistics (prompt: prefill and the first
token; generation: the tokens after it).

  python benchmarks/generate.py --json runs/bench/generate.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlx_qlora  # noqa: E402,F401  (loads OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_qlora.errors import UserError, run_cli  # noqa: E402
from mlx_qlora.io import atomic_write_json  # noqa: E402


def write_model(folder: Path, args) -> None:
    """A Hugging Face folder with random float32 weights and the Mistral v1 tokenizer."""
    from safetensors.numpy import save_file

    from mlx_qlora.tiny import random_weights

    try:
        import mistral_common
    except ImportError:
        raise UserError("the benchmark needs mistral-common (for the Mistral v1 tokenizer)") from None
    folder.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(args, seed=0), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = args.to_hf_config()
    config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))


def run_ours(model, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    from mlx_qlora.generate.generator import generate

    result = generate(model, None, prompt, max_tokens=max_tokens, eos_ids=set())
    return result.stats.prompt_tps, result.stats.generation_tps, result.stats.generated_tokens


def run_peer(model, tokenizer, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    from mlx_lm.generate import stream_generate

    last = None
    for last in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=max_tokens):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def measure(fns: dict, repeats: int) -> dict[str, dict]:
    """Median speeds of each named run. The runs alternate (a, b, a, b, ...) after one warm-up each, so a
    change in the machine's load hits both sides alike."""
    for fn in fns.values():
        fn()
    runs: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {
        name: {
            "prompt_tokens_per_s": statistics.median(r[0] for r in rs),
            "generation_tokens_per_s": statistics.median(r[1] for r in rs),
            "generated_tokens": rs[-1][2],
        }
        for name, rs in runs.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row, after a warm-up (default 3)")
    p.add_argument("--no-quantized", action="store_true", help="skip the 4-bit rows")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args()

    import mlx.nn as nn
    import mlx_lm

    from mlx_qlora.model import ModelArgs, load_model
    from mlx_qlora.model.modules import quantize_model

    model_args = ModelArgs(
        vocab_size=32000, hidden_size=args.hidden_size, intermediate_size=int(args.hidden_size * 2.75) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, sliding_window=4096,
        max_position_embeddings=4096,
    )
    prompt = np.random.default_rng(0).integers(3, 32000, size=args.prompt_tokens).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(folder, model_args)
        variants = [("float32", None)] + ([] if args.no_quantized else [("4-bit g64", 64)])
        for name, group_size in variants:
            ours = load_model(folder)
            peer, tokenizer = mlx_lm.load(str(folder))
            if group_size:
                quantize_model(ours, bits=4, group_size=group_size)
                # the same layers on both sides: the seven projections (embeddings and lm_head stay float32)
                nn.quantize(peer, group_size=group_size, bits=4,
                            class_predicate=lambda path, m: isinstance(m, nn.Linear) and path.endswith("_proj"))
            if group_size is None:
                params = sum(v.size for _, v in tree_flatten(ours.parameters()))
            mx.eval(ours.parameters(), peer.parameters())
            speeds = measure({"mlx-qlora": lambda: run_ours(ours, prompt, args.max_tokens),
                              "mlx-lm": lambda: run_peer(peer, tokenizer, prompt, args.max_tokens)}, args.repeats)
            rows += [{"weights": name, "implementation": impl, **speed} for impl, speed in speeds.items()]
            del ours, peer

    print(f"random Mistral: hidden {model_args.hidden_size}, {model_args.num_hidden_layers} layers, vocab 32000 "
          f"({params / 1e6:.1f}M parameters); prompt {args.prompt_tokens} tokens, decode {args.max_tokens}, "
          f"greedy, batch 1, median of {args.repeats}; {platform.machine()} CPU, MLX {mx.__version__}")
    print(f"{'weights':<11} {'implementation':<15} {'prompt tok/s':>13} {'decode tok/s':>13} {'decoded':>8}")
    for r in rows:
        print(f"{r['weights']:<11} {r['implementation']:<15} {r['prompt_tokens_per_s']:>13.1f} "
              f"{r['generation_tokens_per_s']:>13.1f} {r['generated_tokens']:>8}")
    if args.json:
        atomic_write_json(args.json, {
            "model": {k: getattr(model_args, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads")},
            "parameters": params, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "device": f"{platform.machine()} {mx.default_device()}",
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "rows": rows,
        })
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
