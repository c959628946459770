#!/usr/bin/env python
"""Convert a Hugging Face Mistral/Llama checkpoint to an MLX checkpoint with 4-bit projections.

    python scripts/convert_weights.py --hf-path mistralai/Mistral-7B-v0.1 --mlx-path models/mistral-7b-4bit
"""

from __future__ import annotations

import argparse

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", required=True,
                        help="hub repo id (owner/name; only config, safetensors and tokenizer files are downloaded), "
                             "a local checkpoint folder, or a .gguf file (llama architecture; for a Q4_1 file "
                             "--group-size 32 keeps its weights exactly)")
    parser.add_argument("--mlx-path", required=True, help="output folder (written to a temporary folder, then renamed)")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 4, 8), help="bits per quantized weight (default 4)")
    parser.add_argument("--group-size", default="row",
                        help="inputs sharing one scale and bias: 'row' (one per output row, the default), 32, 64 or 128")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype of the unquantized tensors and of the scales/biases (default float16)")
    parser.add_argument("--no-quantize", action="store_true", help="write a full-precision MLX copy instead")
    parser.add_argument("--shard-size-gb", type=float, default=3.0, help="approximate size of each output shard (GiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace --mlx-path if it exists")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the result before moving it into place")
    return parser.parse_args(argv)


def parse_group_size(text: str):
    if text.lower() in ("row", "none", "per-row"):
        return None
    if text not in ("32", "64", "128"):
        raise UserError(f"--group-size: {text!r} is not 'row', 32, 64 or 128")
    return int(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    from mlx_qlora.convert import convert_checkpoint

    result = convert_checkpoint(
        args.hf_path,
        args.mlx_path,
        bits=args.bits,
        group_size=parse_group_size(args.group_size),
        dtype=args.dtype,
        quantize=not args.no_quantize,
        shard_bytes=int(args.shard_size_gb * 2**30),
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )
    what = "full precision" if result.quantization is None else (
        f"{result.quantization['bits']}-bit, "
        + ("per-row" if result.quantization["group_size"] is None else f"group size {result.quantization['group_size']}"))
    print(f"wrote {result.path} ({what}): {result.n_tensors} tensors ({result.n_quantized} quantized weights) "
          f"in {result.n_shards} shard(s), {result.input_bytes / 2**30:.2f} GiB -> {result.output_bytes / 2**30:.2f} GiB "
          f"in {result.seconds:.1f} s")


if __name__ == "__main__":
    run_cli(main)
