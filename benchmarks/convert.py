"""Time and peak memory of ``convert_checkpoint`` on a checkpoint with Mistral-7B's shapes.

No Mistral weights can be downloaded here, so the benchmark writes a Hugging Face style checkpoint with
Mistral-7B's exact tensor shapes (hidden 4096, intermediate 14336, 32/8 heads, vocab 32000, untied head)
and random bfloat16 weights, shard by shard (one shard per decoder layer, one for the embeddings, head and
final norm), but with only a few decoder layers. It converts it once with 1 layer and once with
``--layers`` layers, each in a fresh process whose peak RSS is read from the operating system, and
extrapolates linearly to Mistral-7B's 32 layers. The generated files are deleted afterwards.

    python benchmarks/convert.py [--layers 2] [--group-size row] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import UserError, run_cli

import mlx.core as mx

from mlx_qlora.model import ModelArgs

FULL_LAYERS = 32


def write_checkpoint(path: Path, n_layers: int, seed: int = 0) -> int:
    """A Mistral-7B-shaped checkpoint with ``n_layers`` decoder layers; returns its size in bytes."""
    args = ModelArgs(num_hidden_layers=n_layers)  # the defaults are Mistral-7B's
    path.mkdir(parents=True)
    config = args.to_hf_config()
    config["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    d, f, kv = args.hidden_size, args.intermediate_size, args.num_key_value_heads * args.head_dim
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    n_shards = n_layers + 1
    weight_map, total = {}, 0

    def save(index: int, tensors: dict) -> None:
        nonlocal total
        name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        mx.save_safetensors(str(path / name), tensors, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.nbytes for v in tensors.values())

    def normal(shape):
        return (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)

    save(1, {"model.embed_tokens.weight": normal((args.vocab_size, d)), "lm_head.weight": normal((args.vocab_size, d)),
             "model.norm.weight": mx.ones((d,), dtype=mx.bfloat16)})
    for i in range(n_layers):
        tensors = {f"model.layers.{i}.{name}.weight": normal(shape) for name, shape in shapes.items()}
        tensors[f"model.layers.{i}.input_layernorm.weight"] = mx.ones((d,), dtype=mx.bfloat16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = mx.ones((d,), dtype=mx.bfloat16)
        save(i + 2, tensors)
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_conversion(src: Path, out: Path, group_size, dtype: str, verify: bool) -> dict:
    """Convert in a fresh process; returns seconds, peak RSS (bytes) and the output size."""
    code = (
        "import json, resource, sys, mlx_qlora\n"
        "from mlx_qlora.convert import convert_checkpoint\n"
        "r = convert_checkpoint(sys.argv[1], sys.argv[2], group_size=json.loads(sys.argv[3]), dtype=sys.argv[4],\n"
        "                       verify=sys.argv[5] == '1', progress=False)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)\n"
        "try:  # Linux: ru_maxrss survives fork+exec from a large parent; VmHWM belongs to this process alone\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "    peak = int(status) * 1024\n"
        "except (OSError, IndexError):\n"
        "    pass\n"
        "print(json.dumps({'seconds': r.seconds, 'output_bytes': r.output_bytes, 'shards': r.n_shards, 'peak': peak}))\n"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(src), str(out), json.dumps(group_size), dtype,
                           "1" if verify else "0"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise UserError(f"conversion failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, "convert_seconds": result["seconds"], "peak_rss_bytes": result["peak"],
            "output_bytes": result["output_bytes"], "shards": result["shards"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the larger generated checkpoint (>= 2)")
    parser.add_argument("--group-size", default="row", help="'row' or 32/64/128")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--work-dir", help="where to write the generated checkpoints (default: a temporary folder)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.layers < 2:
        raise UserError("--layers must be >= 2 (the benchmark fits time = fixed + per-layer * layers)")
    group_size = None if args.group_size == "row" else int(args.group_size)
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.work_dir))
    need = (2 + args.layers) * 0.45e9 + 0.6e9  # two inputs of 1 and N layers plus outputs, roughly
    if shutil.disk_usage(work).free < 1.5 * need:
        raise UserError(f"{work}: needs about {need / 1e9:.1f} GB free disk")
    rows = []
    print(f"mlx {mx.__version__} on {mx.default_device()} ({platform.machine()}, {os.cpu_count()} CPUs); "
          f"group size {args.group_size}, output {args.dtype}")
    print(f"{'layers':>6} {'input GB':>9} {'output GB':>10} {'verify':>6} {'seconds':>8} {'peak RSS GB':>12}")
    try:
        for n_layers in (1, args.layers):
            src = work / f"hf-{n_layers}"
            input_bytes = write_checkpoint(src, n_layers)
            for verify in (False, True):
                out = work / f"mlx-{n_layers}-{int(verify)}"
                r = run_conversion(src, out, group_size, args.dtype, verify)
                rows.append({"layers": n_layers, "verify": verify, "input_bytes": input_bytes, **r})
                print(f"{n_layers:>6} {input_bytes / 1e9:>9.2f} {r['output_bytes'] / 1e9:>10.2f} {str(verify):>6} "
                      f"{r['convert_seconds']:>8.1f} {r['peak_rss_bytes'] / 1e9:>12.2f}", flush=True)
                shutil.rmtree(out)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def fit(key, verify):
        small, large = [r for r in rows if r["verify"] == verify]
        per_layer = (large[key] - small[key]) / (large["layers"] - 1)
        return small[key] - per_layer, per_layer

    estimate = {}
    for verify in (False, True):
        fixed, per_layer = fit("convert_seconds", verify)
        out_fixed, out_per_layer = fit("output_bytes", verify)
        rss_fixed, rss_per_layer = fit("peak_rss_bytes", verify)
        estimate["verify" if verify else "convert_only"] = {
            "seconds_fixed": fixed, "seconds_per_layer": per_layer, "seconds_32_layers": fixed + FULL_LAYERS * per_layer,
            "output_bytes_32_layers": out_fixed + FULL_LAYERS * out_per_layer,
            "peak_rss_growth_per_layer": rss_per_layer,
            "peak_rss_32_layers": rss_fixed + FULL_LAYERS * max(rss_per_layer, 0.0),
        }
    print("\nExtrapolated to Mistral-7B's 32 layers (time = fixed + per-layer x 32; peak RSS likewise):")
    for key, e in estimate.items():
        print(f"  {key:<12} {e['seconds_32_layers']:>7.0f} s ({e['seconds_per_layer']:.1f} s per layer), output "
              f"{e['output_bytes_32_layers'] / 1e9:.2f} GB, peak RSS {e['peak_rss_32_layers'] / 1e9:.2f} GB "
              f"({e['peak_rss_growth_per_layer'] / 1e6:+.0f} MB per layer)")
    if args.json:
        from mlx_qlora.io import atomic_write_json

        atomic_write_json(args.json, {"device": str(mx.default_device()), "machine": platform.machine(),
                                      "group_size": group_size, "dtype": args.dtype, "runs": rows, "estimate": estimate})


if __name__ == "__main__":
    run_cli(main)
