"""Convert a Hugging Face checkpoint (Mistral, Llama, Qwen2, Qwen3, Phi-3) to our checkpoint with 4-bit projections.

    python scripts/convert_weights.py --hf-path mistralai/Mistral-7B-v0.1 --mlx-path models/mistral-7b-4bit
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..config import ConvertConfig
from ..errors import UserError, run_cli
from .flags import build, given, parser, shown


def group_text(group_size: Optional[int]) -> str:
    """A group size as ``--group-size`` spells it: ``row`` for None (one scale per output row)."""
    return "row" if group_size is None else str(group_size)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command's flags; every value flag defaults to None (the default is ``ConvertConfig``'s)."""
    d = ConvertConfig()
    p = parser(__doc__, prog)
    p.add_argument("--hf-path", required=True,
                   help="hub repo id (owner/name; only config, safetensors and tokenizer files are downloaded), "
                        "a local checkpoint folder, or a .gguf file (llama architecture; for a Q4_1 file "
                        "--group-size 32 keeps its weights exactly)")
    p.add_argument("--mlx-path", required=True,
                   help="output folder, new or empty (written to a temporary folder, then renamed)")
    p.add_argument("--bits", type=int, choices=(2, 4, 8), help=f"bits per quantized weight (default {d.bits})")
    p.add_argument("--group-size",
                   help="inputs sharing one scale and bias: 'row' (one per output row), 32, 64 or 128 "
                        f"(default {group_text(d.group_size)})")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"),
                   help="dtype of the unquantized tensors and of the scales/biases (default auto: the checkpoint's "
                        "bfloat16 or float16; float16 for a float32 checkpoint)")
    p.add_argument("--rounding", choices=("nearest", "search"),
                   help="how each row's or group's range is chosen: 'nearest' (its min and max) or 'search' (a "
                        "searched range of lower error; slower, same format; docs/quantization.md) "
                        f"(default {d.rounding})")
    p.add_argument("--calibration-data", metavar="DATA_DIR",
                   help="a prepared data folder (prepare_data.py output, made with this model's tokenizer): "
                        "quantize by GPTQ on the inputs each projection sees on its train split, layer by layer")
    p.add_argument("--calibration-examples", type=int,
                   help=f"sequences of --calibration-data to use (default {d.calibration_examples}, each cut to "
                        f"{d.calibration_max_tokens} tokens)")
    p.add_argument("--loftq-rank", type=int, metavar="R",
                   help="quantize by LoftQ's alternation and write the rank-R factors of the remaining error as "
                        "adapters (loftq/ in the output) for finetune.py --lora-init loftq with --lora-rank R; with "
                        "--calibration-data the factors are fitted to GPTQ's error on the calibration inputs")
    p.add_argument("--no-quantize", action="store_true", help="write a full-precision MLX copy instead")
    p.add_argument("--shard-size-gb", type=float,
                   help=f"approximate size of each output shard (GiB; default {shown(d.shard_size_gb)})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --mlx-path if it holds a model folder written by mlx-qlora (anything else there "
                        "is refused)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result before moving it into place")
    return p


def parse_group_size(text: str) -> Optional[int]:
    """``--group-size`` text -> group size (None: one scale per row); ``UserError`` for other values."""
    if text.lower() in ("row", "none", "per-row"):
        return None
    if text not in ("32", "64", "128"):
        raise UserError(f"--group-size: {text!r} is not 'row', 32, 64 or 128")
    return int(text)


def run(args: argparse.Namespace) -> None:
    """Convert as ``args`` say and print one line: what was written, how large, how long it took."""
    from ..convert import convert_checkpoint

    values = given(args, ConvertConfig)
    if args.group_size is not None:  # 'row' parses to None, which is a value here, not "not given"
        values["group_size"] = parse_group_size(args.group_size)
    config = build(ConvertConfig, values)
    result = convert_checkpoint(
        args.hf_path,
        args.mlx_path,
        bits=config.bits,
        group_size=config.group_size,
        dtype=config.dtype,
        quantize=not args.no_quantize,
        shard_bytes=int(config.shard_size_gb * 2**30),
        verify=not args.no_verify,
        overwrite=args.overwrite,
        rounding=config.rounding,
        calibration_data=args.calibration_data,
        calibration_examples=config.calibration_examples,
        calibration_max_tokens=config.calibration_max_tokens,
        loftq_rank=args.loftq_rank,
    )
    if result.dropped_line():
        print(result.dropped_line())
    what = "full precision" if result.quantization is None else (
        f"{result.quantization['bits']}-bit, "
        + ("per-row" if result.quantization["group_size"] is None else f"group size {result.quantization['group_size']}"))
    print(f"wrote {result.path} ({what}): {result.n_tensors} tensors ({result.n_quantized} quantized weights) "
          f"in {result.n_shards} shard(s), {result.input_bytes / 2**30:.2f} GiB -> {result.output_bytes / 2**30:.2f} GiB "
          f"in {result.seconds:.1f} s")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """``convert``: parse ``argv`` (None: the command line) and run; a ``UserError`` exits 2 with one line.
    Returns the exit status, 0."""
    run_cli(lambda: run(build_parser(prog).parse_args(argv)))
    return 0
