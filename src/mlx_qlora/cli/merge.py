"""Merge LoRA adapters into full-precision weights and write a Hugging Face model folder.

With --base-weights (the original float16/bfloat16/float32 checkpoint the 4-bit model was made from) the
merge is lossless: W + scale * B @ A in float32, cast once. Without it the adapters are merged into the
dequantized 4-bit base (the output says so). The folder loads with transformers' from_pretrained and with
this project's scripts; --quantize also writes our 4-bit format of the merged model, --gguf a GGUF file
for llama.cpp / Ollama (float16, or 8-bit with --gguf-type q8_0). A multimodal original (Gemma 3 4B/12B/27B)
as --base-weights gives its language model alone: a text-only Gemma3ForCausalLM folder.

Example:
  python scripts/merge_adapters.py --model models/mistral-7b-4bit --adapter runs/dolly \\
      --base-weights models/Mistral-7B-v0.1 --out models/mistral-7b-dolly
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..config import MergeConfig
from ..errors import run_cli
from .flags import build, given, parser

def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags; every value flag defaults to None (the defaults are ``MergeConfig``'s)."""
    d = MergeConfig()
    dtype = "the base's" if d.dtype is None else d.dtype
    group = "one scale per row" if d.group_size is None else d.group_size
    p = parser(__doc__, prog)
    p.add_argument("--model", required=True, help="the model the adapters were trained on (4-bit or Hugging Face)")
    p.add_argument("--adapter", required=True, help="run folder or checkpoint folder with the adapters")
    p.add_argument("--base-weights", help="original full-precision Hugging Face folder or hub repo id, for a lossless merge")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or a model folder of ours (replaced atomically); anything "
                        "else is refused")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=f"output dtype (default: {dtype})")
    p.add_argument("--max-shard-size",
                   help=f"largest safetensors shard, e.g. 5GB, 500MB (default {d.max_shard_size})")
    p.add_argument("--no-check", action="store_true",
                   help="skip the logit comparison (it holds two float32 copies of the model in memory)")
    p.add_argument("--quantize", action="store_true", help="also write our 4-bit format of the merged model")
    p.add_argument("--quantized-out", help="folder for --quantize (default: <out>-4bit)")
    p.add_argument("--group-size", type=int,
                   help=f"quantization group size for --quantize: 32, 64 or 128 (default: {group})")
    p.add_argument("--gguf", help="also write the merged model as this GGUF file (llama.cpp, Ollama); an "
                                  "existing file is replaced only if we exported it")
    p.add_argument("--gguf-type", choices=["f16", "q8_0", "f32"],
                   help=f"GGUF tensor type of the matrices: f16, q8_0 (8 bits) or f32 (default {d.gguf_type})")
    return p


def run(args: argparse.Namespace) -> None:
    """Merge as ``args`` say and print the report (what was written, the logit check, the exports)."""
    from ..generate.merge import merge_adapters

    config = build(MergeConfig, given(args, MergeConfig))
    report = merge_adapters(args.model, args.adapter, args.out, base_weights=args.base_weights, dtype=config.dtype,
                            max_shard_size=config.max_shard_size, check=not args.no_check, quantize=args.quantize,
                            quantized_out=args.quantized_out, group_size=config.group_size,
                            gguf=args.gguf, gguf_type=config.gguf_type)
    for line in report.lines():
        print(line)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``merge``: parse ``argv`` (None: the command line) and run; a ``UserError`` exits 2 with one line.
    Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
