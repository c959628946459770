"""Records -> token ids with label masks, truncation, a seeded stratified split, and the prepared directory.

The rule at the prompt/response boundary
----------------------------------------
An example's ids are ``[BOS] + tokenize(prompt + lead + response) + [EOS]``: the formatted text is tokenized
in one go, so the ids are exactly what the tokenizer gives for the whole text, even where sentencepiece
merges characters across the boundary. The masked prompt is the longest common prefix of
``tokenize(prompt)`` and ``tokenize(prompt + lead + response)``: precisely the tokens a model is given when
the prompt is tokenized alone at generation time. BOS and those tokens get label ``-100``; every later
token (a token merged across the boundary included) and EOS are learned. With the shipped templates the
prompt ends on a token boundary (a newline, or ``]`` before a space), so the masked prefix is the whole
``tokenize(prompt)``.

Labels are aligned with ``input_ids`` (``labels[i]`` is ``input_ids[i]`` or ``-100``); the loss shifts by one.

Truncation to ``max_seq_len``
-----------------------------
1. The context is shortened first, at a token boundary from its end, and the example is tokenized again
   (the ids stay those of the whole formatted text); a context shortened to nothing is left out together
   with its heading.
2. If that is not enough, the response is cut at ``max_seq_len`` tokens, without EOS (the model is not
   taught to stop mid-answer), but only when at least ``min_response_tokens`` response tokens remain.
3. Otherwise the example is dropped. The instruction is never cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..config import DataConfig, SourceConfig
from ..errors import UserError
from ..io import atomic_write_json
from ..outputs import PREPARED_DATA, Output, as_output
from .constants import CROSS_ENTROPY_IGNORE_INDEX
from .sources import ColumnMap, LoadResult, Record, load_records
from .chat_template import CHAT_TEMPLATE_NAME, check_template, prompt_for, response_for, turns_for
from .samples import tokenize_samples
from .tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
NO_TEMPLATE = "none"  # completions and text: raw text, no template
SPLITS = ("train", "validation", "test")
_ENCODE_CHUNK = 2048  # texts per call into the tokenizer (one progress-bar step)


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` (same length, ``-100`` where not learned)."""

    input_ids: list[int]
    labels: list[int]
    truncated_context: bool = False
    truncated_response: bool = False
    context_chars: Optional[int] = None  # characters of the context kept, when it was shortened

    def __len__(self) -> int:
        return len(self.input_ids)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading positions where ``a`` and ``b`` agree."""
    n = len(a)
    if len(b) >= n and list(b[:n]) == list(a):
        return n
    n = min(n, len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_prompt_response(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: ids of ``prompt + response`` tokenized in one go (no BOS/EOS), and how many
    leading ids belong to the prompt (the common prefix with ``tokenize(prompt)``; see the module docstring)."""
    ids = tokenizer.encode(prompt + response)
    return ids, common_prefix_length(tokenizer.encode(prompt), ids)


def _assemble(tokenizer: Tokenizer, ids: list[int], n_prompt: int, add_eos: bool) -> tuple[list[int], list[int]]:
    """BOS + ids (+ EOS) and labels masking BOS and the first ``n_prompt`` ids."""
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if add_eos else []
    input_ids = head + ids + tail
    labels = [CROSS_ENTROPY_IGNORE_INDEX] * (len(head) + n_prompt) + ids[n_prompt:] + tail
    return input_ids, labels


def _shorten(tokenizer: Tokenizer, context: str, excess: int) -> str:
    """``context`` cut at a token boundary from its end, by about ``excess`` tokens (at least one character)."""
    ids, ends = tokenizer.token_ends(context)
    keep = len(ids) - excess
    if keep <= 0:
        return ""
    shorter = context[: ends[keep - 1]]
    return shorter if len(shorter) < len(context) else context[:-1]


