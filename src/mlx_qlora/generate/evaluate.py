"""Evaluate the base model and the tuned model (base + adapters) on a prepared split, side by side.

For each example of the split the prompt is everything before its last run of learned tokens (BOS and the
formatted prompt; for a conversation, every turn before the last assistant turn) and the reference is that
run up to its EOS (``split_example``). Both models answer every prompt
greedily (batched, left-padded); the answers are scored against the references with ROUGE-1/2/L, exact
match and mean length (``metrics.py``). Validation perplexity is teacher-forced: ``exp`` of the mean
cross-entropy over the learned tokens (response and EOS), as in training. Scores are given per category
and overall.

Outputs in ``out``: ``generations.jsonl`` (one line per example), ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..config import EvalConfig
from ..data.constants import CROSS_ENTROPY_IGNORE_INDEX
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text
from ..outputs import EVALUATION, Output, as_output
from .generator import GenerationResult, GenerationStats, generate_batch
from .metrics import ROUGE_TYPES, mean, perplexity, text_scores

METRIC_LABELS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
                 ("exact_match", "exact match"), ("mean_length", "mean length (tokens)"),
                 ("perplexity", "perplexity"))


@dataclass
class EvalExample:
    """One example of a prepared split, cut into what the model reads and what it should write."""

    index: int  # position in the split
    record_index: Optional[int]  # position in the source data
    category: str
    input_ids: np.ndarray  # (L,) the whole example
    labels: np.ndarray  # (L,)
    prompt_ids: list[int]  # leading tokens with label -100
    reference_ids: list[int]  # learned tokens without the final EOS


def split_example(input_ids: np.ndarray, labels: np.ndarray, eos_id: Optional[int]) -> tuple[list[int], list[int]]:
    """``(prompt_ids, reference_ids)`` of one example: everything before its last run of learned tokens, and
    that run up to (not including) its first EOS. For an instruction the run is the response; for a
    conversation, the last assistant turn, with the earlier turns in the prompt."""
    learned = labels != CROSS_ENTROPY_IGNORE_INDEX
    if not learned.any():
        return [int(t) for t in input_ids], []
    end = int(np.flatnonzero(learned)[-1]) + 1
    gaps = np.flatnonzero(~learned[:end])
    start = int(gaps[-1]) + 1 if len(gaps) else 0
    reference = [int(t) for t in input_ids[start:end]]
    if eos_id is not None and eos_id in reference:
        reference = reference[: reference.index(eos_id)]
    return [int(t) for t in input_ids[:start]], reference


def load_examples(data_dir: Union[str, Path], split: str = "validation", max_examples: Optional[int] = None,
                  eos_id: Optional[int] = None) -> tuple[list[EvalExample], dict]:
    """The first ``max_examples`` examples of ``split`` (all when None) and the directory's meta."""
    from ..data.dataset import PreparedDataset

    if max_examples is not None and max_examples < 1:
        raise UserError(f"max_examples must be >= 1 (or None: the whole split), got {max_examples}")
    data = PreparedDataset(data_dir, split)
    names = data.category_names
    n = len(data) if max_examples is None else min(len(data), max_examples)
    if n == 0:
        raise UserError(f"{data_dir}: the {split!r} split has no examples")
    examples = []
    for i in range(n):
        item = data[i]
        prompt, reference = split_example(item["input_ids"], item["labels"], eos_id)
        if not prompt:
            raise UserError(f"{data_dir}/{split}.safetensors: example {i} has no prompt tokens (label -100)")
        category = names[item["category"]] if item["category"] < len(names) else str(item["category"])
        record = None if data.record_index is None else int(data.record_index[i])
        examples.append(EvalExample(i, record, category, item["input_ids"], item["labels"], prompt, reference))
    return examples, data.meta


def generate_all(model, tokenizer, examples: Sequence[EvalExample], max_tokens: int, batch_size: int,
                 desc: str = "generating", progress: bool = True) -> tuple[list[GenerationResult], GenerationStats]:
    """Greedy answers to every prompt, in batches of similar prompt lengths; results in example order."""
    from tqdm import tqdm

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    results: list[Optional[GenerationResult]] = [None] * len(examples)
    totals = GenerationStats()
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        out = generate_batch(model, tokenizer, [examples[i].prompt_ids for i in batch], max_tokens=max_tokens)
        totals.add(out[0].stats)
        for i, result in zip(batch, out):
            results[i] = result
    return results, totals


