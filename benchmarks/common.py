"""Shared pieces of the benchmarks: model presets, random quantized models, timing, table output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import mlx_qlora  # noqa: E402,F401  (OpenBLAS before MLX on Linux)

import mlx.core as mx  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1's real configuration.
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096, max_position_embeddings=32768),
    # Llama-3-8B's shapes: full attention (no window), 128k vocabulary (plain RoPE: the scaling changes nothing
    # in the cost).
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, sliding_window=None, max_position_embeddings=131072),
    # A small model for CPU measurements (vocab and head like Mistral's).
    "small": dict(model_type="mistral", vocab_size=32000, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=4096, max_position_embeddings=4096),
    # Small enough for a CI smoke test on two CPU cores.
    "tiny": dict(model_type="mistral", vocab_size=1024, hidden_size=128, intermediate_size=384,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 rope_theta=10000.0, sliding_window=256, max_position_embeddings=2048),
    # Qwen3-8B's real configuration: q/k norms per head, head_dim 128, a 151,936-token vocabulary.
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     qk_norm=True, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=None,
                     max_position_embeddings=40960, tie_word_embeddings=False),
    # Its smoke test on two CPU cores (head_dim 64 = 2 x hidden / heads, as Qwen3's small sizes).
    "qwen3-tiny": dict(model_type="qwen3", vocab_size=1024, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       qk_norm=True, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=None,
                       max_position_embeddings=2048, tie_word_embeddings=False),
}
# Presets with a real model's shapes (the benchmarks' default shapes for them are the real workloads').
REAL_PRESETS = ("mistral-7b", "qwen3-8b")


# --checkpointing off|on|both -> the settings to run
CHECKPOINTING = {"off": [False], "on": [True], "both": [False, True]}

# Variants of our stack for side-by-side runs: each worker process starts with these variables set
# (``mlx_qlora.settings`` reads them once; docs/ARCHITECTURE.md lists them).
OUR_VARIANTS = {
    "ours": {},
    "ours-mlx-dequant": {"MLX_QLORA_DEQUANT": "mlx"},
    "ours-mb5": {"MLX_MAX_MB_PER_BUFFER": "5"},
    "ours-fused": {"MLX_QLORA_FUSED_DECODE": "1"},
    "ours-unfused": {"MLX_QLORA_FUSED_DECODE": "0"},
    "ours-r4": {"MLX_QLORA_QMV_MIN_WARPS": "1024"},
    "ours-slots32": {"MLX_QLORA_ATTENTION_SLOTS": "32"},
    "ours-slots16": {"MLX_QLORA_ATTENTION_SLOTS": "16"},
    "ours-slots128": {"MLX_QLORA_ATTENTION_SLOTS": "128"},
    "ours-no-mma": {"MLX_QLORA_QMV_MMA": "0"},  # the few-row 4-bit kernels on CUDA cores only
    "ours-attn-w4": {"MLX_QLORA_ATTENTION_THREADS": "128"},  # attention's first pass in blocks of 4 warps
    "ours-attn-u4": {"MLX_QLORA_ATTENTION_UNROLL": "4"},  # ... each warp reading runs of 4 slots
    "ours-prefill0": {"MLX_QLORA_PREFILL_EVAL_LAYERS": "0"},  # the prompt pass queued at once
    "ours-prefill4": {"MLX_QLORA_PREFILL_EVAL_LAYERS": "4"},  # ... in groups of 4 layers
    "ours-prefill1": {"MLX_QLORA_PREFILL_EVAL_LAYERS": "1"},  # ... a layer at a time (the default)
    "ours-plain": {"MLX_QLORA_BLOCKWISE_FROM": "0", "MLX_QLORA_LAYER_TILE": "0"},  # no block-wise attention, no tiles
    "ours-long2k": {"MLX_QLORA_BLOCKWISE_FROM": "2048", "MLX_QLORA_BLOCKWISE_SHARE": "0",
                    "MLX_QLORA_LAYER_TILE": "2048"},  # ... both from 2k tokens, whatever the memory
    "ours-blockwise": {"MLX_QLORA_BLOCKWISE_SHARE": "0", "MLX_QLORA_ATTENTION_CHUNK": "0"},  # block-wise from 8k
    "ours-band-all": {"MLX_QLORA_ATTENTION_CHUNK_UP_TO": "0"},  # the band of chunks at every length (CUDA)
}


def worker_env(stack: str) -> dict:
    """The environment of the worker process for ``stack`` (a key of OUR_VARIANTS, or a peer)."""
    return {**os.environ, **OUR_VARIANTS.get(stack, {})}


def set_memory_limits(cache_limit_gb: float | None = None, memory_limit_gb: float | None = None) -> None:
    """MLX's buffer-cache cap (0 frees buffers at once) and memory limit (above it MLX waits for the GPU)."""
    if cache_limit_gb is not None:
        mx.set_cache_limit(int(cache_limit_gb * 1e9))
    if memory_limit_gb is not None:
        mx.set_memory_limit(int(memory_limit_gb * 1e9))