def fit_example(
    tokenizer: Tokenizer,
    template_name: str,
    record: Record,
    max_seq_len: int,
    min_response_tokens: int,
    first: Optional[tuple[list[int], int]] = None,
) -> Optional[Example]:
    """Tokenize ``record`` and truncate it to ``max_seq_len`` by the module's rules; ``None`` if dropped.

    ``first`` is the already computed ``tokenize_prompt_response`` of the untruncated record, if any.
    """
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} has no EOS token; it cannot mark where a response ends")
    response = response_for(template_name, record.response)
    n_bos = 1 if tokenizer.bos_id is not None else 0
    context = record.context
    while True:
        if first is None:
            prompt = prompt_for(tokenizer, template_name, record.instruction, context)
            first = tokenize_prompt_response(tokenizer, prompt, response)
        ids, n_prompt = first
        total = n_bos + len(ids) + 1
        if total <= max_seq_len:
            input_ids, labels = _assemble(tokenizer, ids, n_prompt, add_eos=True)
            shortened = context != record.context
            return Example(input_ids, labels, shortened, False, len(context) if shortened else None)
        if not context.strip():
            break
        context = _shorten(tokenizer, context, total - max_seq_len)
        first = None
    room = max_seq_len - n_bos - n_prompt  # response tokens that fit, without EOS
    if room < min_response_tokens:
        return None
    input_ids, labels = _assemble(tokenizer, ids[: n_prompt + room], n_prompt, add_eos=False)
    shortened = context != record.context
    return Example(input_ids, labels, shortened, True, len(context) if shortened else None)


def tokenize_example(
    tokenizer: Tokenizer,
    template_name: str,
    instruction: str,
    context: str,
    response: str,
    max_seq_len: Optional[int] = None,
    min_response_tokens: int = 16,
) -> Optional[Example]:
    """One example: ``[BOS] + prompt + response + [EOS]`` with the prompt's labels masked.

    Without ``max_seq_len`` nothing is truncated. Returns ``None`` when the example cannot fit.
    """
    check_template(tokenizer, template_name)
    record = Record(instruction, context, response)
    return fit_example(tokenizer, template_name, record, max_seq_len or 1 << 62, min_response_tokens)