def loss_sums(model, examples: Sequence[EvalExample], batch_size: int, desc: str = "perplexity",
              progress: bool = True, chunk: int = 1024) -> list[tuple[float, int]]:
    """Per example ``(sum of cross-entropy, learned tokens)`` with teacher forcing (right padding).

    Only the positions that predict a learned token go through the language-model head, ``chunk`` at a time.
    """
    from tqdm import tqdm

    out: list[Optional[tuple[float, int]]] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        L = max(len(examples[i].input_ids) for i in batch)
        ids = np.zeros((len(batch), L), dtype=np.int32)
        targets = np.full((len(batch), L), CROSS_ENTROPY_IGNORE_INDEX, dtype=np.int32)
        for row, i in enumerate(batch):
            n = len(examples[i].input_ids)
            ids[row, :n] = examples[i].input_ids
            targets[row, : n - 1] = examples[i].labels[1:]  # position t predicts token t + 1
        rows, cols = np.nonzero(targets != CROSS_ENTROPY_IGNORE_INDEX)
        hidden = model.hidden_states(mx.array(ids))  # (B, L, D); right padding never reaches earlier tokens
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * L, D)
        positions = rows * L + cols
        losses = []
        for start in range(0, len(positions), chunk):
            take = mx.array(positions[start : start + chunk])
            logits = model.logits_from_hidden(flat[take]).astype(mx.float32)  # (n, V)
            wanted = mx.array(targets[rows[start : start + chunk], cols[start : start + chunk]])
            target_logits = mx.take_along_axis(logits, wanted[:, None], axis=-1)[:, 0]
            losses.append(mx.logsumexp(logits, axis=-1) - target_logits)  # (n,)
        token_losses = np.array(mx.concatenate(losses)) if losses else np.zeros(0, np.float32)
        sums = np.zeros(len(batch), dtype=np.float64)
        np.add.at(sums, rows, token_losses.astype(np.float64))
        counts = np.bincount(rows, minlength=len(batch))
        for row, i in enumerate(batch):
            out[i] = (float(sums[row]), int(counts[row]))
    return out


def score(examples: Sequence[EvalExample], predictions: Sequence[str], references: Sequence[str],
          lengths: Sequence[int], sums: Sequence[tuple[float, int]]) -> dict:
    """Overall and per-category scores of one model: ``{"overall": {...}, "categories": {name: {...}}}``."""

    def group(indices: list[int]) -> dict:
        result = text_scores([predictions[i] for i in indices], [references[i] for i in indices],
                             [lengths[i] for i in indices])
        result["perplexity"] = perplexity(sum(sums[i][0] for i in indices), sum(sums[i][1] for i in indices))
        result["examples"] = len(indices)
        return result

    categories: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        categories.setdefault(example.category, []).append(i)
    return {"overall": group(list(range(len(examples)))),
            "categories": {name: group(idx) for name, idx in sorted(categories.items())}}


