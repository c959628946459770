#!/usr/bin/env python
"""The README's commands as a user runs them, beside mlx-lm's own commands on the same model and records.

Each command runs in a fresh process (``scripts/convert_weights.py``, ``prepare_data.py``, ``finetune.py``,
``generate.py`` with and without ``--adapter``, a three-turn chat on standard input; ``python -m mlx_lm
convert / lora / generate``), timed by the wall clock from process start and read from what it logs itself:

- training tokens/s: steady (the median of the logged windows after the first: ``metrics.jsonl`` rows with
  ``--log-every 1``, mlx-lm's reports every ``--grad-accum`` iterations; none with fewer than two) and end
  to end (trained tokens / the process's wall-clock); peak memory (ours: ``metrics.jsonl``; ``mlx_lm lora``
  does not print it);
- time to first step: process start to the first training row (ours: in ``metrics.jsonl``; mlx-lm: its
  first report line);
- time to first token: process start to the first byte of the reply on standard output; each generation
  command (and the chat) runs twice and the second process is reported (the first compiles the CUDA kernels
  it meets for the first time, which are then kept on disk: its wall-clock and first token are recorded
  beside);
- decode tokens/s of a fresh process (the script's own printed speed), with adapters, and on the third
  turn of a chat (streamed output: the reply's tokens after its first / seconds from its first to its last
  byte), beside the warm benchmark without adapters run in the same command (``gpu_generate.py --stacks
  ours``: the chat's target is 90% of it).

The model is a random Hugging Face folder (``transformers``' ``MistralConfig``; weights drawn by MLX and written
as safetensors shards: ``write_hf_folder``) of a preset's shape with the real Mistral v1 ``tokenizer.model`` (from ``mistral-common``), so vocab 32000 for
every preset. Two data sets: the shipped sample (``data/sample/``) and generated longer records (200 to 1,000
tokens, seeded; their length distribution is printed and recorded). The training command is the README's
step 3 (a token budget per batch: ``--max-batch-tokens``) with ``--iters`` for ``--epochs 1`` (and
``--log-every 1``); ``--ours-batching rows`` adds our run with mlx-lm's batching (``--batch-size``). mlx-lm
trains LoRA of the same rank and scale on all layers, batch 4 with the same gradient accumulation and
checkpointing, on the same records written as
``{"text": ...}`` (the decoded token ids; its loss covers the prompt too, the compute is the same).

  python benchmarks/user_path.py --preset tiny                      # CPU, about a minute or two
  python benchmarks/user_path.py --preset mistral-7b --steps 30 --max-tokens 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import PRESETS, ROOT, environment, median, print_table, write_json

README_BATCH_TOKENS = 4096  # the README's step 3: --max-batch-tokens 4096 --grad-accum 2

PY = sys.executable
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # rich's colours, should a child print them
SCRIPTS = ROOT / "scripts"
SAMPLE = ROOT / "data" / "sample" / "dolly_sample.jsonl"
PROMPT = "Give me three ideas for a rainy Sunday."
CHAT_TURNS = ["Name three rivers in Europe.", "Which of them is the longest?", "Tell me more about it."]
LORA_RANK, LORA_ALPHA = 16, 32.0  # our defaults; mlx-lm is given the same rank and scale

# words for the generated long records (seeded); any text will do, the lengths are what matter
WORDS = ("the river valley morning harbor lantern quiet market northern garden stone bridge winter summer "
         "engine signal careful measure travel account history letter answer question number village "
         "mountain weather forest library window kitchen painting music ancient modern simple several "
         "explain describe compare because although during between without before after often rarely").split()


# ---------------------------------------------------------------- processes

def run_timed(cmd: list[str], *, stdin_text: str | None = None, watch: Path | None = None,
              env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``cmd``; return its wall-clock, standard output and error, the arrival time of every chunk of
    standard output (seconds from process start) and, with ``watch``, when that file first held a
    training row (a JSON line with ``tokens_per_sec``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or {**os.environ, "NO_COLOR": "1", "TERM": "dumb"})
    chunks: list[tuple[float, bytes]] = []
    err = bytearray()

    def read_out():
        while True:
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            chunks.append((time.perf_counter() - start, data))

    def read_err():
        while True:
            data = os.read(proc.stderr.fileno(), 65536)
            if not data:
                break
            err.extend(data)

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    if stdin_text is not None:
        proc.stdin.write(stdin_text.encode())
        proc.stdin.close()
    first_row = None
    while proc.poll() is None:
        if watch is not None and first_row is None and watch.exists():
            if any("tokens_per_sec" in line for line in watch.read_text(errors="replace").splitlines()):
                first_row = time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.01)
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    stdout = ANSI.sub("", b"".join(c for _, c in chunks).decode(errors="replace"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
                           f"\n{stdout[-2000:]}")
    return {"wall_s": wall, "stdout": stdout, "stderr": err.decode(errors="replace"), "chunks": chunks,
            "first_row_s": first_row}


def first_byte_after(chunks: list[tuple[float, bytes]], offset: int) -> float | None:
    """Arrival time of the chunk that holds byte ``offset`` of the joined output."""
    seen = 0
    for t, data in chunks:
        seen += len(data)
        if seen > offset:
            return t
    return None


# ---------------------------------------------------------------- inputs

def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of a Hugging Face Mistral checkpoint of ``cfg``'s shape (untied head), by name."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update({f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,),
                       f"{layer}.self_attn.q_proj.weight": (q, hidden), f"{layer}.self_attn.k_proj.weight": (kv, hidden),
                       f"{layer}.self_attn.v_proj.weight": (kv, hidden), f"{layer}.self_attn.o_proj.weight": (hidden, q),
                       f"{layer}.mlp.gate_proj.weight": (inter, hidden), f"{layer}.mlp.up_proj.weight": (inter, hidden),
                       f"{layer}.mlp.down_proj.weight": (hidden, inter)})
    return shapes


def write_hf_folder(cfg: dict, path: Path, seed: int = 0, tokenizer: Path | None = None) -> None:
    """A random Mistral checkpoint of ``cfg``'s shape in bfloat16, with the real Mistral v1 tokenizer
    (``tokenizer``, default: the file in ``mistral-common``): ``config.json`` from transformers'
    ``MistralConfig``, the weights drawn by MLX on its default device as transformers initialises them
    (normal, std ``initializer_range`` 0.02; norms 1), in safetensors shards of 5 GB with their index (a
    7B folder in seconds on a GPU, where building transformers' model took minutes)."""
    import mlx.core as mx
    from transformers import MistralConfig

    from mlx_qlora.io import write_safetensors_shards

    config = MistralConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    config.architectures = ["MistralForCausalLM"]
    config.save_pretrained(path)
    meta = json.loads((path / "config.json").read_text())
    meta.update(torch_dtype="bfloat16", dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    shapes = hf_tensor_shapes(cfg)
    index = {name: i for i, name in enumerate(shapes)}
    std = config.initializer_range

    def tensor(name: str) -> mx.array:
        if name.endswith("norm.weight"):
            return mx.ones(shapes[name], dtype=mx.bfloat16)
        key = mx.random.key(seed * 1_000_003 + index[name])
        return (std * mx.random.normal(shapes[name], key=key)).astype(mx.bfloat16)

    def write_shard(file: Path, names: list[str]) -> None:
        mx.save_safetensors(str(file), {name: tensor(name) for name in names}, metadata={"format": "pt"})

    sizes = {name: 2 * math.prod(shape) for name, shape in shapes.items()}
    write_safetensors_shards(path, sizes, 5 << 30, write_shard)
    if tokenizer is None:
        import mistral_common

        tokenizer = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(tokenizer, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}), encoding="utf-8")


