#!/usr/bin/env python
"""Long-sequence training attention alone: forward + backward of one layer's attention under Mistral's window
(``--window``, 4,096), by each path the seam can take, with the peak memory above its inputs, the time and
the largest difference of its output from block-wise attention's.

Paths: ``causal`` (MLX's fused kernel with ``mask="causal"``: no window, the lower bound),
``causal-chunks`` (the same as calls of at most ``MLX_QLORA_CAUSAL_CALL_PAIRS`` query-key pairs,
``model/causal_chunks.py``), ``banded`` (the window as a band of chunks through the fused kernel,
``model/banded.py``; ``--chunks`` sizes), ``banded-bool`` (the same with the band mask handed over boolean,
which MLX broadcasts to every head and chunk before making it additive), and ``blockwise`` (``model/blockwise.py``, MLX operations). Mistral-7B's heads (32 query,
8 key/value, head size 128; ``--heads``), batch 1, the compute dtype; ``--lengths`` tokens.

  python benchmarks/probes/long_attention_probe.py --lengths 16384,24576 --json out.json   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common.py is in benchmarks/

from common import compute_dtype, environment, print_table, write_json

import mlx.core as mx

from mlx_qlora.model import banded
from mlx_qlora import settings
from mlx_qlora.model.banded import banded_attention
from mlx_qlora.model.causal_chunks import chunk_rows, chunked_causal_attention
from mlx_qlora.model.blockwise import blockwise_attention
from mlx_qlora.model.mask import MaskRule

def measure(fn, q, k, v) -> tuple[float, float]:
    """(ms, GB): forward + backward of ``fn`` (a loss summing its output), after a warm-up call; peak memory
    above what was in use before the call."""
    grad = mx.grad(lambda q, k, v: mx.sum(fn(q, k, v).astype(mx.float32)), argnums=(0, 1, 2))
    mx.eval(grad(q, k, v))
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    mx.eval(grad(q, k, v))
    mx.synchronize()
    return 1e3 * (time.perf_counter() - start), (mx.get_peak_memory() - before) / 1e9


def paths(length: int, window: int, chunks: list[int], scale: float, pairs: int) -> dict:
    rule = MaskRule(length, window)
    out = {"causal": lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")}
    rows = chunk_rows(length, pairs or length * length)
    out[f"causal-chunks C={rows}"] = lambda q, k, v: chunked_causal_attention(q, k, v, scale, rows)
    for c in chunks:
        out[f"banded C={c}"] = lambda q, k, v, c=c: banded_attention(q, k, v, scale, rule, c)
    out[f"banded-bool C={chunks[0]}"] = lambda q, k, v: _boolean_masks(q, k, v, scale, rule, chunks[0])
    out["blockwise"] = lambda q, k, v: blockwise_attention(q, k, v, scale, window, block=512)
    return out


def _boolean_masks(q, k, v, scale, rule, chunk):
    real = banded.additive_of
    banded.additive_of = lambda mask, dtype: mask  # the masks as booleans
    try:
        return banded_attention(q, k, v, scale, rule, chunk)
    finally:
        banded.additive_of = real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16384", help="comma list of sequence lengths")
    p.add_argument("--chunks", default="1024,2048", help="comma list of band chunk sizes")
    p.add_argument("--window", type=int, default=4096, help="the sliding window")
    p.add_argument("--heads", default="32,8,128", help="query heads, key/value heads, head size")
    p.add_argument("--call-pairs", type=int, default=settings.current().causal_call_pairs,
                   help="query-key pairs per call of the causal-chunks path (default: MLX_QLORA_CAUSAL_CALL_PAIRS)")
    p.add_argument("--paths", default="", help="comma list of path names to run (default: all)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    dtype = compute_dtype()
    chunks = [int(c) for c in args.chunks.split(",")]
    H, Hkv, D = (int(x) for x in args.heads.split(","))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        keys = mx.random.split(mx.random.key(length), 3)
        q = mx.random.normal((1, H, length, D), key=keys[0]).astype(dtype)
        k = mx.random.normal((1, Hkv, length, D), key=keys[1]).astype(dtype)
        v = mx.random.normal((1, Hkv, length, D), key=keys[2]).astype(dtype)
        mx.eval(q, k, v)
        fns = paths(length, args.window, chunks, D**-0.5, args.call_pairs)
        reference = None  # the windowed paths' outputs against block-wise's
        for name, fn in fns.items():
            if args.paths and name.split(" ")[0] not in args.paths.split(","):
                continue
            try:
                ms, gb = measure(fn, q, k, v)
                rows.append({"length": length, "path": name, "ms": ms, "peak_gb": gb})
                if name.startswith("causal-chunks"):  # against one call (which may itself run out of memory)
                    try:
                        whole = fns["causal"](q, k, v).astype(mx.float32)
                        diff = mx.abs(fn(q, k, v).astype(mx.float32) - whole).max()
                        rows[-1]["max_diff_vs_causal"] = diff.item()
                    except RuntimeError as e:
                        rows[-1]["one_call_error"] = str(e).splitlines()[0]
                elif name != "causal":
                    if reference is None:
                        reference = fns["blockwise"](q, k, v).astype(mx.float32)
                    diff = mx.abs(fn(q, k, v).astype(mx.float32) - reference).max()
                    rows[-1]["max_diff_vs_blockwise"] = diff.item()
            except RuntimeError as e:  # out of memory: reported, the other paths still run
                rows.append({"length": length, "path": name, "error": str(e).splitlines()[0]})
            print(rows[-1], flush=True)
    print_table(rows, [("length", "tokens", "{:,}"), ("path", "path", "{}"), ("ms", "fwd+bwd ms", "{:.1f}"),
                       ("peak_gb", "peak GB above inputs", "{:.2f}"),
                       ("max_diff_vs_blockwise", "max difference from block-wise", "{:.1e}"),
                       ("max_diff_vs_causal", "max difference from one causal call", "{:.1e}")])
    write_json(args.json, {"benchmark": "long_attention_probe", "window": args.window, "heads": [H, Hkv, D], "environment": environment(),
                           "rows": rows})


if __name__ == "__main__":
    main()