def evaluate_model(model, tokenizer, examples: Sequence[EvalExample], max_tokens: int, batch_size: int,
                   name: str, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Generations, scores and statistics of one model on ``examples``."""
    start = time.perf_counter()
    results, stats = generate_all(model, tokenizer, examples, max_tokens, batch_size, f"{name}: generating", progress)
    sums = loss_sums(model, examples, batch_size, f"{name}: perplexity", progress)
    predictions = [r.text.strip() for r in results]
    references = [tokenizer.decode(e.reference_ids).strip() for e in examples]
    scores = score(examples, predictions, references, [len(r.tokens) for r in results], sums)
    log(f"{name}: {len(examples)} examples in {time.perf_counter() - start:.1f}s ({stats.summary()})")
    return {"results": results, "predictions": predictions, "scores": scores, "stats": stats}


def _fmt(key: str, value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if key in ROUGE_TYPES or key == "exact_match":
        return f"{value:.4f}"
    return f"{value:.2f}"


def markdown_table(scores: dict[str, dict], reference_length: float, title: str = "overall") -> str:
    """A Markdown table: one row per metric, one column per model (and the tuned - base change)."""
    models = list(scores)
    header = ["metric", *models] + (["change"] if len(models) == 2 else [])
    rows = []
    for key, label in METRIC_LABELS:
        values = [scores[m][key] for m in models]
        row = [label, *[_fmt(key, v) for v in values]]
        if len(models) == 2:
            digits = 4 if key in ROUGE_TYPES or key == "exact_match" else 2
            row.append(f"{values[1] - values[0]:+.{digits}f}")
        rows.append(row)
    rows.append(["reference length (tokens)", f"{reference_length:.2f}", *([""] * (len(header) - 2))])
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return f"**{title}**\n\n" + "\n".join(lines) + "\n"


def category_table(per_model: dict[str, dict]) -> str:
    """Per category: examples, then ROUGE-L, exact match and perplexity of each model."""
    models = list(per_model)
    names = sorted(next(iter(per_model.values()))["categories"])
    header = ["category", "examples"]
    for key in ("rougeL", "exact_match", "perplexity"):
        header += [f"{dict(METRIC_LABELS)[key]} {m}" for m in models]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for name in names:
        row = [name, str(per_model[models[0]]["categories"][name]["examples"])]
        for key in ("rougeL", "exact_match", "perplexity"):
            row += [_fmt(key, per_model[m]["categories"][name][key]) for m in models]
        lines.append(f"| {' | '.join(row)} |")
    return "**per category**\n\n" + "\n".join(lines) + "\n"


def evaluate(model_path: Union[str, Path], data_dir: Union[str, Path], out: Union[str, Path, Output],
             adapter_path: Optional[Union[str, Path]] = None, split: str = EvalConfig.split,
             max_examples: Optional[int] = EvalConfig.max_examples, max_tokens: int = EvalConfig.max_tokens,
             batch_size: int = EvalConfig.batch_size,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Evaluate the base model (and base + adapters when ``adapter_path`` is given) and write the outputs.

    Returns the content of ``results.json``. ``out`` is claimed before anything is loaded
    (``outputs.claim_output``): an evaluation folder of ours there is replaced, anything else refused; the
    three files appear together (one folder renamed into place).
    """
    from ..data.dataset import check_tokenizer
    from .loading import attach_adapters, load_for_inference

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"max_examples must be >= 1 (or not given: the whole split), got {max_examples}")
    output = as_output(out, EVALUATION, inputs=(model_path, data_dir, adapter_path))
    model, tokenizer, _ = load_for_inference(model_path)
    examples, meta = load_examples(data_dir, split, max_examples, tokenizer.eos_id)
    check_tokenizer(meta, tokenizer)
    log(f"{len(examples)} examples of {data_dir} ({split}), template {meta.get('template')!r}")

    runs = {"base": evaluate_model(model, tokenizer, examples, max_tokens, batch_size, "base", progress, log)}
    adapter_info = None
    if adapter_path is not None:
        adapter_info = attach_adapters(model, adapter_path)
        if adapter_info.note:
            log(adapter_info.note)
        runs["tuned"] = evaluate_model(model, tokenizer, examples, max_tokens, batch_size, "tuned", progress, log)

    references = [tokenizer.decode(e.reference_ids).strip() for e in examples]
    reference_length = mean([float(len(e.reference_ids)) for e in examples])
    results = {
        "model": str(model_path),
        "adapter": None if adapter_info is None else str(adapter_info.path),
        "data": str(data_dir),
        "split": split,
        "examples": len(examples),
        "max_tokens": max_tokens,
        "decoding": "greedy",
        "reference_mean_length": reference_length,
        "overall": {name: run["scores"]["overall"] for name, run in runs.items()},
        "categories": {
            category: {name: run["scores"]["categories"][category] for name, run in runs.items()}
            for category in runs["base"]["scores"]["categories"]
        },
        "speed": {name: {"prompt_tokens_per_s": run["stats"].prompt_tps,
                         "generation_tokens_per_s": run["stats"].generation_tps} for name, run in runs.items()},
    }
    lines = []
    for i, example in enumerate(examples):
        record = {"index": example.index, "record_index": example.record_index, "category": example.category,
                  "prompt": tokenizer.decode(example.prompt_ids), "reference": references[i]}
        for name, run in runs.items():
            record[name] = run["predictions"][i]
            record[f"{name}_tokens"] = len(run["results"][i].tokens)
            record[f"{name}_finish"] = run["results"][i].finish_reason
        lines.append(json.dumps(record, ensure_ascii=False))
    markdown = (f"# Evaluation on {Path(data_dir).name} ({split}, {len(examples)} examples, greedy, "
                f"at most {max_tokens} new tokens)\n\n"
                + markdown_table(results["overall"], reference_length) + "\n"
                + category_table({name: run["scores"] for name, run in runs.items()}))
    with output.atomic_dir() as tmp:
        atomic_write_text(tmp / "generations.jsonl", "".join(line + "\n" for line in lines))
        atomic_write_json(tmp / "results.json", results)
        atomic_write_text(tmp / "results.md", markdown)
    results["markdown"] = markdown
    return results