def write_long_records(path: Path, n: int, seed: int = 0) -> None:
    """``n`` Dolly-schema records whose templated length falls between about 200 and 1,000 tokens."""
    rng = random.Random(seed)
    categories = ["open_qa", "closed_qa", "summarization", "brainstorming"]

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            total = rng.randint(150, 760)  # words; about 1.3 tokens each with the template's ~20
            context = rng.randint(0, total // 2)
            record = {"instruction": text(rng.randint(8, 20)), "context": text(context) if context else "",
                      "response": text(total - context), "category": categories[i % len(categories)]}
            f.write(json.dumps(record) + "\n")


def token_lengths(data_dir: Path) -> list[int]:
    from safetensors.numpy import load_file

    offsets = load_file(str(data_dir / "train.safetensors"))["offsets"]
    return [int(b - a) for a, b in zip(offsets[:-1], offsets[1:])]


def describe_lengths(lengths: list[int]) -> dict:
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"examples": len(s), "tokens": sum(s), "min": s[0], "p10": pick(0.1), "p50": pick(0.5),
            "mean": round(sum(s) / len(s), 1), "p90": pick(0.9), "max": s[-1]}


def write_mlx_lm_data(data_dir: Path, tokenizer_path: Path, out: Path) -> None:
    """Our prepared records as mlx-lm's ``{"text": ...}`` jsonl (train and valid): each example's token ids
    without BOS and EOS, decoded (mlx-lm adds both back when it tokenizes)."""
    import sentencepiece as spm
    from safetensors.numpy import load_file

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("validation", "valid")):
        tensors = load_file(str(data_dir / f"{split}.safetensors"))
        ids, offsets = tensors["input_ids"], tensors["offsets"]
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for a, b in zip(offsets[:-1], offsets[1:]):
                example = [int(t) for t in ids[a:b] if int(t) not in (1, 2)]
                f.write(json.dumps({"text": sp.decode(example)}) + "\n")


