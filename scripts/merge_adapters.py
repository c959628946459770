#!/usr/bin/env python
"""Merge LoRA adapters into full-precision weights and write a Hugging Face model folder.

With --base-weights (the original float16/bfloat16/float32 checkpoint the 4-bit model was made from) the
merge is lossless: W + scale * B @ A in float32, cast once. Without it the adapters are merged into the
dequantized 4-bit base (the output says so). The folder loads with transformers' from_pretrained and with
this project's scripts; --quantize also writes our 4-bit format of the merged model, --gguf a GGUF file
for llama.cpp / Ollama (float16, or 8-bit with --gguf-type q8_0).

Example:
  python scripts/merge_adapters.py --model models/mistral-7b-4bit --adapter runs/dolly \
      --base-weights models/Mistral-7B-v0.1 --out models/mistral-7b-dolly
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mlx_qlora  # noqa: E402,F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model the adapters were trained on (4-bit or Hugging Face)")
    p.add_argument("--adapter", required=True, help="run folder or checkpoint folder with the adapters")
    p.add_argument("--base-weights", help="original full-precision Hugging Face folder or hub repo id, for a lossless merge")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the logit comparison (it holds two float32 copies of the model in memory)")
    p.add_argument("--quantize", action="store_true", help="also write our 4-bit format of the merged model")
    p.add_argument("--quantized-out", help="folder for --quantize (default: <out>-4bit)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size for --quantize: 32, 64 or 128 (default: one scale per row)")
    p.add_argument("--gguf", help="also write the merged model as this GGUF file (llama.cpp, Ollama)")
    p.add_argument("--gguf-type", choices=["f16", "q8_0", "f32"], default="f16",
                   help="GGUF tensor type of the matrices: f16 (default), q8_0 (8 bits) or f32")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mlx_qlora.generate.merge import merge_adapters

    report = merge_adapters(args.model, args.adapter, args.out, base_weights=args.base_weights, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, check=not args.no_check, quantize=args.quantize,
                            quantized_out=args.quantized_out, group_size=args.group_size,
                            gguf=args.gguf, gguf_type=args.gguf_type)
    for line in report.lines():
        print(line)


if __name__ == "__main__":
    run_cli(main)