def on_gpu() -> bool:
    return mx.default_device().type == mx.gpu


def compute_dtype():
    """bfloat16 on a GPU, float32 on the CPU (where narrow types are slow)."""
    return mx.bfloat16 if on_gpu() else mx.float32


def param_count(cfg: dict[str, Any], with_embeddings: bool = True) -> int:
    """Parameters of a Mistral config (untied head): the 4 x N FLOPs-per-token rule uses the matmul ones."""
    D, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    attn = D * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = attn + 3 * D * F + 2 * D
    total = L * per_layer + D + V * D  # layers, final norm, lm_head
    return total + (V * D if with_embeddings else 0)


def matmul_peak_tflops(repeats: int = 20, trials: int = 5) -> float:
    """Measured dense matmul speed in this process: bf16 4096x14336x4096 on a GPU, f32 1024^3 on the CPU.

    The best of ``trials`` timings of ``repeats`` matmuls queued together (one wait per trial): a single
    short timing with a wait after every matmul read up to 20% apart within one GPU lease."""
    if on_gpu():
        m, k, n, dtype = 4096, 4096, 14336, mx.bfloat16
    else:
        m, k, n, dtype = 1024, 1024, 1024, mx.float32
    a, b = mx.random.normal((m, k)).astype(dtype), mx.random.normal((k, n)).astype(dtype)
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    best = best_seconds(lambda: mx.eval([a @ b for _ in range(repeats)]), trials)
    return 2 * m * k * n * repeats / best / 1e12


def copy_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 10, trials: int = 5) -> float:
    """Measured device copy bandwidth (read + write) in GB/s: the best of ``trials`` timings of a chain of
    ``repeats`` elementwise passes queued together (one wait per trial, as ``matmul_peak_tflops``)."""
    if not on_gpu():
        n_bytes = 1 << 26
    x = mx.zeros((n_bytes // 2,), dtype=mx.bfloat16)
    mx.eval(x)
    for _ in range(2):
        mx.eval(x + 1)

    def chain():
        y = x
        for _ in range(repeats):
            y = y + 1  # each pass reads the previous one's output: two buffers alive, no wait in between
        mx.eval(y)

    return 2 * n_bytes * repeats / best_seconds(chain, trials) / 1e9


def best_seconds(run: Callable[[], Any], trials: int) -> float:
    """The shortest of ``trials`` timings of ``run()``, which queues its work and waits for it once."""
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (which must evaluate its own outputs), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def environment() -> dict[str, Any]:
    info = {"mlx": mx.__version__, "device": str(mx.default_device()), "python": platform.python_version(),
            "machine": platform.machine()}
    try:
        info["device_name"] = mx.device_info().get("device_name", "")
    except Exception:
        try:
            info["device_name"] = mx.metal.device_info().get("device_name", "")  # older MLX
        except Exception:
            pass
    from mlx_qlora import blas

    info["blas"] = blas.describe()
    return info


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a Markdown table; columns are (key, header, format)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else (fmt.format(value) if fmt else str(value)))
        print("| " + " | ".join(cells) + " |")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