# ---------------------------------------------------------------- our commands

GEN_STATS = re.compile(r"prompt: (\d+) tokens, ([\d.]+) tokens/s \| generation: (\d+) tokens, ([\d.]+) tokens/s")


def _steady(speeds: list[float]) -> float | None:
    """The median of the logged speeds after the first (which holds compilation); None with fewer than two
    of them: one window alone is no steady rate (a two-step run on an H100 logged 13.6 million tokens/s for
    its second, before ``finetune.py`` timed its windows where each step is done: ``train/throughput.py``)."""
    return median(speeds[1:]) if len(speeds) >= 3 else None


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def our_train(model: Path, data: Path, out: Path, args, batching: str) -> dict:
    """finetune.py as the README runs it: ``batching`` "tokens" (``--max-batch-tokens``, the README's command)
    or "rows" (``--batch-size``, as mlx-lm batches)."""
    batch = (["--max-batch-tokens", str(args.max_batch_tokens)] if batching == "tokens"
             else ["--batch-size", str(args.batch_size)])
    cmd = [PY, str(SCRIPTS / "finetune.py"), "--model", str(model), "--data", str(data), "--out", str(out),
           *batch, "--grad-accum", str(args.grad_accum), "--learning-rate", "2e-4",
           "--warmup-ratio", "0.03", "--iters", str(args.steps), "--grad-checkpoint", "--log-every", "1",
           "--no-progress"] + (["--eval-batches", str(args.eval_batches)] if args.eval_batches else [])
    shutil.rmtree(out, ignore_errors=True)  # a new run each time: the first row watched is this run's
    result = run_timed(cmd, watch=out / "metrics.jsonl")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("tokens_per_sec") is not None]
    tokens = sum(r["tokens"] for r in train)
    steady = _steady([r["tokens_per_sec"] for r in train])
    lines = result["stdout"].splitlines()
    return {"command": shown(cmd), "batching": batching, "first_lines": lines[:2],
            "wall_s": result["wall_s"], "first_step_s": result["first_row_s"], "steps": len(train),
            "tokens": tokens, "steady_tokens_per_s": steady, "end_to_end_tokens_per_s": tokens / result["wall_s"],
            "peak_gb": max(r["peak_memory_gb"] for r in train)}


def our_generate(model: Path, adapter: Path | None, args) -> dict:
    cmd = [PY, str(SCRIPTS / "generate.py"), "--model", str(model), "--prompt", PROMPT,
           "--max-tokens", str(args.max_tokens)] + (["--adapter", str(adapter)] if adapter else [])
    result = run_timed(cmd)
    m = GEN_STATS.search(result["stderr"])
    return {"wall_s": result["wall_s"], "first_token_s": first_byte_after(result["chunks"], 0),
            "prompt_tokens": int(m.group(1)), "generated_tokens": int(m.group(3)),
            "decode_tokens_per_s": float(m.group(4))}


def warm_reference(args, work: Path) -> float:
    """The yardstick of a chat's third turn: ``gpu_generate.py --stacks ours`` (warm, compiled decoding without
    adapters, the same shapes), its decode tokens/s, in this run (tiny: a short prompt and reply)."""
    out = work / "warm_reference.json"
    size = ["--prompt-tokens", "16", "--max-tokens", "8", "--repeats", "1"] if args.preset == "tiny" else []
    run_timed([PY, str(ROOT / "benchmarks" / "gpu_generate.py"), "--preset", args.preset, "--stacks", "ours", *size,
               "--json", str(out)])
    (row,) = [r for r in json.loads(out.read_text())["rows"] if r["stack"] == "ours"]
    return row["decode_tokens_per_s"]