def encode_chat(tokenizer: Tokenizer, template_name: str, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Ids and labels of a multi-turn conversation (see ``templates.chat_turns``; for the template ``"chat"``,
    the tokenizer's own chat template, ``chat_template.template_turns``).

    BOS once, then each turn's ``prompt + response`` tokenized on its own followed by EOS; a final user
    message gives its prompt alone (for generation). Prompts are masked, responses and their EOS learned.
    """
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {tokenizer.path} has no EOS token; it cannot mark where a response ends")
    input_ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    labels = [CROSS_ENTROPY_IGNORE_INDEX] * len(input_ids)
    for prompt, response in turns_for(tokenizer, template_name, messages):
        if response is None:
            ids = tokenizer.encode(prompt)
            input_ids += ids
            labels += [CROSS_ENTROPY_IGNORE_INDEX] * len(ids)
            continue
        ids, n_prompt = tokenize_prompt_response(tokenizer, prompt, response)
        input_ids += ids + [tokenizer.eos_id]
        labels += [CROSS_ENTROPY_IGNORE_INDEX] * n_prompt + ids[n_prompt:] + [tokenizer.eos_id]
    return input_ids, labels


# --- the seeded, stratified split -------------------------------------------------------------------------


def _stable_keys(seed: int, category: str, indices: np.ndarray) -> np.ndarray:
    """A seeded pseudo-random uint64 per index from blake2b: the same on every machine and Python."""
    keys = np.empty(len(indices), dtype=np.uint64)
    prefix = f"{seed}\x00{category}\x00".encode("utf-8")
    for j, index in enumerate(indices):
        digest = hashlib.blake2b(prefix + str(int(index)).encode("ascii"), digest_size=8).digest()
        keys[j] = int.from_bytes(digest, "little")
    return keys


def _allocate(sizes: dict[str, int], fraction: float) -> dict[str, int]:
    """Per-category counts summing to ``round(fraction * total)``, proportional by largest remainder."""
    total = sum(sizes.values())
    target = int(round(fraction * total))
    if fraction > 0 and target == 0 and total >= 2:
        target = 1
    quotas = {c: fraction * n for c, n in sizes.items()}
    counts = {c: int(np.floor(q)) for c, q in quotas.items()}
    order = sorted(sizes, key=lambda c: (-(quotas[c] - counts[c]), -sizes[c], c))
    for c in order[: max(0, target - sum(counts.values()))]:
        counts[c] += 1
    return counts


def split_indices(
    categories: Sequence[str], val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Assign records to ``train`` / ``validation`` / ``test``, stratified by category.

    Within each category records are ordered by a seeded blake2b key of their index; the first ones go to
    test, the next to validation, the rest to train. Validation gets ``round(val_fraction * n)`` records in
    all, shared among categories in proportion to their sizes (largest remainder), and likewise test.
    Returns sorted int64 index arrays; identical for the same inputs on any machine.
    """
    categories = list(categories)
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        by_category.setdefault(category, []).append(index)
    sizes = {c: len(v) for c, v in by_category.items()}
    n_test = _allocate(sizes, test_fraction)
    n_val = _allocate(sizes, val_fraction)
    n_val = {c: min(n_val[c], sizes[c] - n_test[c]) for c in sizes}  # a category of one or two records
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for category in sorted(by_category):
        indices = np.asarray(by_category[category], dtype=np.int64)
        ordered = indices[np.argsort(_stable_keys(seed, category, indices), kind="stable")]
        a, b = n_test[category], n_test[category] + n_val[category]
        parts["test"].append(ordered[:a])
        parts["validation"].append(ordered[a:b])
        parts["train"].append(ordered[b:])
    return {name: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for name, p in parts.items()}


# --- preparing a whole directory ---------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)


def tokenize_records(
    tokenizer: Tokenizer,
    template_name: str,
    records: Sequence[Record],
    max_seq_len: int,
    min_response_tokens: int,
    progress: bool = False,
) -> list[Optional[Example]]:
    """``fit_example`` for every record (``None`` for a dropped one), using the tokenizer's batch encoder.

    Gives exactly the same examples as calling ``fit_example`` one by one.
    """
    check_template(tokenizer, template_name)
    out: list[Optional[Example]] = []
    n_bos = 1 if tokenizer.bos_id is not None else 0
    with _progress(len(records), "tokenizing", progress) as bar:
        for start in range(0, len(records), _ENCODE_CHUNK):
            chunk = records[start : start + _ENCODE_CHUNK]
            prompts = [prompt_for(tokenizer, template_name, r.instruction, r.context) for r in chunk]
            responses = [response_for(template_name, r.response) for r in chunk]
            full_ids = tokenizer.encode_batch([p + r for p, r in zip(prompts, responses)])
            prompt_ids = tokenizer.encode_batch(prompts)
            for record, ids, prompt in zip(chunk, full_ids, prompt_ids):
                ids = list(ids)
                n_prompt = common_prefix_length(prompt, ids)
                if n_bos + len(ids) + 1 <= max_seq_len:
                    input_ids, labels = _assemble(tokenizer, ids, n_prompt, add_eos=True)
                    out.append(Example(input_ids, labels))
                else:
                    first = (ids, n_prompt)
                    out.append(fit_example(tokenizer, template_name, record, max_seq_len, min_response_tokens, first))
            bar.update(len(chunk))
    return out


def pack_examples(
    examples: Sequence[Example], category_codes: Sequence[int], record_index: Sequence[int]
) -> dict[str, np.ndarray]:
    """Flat arrays of one split: ``input_ids``, ``labels`` (int32, total tokens), ``offsets`` (n + 1),
    ``category`` and ``record_index`` (int32, n). Example ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``."""
    lengths = np.array([len(e) for e in examples], dtype=np.int64)
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise UserError(f"a split holds {offsets[-1]} tokens; at most 2**31 - 1 fit in the prepared format")
    input_ids = np.empty(int(offsets[-1]), dtype=np.int32)
    labels = np.empty(int(offsets[-1]), dtype=np.int32)
    for example, start, end in zip(examples, offsets[:-1], offsets[1:]):
        input_ids[start:end] = example.input_ids
        labels[start:end] = example.labels
    return {
        "input_ids": input_ids,
        "labels": labels,
        "offsets": offsets.astype(np.int32),
        "category": np.asarray(category_codes, dtype=np.int32),
        "record_index": np.asarray(record_index, dtype=np.int32),
    }


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    """Mean, percentiles (50, 90, 95, 99) and max of token lengths (zeros when empty)."""
    if len(lengths) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "max": 0}
    p50, p90, p95, p99 = np.percentile(lengths, [50, 90, 95, 99])
    return {
        "mean": round(float(lengths.mean()), 2),
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "max": int(lengths.max()),
    }


def _split_meta(arrays: dict[str, np.ndarray], category_names: list[str]) -> dict:
    lengths = np.diff(arrays["offsets"].astype(np.int64))
    learned = int((arrays["labels"] != CROSS_ENTROPY_IGNORE_INDEX).sum())
    tokens = int(len(arrays["input_ids"]))
    counts = np.bincount(arrays["category"], minlength=len(category_names))
    return {
        "examples": int(len(lengths)),
        "tokens": tokens,
        "learned_tokens": learned,
        "learned_fraction": round(learned / tokens, 6) if tokens else 0.0,
        "token_lengths": length_summary(lengths),
        "categories": {name: int(n) for name, n in zip(category_names, counts)},
    }


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the usual permissions (temporary names are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def resolve_template(template: str, data_format: str, tokenizer: Tokenizer) -> str:
    """The template a data set is prepared with: ``"auto"`` is the tokenizer's chat template (``"chat"``) for
    conversations and ``"dolly"`` for instructions; completions and text take none (``"none"``)."""
    if data_format in ("completion", "text"):
        if template not in ("auto", NO_TEMPLATE):
            raise UserError(f"--template {template}: {data_format} data is tokenized as raw text, with no template")
        return NO_TEMPLATE
    if template == NO_TEMPLATE:
        raise UserError(f"template 'none' is only for completion and text data, not {data_format} records")
    if template == "auto":
        if data_format == "instruction":
            template = "dolly"
        elif getattr(tokenizer, "chat_template", None):
            template = CHAT_TEMPLATE_NAME
        else:
            raise UserError(f"conversations need a chat template, and the tokenizer {tokenizer.path} has none; "
                            "choose a named template with --template (dolly, alpaca, mistral)")
    check_template(tokenizer, template)
    return template


def prepare_dataset(
    source: Union[str, os.PathLike],
    tokenizer: Union[Tokenizer, str, os.PathLike],
    out_dir: Union[str, os.PathLike, Output],
    config: Optional[DataConfig] = None,
    columns: Optional[ColumnMap] = None,
    skip_bad: bool = False,
    source_split: str = SourceConfig.split,
    progress: bool = False,
    loaded: Optional[LoadResult] = None,
) -> dict:
    """Read ``source``, tokenize, split and write the prepared directory ``out_dir``; returns its meta.

    ``out_dir`` gets ``train.safetensors``, ``validation.safetensors`` (and ``test.safetensors`` when
    ``config.test_fraction > 0``; see ``pack_examples`` for the arrays), ``validation.jsonl`` / ``test.jsonl``
    (the untouched records of those splits, for evaluation) and ``meta.json``. It is written atomically: on
    any error nothing changes. The split is made on the valid records before tokenization, so it does not
    depend on the tokenizer or ``max_seq_len``; dropped examples then leave their split.
    ``loaded`` reuses an already read ``LoadResult`` of ``source``. ``out_dir`` is claimed first
    (``outputs.claim_output``): an existing prepared data folder of ours is replaced, anything else refused;
    a caller that claimed it already passes the ``Output``.
    """
    from safetensors.numpy import save_file

    output = as_output(out_dir, PREPARED_DATA,
                       inputs=(source, tokenizer.path if isinstance(tokenizer, Tokenizer) else tokenizer))
    config = config or DataConfig()
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if loaded is None:
        loaded = load_records(source, columns=columns, skip_bad=skip_bad, split=source_split, fmt=config.format)
    config = dataclasses.replace(config, template=resolve_template(config.template, loaded.format, tokenizer))
    records = loaded.records
    category_names = sorted({r.category for r in records})
    code_of = {name: code for code, name in enumerate(category_names)}
    split = split_indices([r.category for r in records], config.val_fraction, config.test_fraction, config.seed)
    skipped_late: list[str] = []
    if loaded.format == "instruction":
        examples = tokenize_records(
            tokenizer, config.template, records, config.max_seq_len, config.min_response_tokens, progress=progress
        )
    else:
        where = loaded.where or [f"{loaded.source}, record {i + 1}" for i in range(len(records))]
        examples, skipped_late = tokenize_samples(
            tokenizer, config.template, records, where, config.learn, config.max_seq_len,
            config.min_response_tokens, skip_bad=skip_bad, progress=progress)
    skipped_all = list(loaded.skipped) + skipped_late
    kept = [e for e in examples if e is not None]
    if not kept:
        if skipped_late and len(skipped_late) == len(records):
            raise UserError(f"{loaded.source}: none of the {len(records)} records is usable; first problem: "
                            f"{skipped_late[0]}")
        raise UserError(f"{loaded.source}: every example is longer than max_seq_len={config.max_seq_len}")
    split_names = [s for s in SPLITS if s != "test" or config.test_fraction > 0]
    meta_splits, arrays_by_split = {}, {}
    for name in split_names:
        indices = [int(i) for i in split[name] if examples[i] is not None]
        arrays = pack_examples([examples[i] for i in indices], [code_of[records[i].category] for i in indices], indices)
        arrays_by_split[name] = arrays
        meta_splits[name] = _split_meta(arrays, category_names)
    all_lengths = np.array([len(e) for e in kept], dtype=np.int64)
    all_tokens = int(all_lengths.sum())
    all_learned = sum(s["learned_tokens"] for s in meta_splits.values())
    meta = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "source_split": source_split,
        "columns": loaded.columns,
        "template": config.template,
        "format": loaded.format,
        "learn": config.learn,
        "tokenizer": {
            "file": tokenizer.path.name,
            "kind": tokenizer.kind,
            "checksum": tokenizer.checksum,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        },
        "max_seq_len": config.max_seq_len,
        "config": config.to_dict(),
        "label_ignore_index": CROSS_ENTROPY_IGNORE_INDEX,
        "counts": {
            "rows": loaded.rows,
            "skipped_bad": len(skipped_all),
            "records": len(records) - len(skipped_late),
            "truncated": sum(1 for e in kept if e.truncated_context or e.truncated_response),
            "truncated_context": sum(1 for e in kept if e.truncated_context),
            "truncated_response": sum(1 for e in kept if e.truncated_response),
            "truncated_turns": sum(1 for e in kept if getattr(e, "truncated_turns", False)),
            "cut_turns": sum(1 for e in kept if getattr(e, "cut_turn", False)),
            "dropped": len(examples) - len(kept) - len(skipped_late),
            "examples": sum(s["examples"] for s in meta_splits.values()),
        },
        "skipped_examples": skipped_all[:20],
        "token_lengths": length_summary(all_lengths),
        "tokens": all_tokens,
        "learned_fraction": round(all_learned / all_tokens, 6) if all_tokens else 0.0,
        "category_names": category_names,
        "splits": meta_splits,
        "created_with": {"python": platform.python_version(), "numpy": np.__version__},
    }
    with output.atomic_dir() as tmp:
        for name, arrays in arrays_by_split.items():
            save_file(arrays, str(tmp / f"{name}.safetensors"), metadata={"format_version": str(FORMAT_VERSION)})
            if name != "train":
                lines = [
                    json.dumps({"record_index": int(i), **dataclasses.asdict(records[int(i)])}, ensure_ascii=False)
                    for i in arrays["record_index"]
                ]
                (tmp / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        atomic_write_json(tmp / "meta.json", meta)
        _make_readable(tmp)
    return meta