def our_chat(model: Path, adapter: Path, args) -> dict:
    """Three turns on standard input: the third reply's streamed decoding speed."""
    cmd = [PY, str(SCRIPTS / "generate.py"), "--model", str(model), "--adapter", str(adapter),
           "--max-tokens", str(args.chat_tokens)]
    result = run_timed(cmd, stdin_text="".join(t + "\n" for t in CHAT_TURNS))
    out = b"".join(c for _, c in result["chunks"])
    echo = f">>> {CHAT_TURNS[-1]}\n".encode()
    begin = out.index(echo) + len(echo)
    first = first_byte_after(result["chunks"], begin)
    last = result["chunks"][-1][0]  # the reply ends the output (then the totals go to standard error)
    m = GEN_STATS.search(result["stderr"])
    total = int(m.group(3))
    # every turn ran to --max-tokens when the totals say so; else the third reply's tokens are unknown
    full = total == len(CHAT_TURNS) * args.chat_tokens
    return {"wall_s": result["wall_s"], "turns": len(CHAT_TURNS), "generated_tokens": total,
            "turn3_full_length": full,
            "turn3_decode_tokens_per_s": (args.chat_tokens - 1) / (last - first) if full and last > first else None,
            "session_decode_tokens_per_s": float(m.group(4))}


# ---------------------------------------------------------------- mlx-lm's commands

LORA_REPORT = re.compile(r"^\s*(\d+)\s+(?:[\d.]+|nan|inf)\s*[▼▲]\s+([\d,]+)\s+([\d.]+)k", re.MULTILINE)


def mlx_lm_train(model: Path, data: Path, adapters: Path, args) -> dict:
    config = adapters.parent / f"{adapters.name}.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": LORA_RANK, "scale": LORA_ALPHA / LORA_RANK,
                                                      "dropout": 0.0}}))  # JSON is YAML
    iters = args.steps * args.grad_accum  # mlx-lm counts micro-batches
    cmd = [PY, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data), "-c", str(config),
           "--fine-tune-type", "lora", "--optimizer", "adamw", "--num-layers", "-1", "--batch-size", str(args.batch_size),
           "--grad-accumulation-steps", str(args.grad_accum), "--iters", str(iters), "--learning-rate", "2e-4",
           "--steps-per-report", str(args.grad_accum), "--grad-checkpoint", "--adapter-path", str(adapters),
           "--save-every", str(iters), "--val-batches", str(args.eval_batches or 16)]  # ours: 16 by default
    result = run_timed(cmd)
    reports = [(int(i), float(tps.replace(",", "")), float(k) * 1e3) for i, tps, k in LORA_REPORT.findall(result["stdout"])]
    if not reports:
        raise RuntimeError(f"no training report in mlx_lm lora's output:\n{result['stdout'][-2000:]}")
    # the first report's byte offset (NO_COLOR: the output holds no colour codes, so it matches the bytes read)
    offset = len(result["stdout"][:LORA_REPORT.search(result["stdout"]).start()].encode())
    steady = _steady([r[1] for r in reports])
    tokens = reports[-1][2]  # its running count, printed in thousands
    return {"command": shown(cmd), "wall_s": result["wall_s"], "first_step_s": first_byte_after(result["chunks"], offset),
            "steps": len(reports), "tokens": tokens, "steady_tokens_per_s": steady,
            "end_to_end_tokens_per_s": tokens / result["wall_s"], "peak_gb": None}


MLX_LM_STATS = re.compile(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec\s+Generation: (\d+) tokens, ([\d.]+) tokens-per-sec")


def mlx_lm_generate(model: Path, adapter: Path | None, args) -> dict:
    cmd = [PY, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", PROMPT, "--max-tokens",
           str(args.max_tokens), "--temp", "0.0"] + (["--adapter-path", str(adapter)] if adapter else [])
    result = run_timed(cmd)
    out = b"".join(c for _, c in result["chunks"])
    marker = b"=" * 10 + b"\n"
    m = MLX_LM_STATS.search(result["stdout"])
    return {"wall_s": result["wall_s"], "first_token_s": first_byte_after(result["chunks"], out.index(marker) + len(marker)),
            "prompt_tokens": int(m.group(1)), "generated_tokens": int(m.group(3)),
            "decode_tokens_per_s": float(m.group(4))}


# ---------------------------------------------------------------- the run

def shown(cmd: list[str]) -> str:
    """A command as the results record it: its arguments, the repository's paths relative to it."""
    return " ".join(arg.replace(f"{ROOT}{os.sep}", "") for arg in cmd[1:])


def ratio(a, b):
    return a / b if a and b else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (tiny: 3, else 30)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch: mlx-lm's, and ours with "
                   "--ours-batching rows (default 4; tiny: 1)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help=f"our token budget per batch, the README's (default {README_BATCH_TOKENS}; tiny: 256)")
    p.add_argument("--grad-accum", type=int, default=None, help="the README's 2 (tiny: 2)")
    p.add_argument("--ours-batching", default="tokens",
                   help="comma-separated: tokens (the README's --max-batch-tokens), rows (--batch-size, as mlx-lm)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per generate.py reply (tiny: 32, else 256)")
    p.add_argument("--chat-tokens", type=int, default=None, help="tokens per chat reply (tiny: 16, else 300)")
    p.add_argument("--long-records", type=int, default=None, help="generated long records (tiny: 100, else 400)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches of each evaluation (default: finetune's 16; tiny: 2)")
    p.add_argument("--stacks", default="ours,mlx-lm", help="comma-separated: ours, mlx-lm")
    p.add_argument("--datasets", default="sample,long", help="comma-separated: sample, long")
    p.add_argument("--tokenizer-model", help="the Mistral v1 tokenizer.model (default: mistral-common's copy)")
    p.add_argument("--no-generate", action="store_true", help="training only")
    p.add_argument("--reuse-models", action="store_true",
                   help="keep converted models already in --work (a run split over several calls)")
    p.add_argument("--work", help="folder for the models, data and runs (default: a temporary one, removed)")
    p.add_argument("--json")
    args = p.parse_args()
    tiny = args.preset == "tiny"
    # tiny: small enough that mlx_lm lora (about 80 tokens/s on two CPU cores) ends in a minute
    args.steps = args.steps or (3 if tiny else 30)
    args.batch_size = args.batch_size or (1 if tiny else 4)
    args.grad_accum = args.grad_accum or 2
    args.max_batch_tokens = args.max_batch_tokens or (256 if tiny else README_BATCH_TOKENS)
    args.ours_batching = [b for b in args.ours_batching.split(",") if b]
    if not set(args.ours_batching) <= {"tokens", "rows"}:
        p.error(f"--ours-batching: tokens and/or rows, got {args.ours_batching}")
    args.max_tokens = args.max_tokens or (32 if tiny else 256)
    args.chat_tokens = args.chat_tokens or (16 if tiny else 300)
    args.long_records = args.long_records or (100 if tiny else 400)
    args.eval_batches = args.eval_batches or (2 if tiny else None)
    stacks = [s for s in args.stacks.split(",") if s]
    cfg = {**PRESETS[args.preset], "vocab_size": 32000}  # the real tokenizer's vocabulary

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="user_path-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        payload = run(args, cfg, stacks, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, payload)


def run(args, cfg: dict, stacks: list[str], work: Path) -> dict:
    import mlx.core as mx

    gpu = mx.default_device().type == mx.gpu
    hf = work / "hf"
    start = time.perf_counter()
    if not (hf / "config.json").exists():
        write_hf_folder(cfg, hf, tokenizer=Path(args.tokenizer_model) if args.tokenizer_model else None)
    print(f"random {args.preset} Hugging Face folder ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']}) in {time.perf_counter() - start:.1f} s")
    long_src = work / "long_records.jsonl"
    write_long_records(long_src, args.long_records)

    payload = {"environment": environment(), "args": vars(args), "preset": cfg, "datasets": {}, "convert": {},
               "train": [], "generate": [], "chat": [], "notes": []}
    ours_model, peer_model = work / "ours-4bit", work / "mlx-lm-4bit"
    reuse = lambda folder: args.reuse_models and (folder / "config.json").exists()  # noqa: E731
    if ("ours" in stacks or "mlx-lm" in stacks) and not reuse(ours_model):  # our script prepares both's data
        r = run_timed([PY, str(SCRIPTS / "convert_weights.py"), "--hf-path", str(hf), "--mlx-path", str(ours_model),
                       "--overwrite"])
        payload["convert"]["ours"] = {"wall_s": r["wall_s"], "format": "4-bit per row"}
    if "mlx-lm" in stacks and not reuse(peer_model):
        shutil.rmtree(peer_model, ignore_errors=True)
        # the checkpoint's bfloat16 on a GPU; on the CPU float32, as our auto dtype (bfloat16 is many times
        # slower there: 7-12 tokens/s for the tiny preset)
        dtype = "bfloat16" if gpu else "float32"
        r = run_timed([PY, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(peer_model), "-q",
                       "--dtype", dtype])
        payload["convert"]["mlx-lm"] = {"wall_s": r["wall_s"], "format": f"4-bit, groups of 64, {dtype}"}

    for name, source in (("sample", SAMPLE), ("long", long_src)):
        if name not in args.datasets.split(","):
            continue
        data = work / f"data-{name}"
        r = run_timed([PY, str(SCRIPTS / "prepare_data.py"), "--dataset", str(source), "--tokenizer", str(ours_model),
                       "--out", str(data), "--no-progress"])
        lengths = describe_lengths(token_lengths(data))
        payload["datasets"][name] = {"source": str(source.relative_to(ROOT)) if source == SAMPLE else "generated",
                                     "prepare_wall_s": r["wall_s"], "train_token_lengths": lengths}
        print(f"data set {name}: {lengths}")
        if "ours" in stacks:
            for batching in args.ours_batching:  # the first one's adapters are used for generation
                suffix = "" if batching == args.ours_batching[0] else f"-{batching}"
                out = work / f"run-ours-{name}{suffix}"
                row = our_train(ours_model, data, out, args, batching)
                payload["train"].append({"stack": "ours", "dataset": name, **row})
                print(f"trained: ours ({batching}) on {name}: {_rate(row['steady_tokens_per_s'])} tokens/s steady, "
                      f"{row['end_to_end_tokens_per_s']:,.0f} end to end, peak {row['peak_gb']:.2f} GB", flush=True)
        if "mlx-lm" in stacks:
            peer_data = work / f"data-mlx-lm-{name}"
            write_mlx_lm_data(data, ours_model / "tokenizer.model", peer_data)
            row = mlx_lm_train(peer_model, peer_data, work / f"adapters-mlx-lm-{name}", args)
            payload["train"].append({"stack": "mlx-lm", "dataset": name, **row})
            print(f"trained: mlx-lm on {name}: {_rate(row['steady_tokens_per_s'])} tokens/s steady, "
                  f"{row['end_to_end_tokens_per_s']:,.0f} end to end", flush=True)

    # generation without adapters, and with the sample run's where its training ran (in this run, or in --work
    # before); each command twice: the first process compiles the kernels it has not met before (kept on
    # disk: MLX's own, and ours by kernels/cuda/kernel_cache.py), the second is what a user sees from then on
    trained = {"ours": work / "run-ours-sample", "mlx-lm": work / "adapters-mlx-lm-sample"}
    for stack in ([] if args.no_generate else stacks):
        for adapter in (None, trained[stack]) if trained[stack].exists() else (None,):
            if stack == "ours":
                gen = lambda: our_generate(ours_model, adapter, args)  # noqa: E731
            else:
                gen = lambda: mlx_lm_generate(peer_model, adapter, args)  # noqa: E731
            first = gen()
            row = gen()
            print(f"generated: {stack}{' with adapter' if adapter else ''}: wall {row['wall_s']:.2f} s, first token "
                  f"{row['first_token_s']:.2f} s, decode {row['decode_tokens_per_s']:.1f} tokens/s (first process: "
                  f"wall {first['wall_s']:.2f} s, first token {first['first_token_s']:.2f} s)", flush=True)
            payload["generate"].append({"stack": stack, "adapter": bool(adapter), **row,
                                        "first_process_wall_s": first["wall_s"],
                                        "first_process_first_token_s": first["first_token_s"]})
    if "ours" in stacks and not args.no_generate and trained["ours"].exists():  # twice too, the second reported
        first = our_chat(ours_model, trained["ours"], args)
        row = our_chat(ours_model, trained["ours"], args)
        print(f"chat: turn 3 {row['turn3_decode_tokens_per_s']} tokens/s, wall {row['wall_s']:.2f} s (first process: "
              f"turn 3 {first['turn3_decode_tokens_per_s']}, wall {first['wall_s']:.2f} s)", flush=True)
        warm = warm_reference(args, work)
        print(f"warm benchmark (gpu_generate.py --stacks ours, no adapters): {warm:.1f} tokens/s decoding", flush=True)
        payload["chat"].append({"stack": "ours", **row, "first_process_wall_s": first["wall_s"],
                                "first_process_turn3_decode_tokens_per_s": first["turn3_decode_tokens_per_s"],
                                "warm_benchmark_tokens_per_s": warm,
                                "turn3_vs_warm": ratio(row["turn3_decode_tokens_per_s"], warm)})
    if "mlx-lm" in stacks:
        payload["notes"].append("mlx-lm's chat (mlx_lm chat) is not run: it needs a chat template, which the Mistral "
                                "v1 tokenizer.model does not carry; mlx_lm lora prints no peak memory")

    report(payload)
    return payload


def report(payload: dict) -> None:
    print(f"\n{payload['environment'].get('device')} {payload['environment'].get('device_name', '')}")
    for name, info in payload["datasets"].items():
        print(f"{name}: {info['train_token_lengths']}")
    train = payload["train"]
    for row in train:
        peer = next((r for r in train if r["stack"] == "mlx-lm" and r["dataset"] == row["dataset"]), None)
        row["steady_vs_mlx_lm"] = ratio(row["steady_tokens_per_s"], peer and peer["steady_tokens_per_s"])
        row["end_to_end_vs_mlx_lm"] = ratio(row["end_to_end_tokens_per_s"], peer and peer["end_to_end_tokens_per_s"])
    a = payload["args"]
    print(f"\ntraining (accumulation {a['grad_accum']}, checkpointing; ours: tokens = the README's --max-batch-tokens "
          f"{a['max_batch_tokens']}, rows = --batch-size {a['batch_size']}; mlx-lm: --batch-size {a['batch_size']})")
    for row in train:
        row["label"] = row["stack"] + (f" ({row['batching']})" if "batching" in row else "")
    print_table(train, [("dataset", "data", ""), ("label", "stack", ""), ("steps", "steps", ""),
                        ("steady_tokens_per_s", "steady tok/s", "{:,.0f}"),
                        ("end_to_end_tokens_per_s", "end-to-end tok/s", "{:,.0f}"),
                        ("steady_vs_mlx_lm", "steady vs mlx-lm", "{:.2f}x"),
                        ("end_to_end_vs_mlx_lm", "e2e vs mlx-lm", "{:.2f}x"),
                        ("first_step_s", "first step s", "{:.2f}"), ("wall_s", "wall s", "{:.1f}"),
                        ("peak_gb", "peak GB", "{:.2f}")])
    gen = payload["generate"]
    for row in gen:
        peer = next((r for r in gen if r["stack"] == "mlx-lm" and r["adapter"] == row["adapter"]), None)
        row["wall_vs_mlx_lm"] = ratio(peer and peer["wall_s"], row["wall_s"])  # > 1: ours finishes sooner
        row["decode_vs_mlx_lm"] = ratio(row["decode_tokens_per_s"], peer and peer["decode_tokens_per_s"])
    print("\ngeneration (fresh process, one prompt; the second process of each command)")
    print_table(gen, [("stack", "stack", ""), ("adapter", "adapter", ""), ("generated_tokens", "tokens", ""),
                      ("first_token_s", "first token s", "{:.2f}"), ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
                      ("first_process_first_token_s", "1st process: first token s", "{:.2f}"),
                      ("wall_s", "wall s", "{:.2f}"), ("wall_vs_mlx_lm", "mlx-lm wall / ours", "{:.2f}x"),
                      ("decode_vs_mlx_lm", "decode vs mlx-lm", "{:.2f}x")])
    if payload["chat"]:
        print("\nchat with adapters (three turns on standard input)")
        print_table(payload["chat"], [("stack", "stack", ""), ("generated_tokens", "tokens", ""),
                                      ("turn3_decode_tokens_per_s", "turn 3 decode tok/s", "{:.1f}"),
                                      ("session_decode_tokens_per_s", "session decode tok/s", "{:.1f}"),
                                      ("wall_s", "wall s", "{:.2f}"),
                                      ("first_process_turn3_decode_tokens_per_s", "1st process: turn 3 tok/s",
                                       "{:.1f}"), ("first_process_wall_s", "1st process: wall s", "{:.2f}"),
                                      ("warm_benchmark_tokens_per_s", "warm benchmark tok/s", "{:.1f}"),
                                      ("turn3_vs_warm", "turn 3 / warm", "{:.0%}")])
    for note in payload["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
