"""Reading a prepared directory and batching it for training: bucketing, packing, exact resume, sharding.

A batch is a dict of numpy arrays (B rows, L columns, L a multiple of ``pad_to_multiple``):

- ``input_ids`` (B, L) int32, padded with ``pad_id``;
- ``labels`` (B, L) int32, aligned with ``input_ids``, ``-100`` on prompt tokens and padding;
- ``attention_mask`` (B, L) int32, 1 on real tokens;
- ``lengths`` (B,) int32, real tokens per row;
- ``indices``: example indices, (B,) int64, or (B, K) with ``-1`` after the last example of a packed row;
- packed rows only: ``position_ids`` (B, L) int32 restarting at 0 for each example (0 on padding) and
  ``segment_ids`` (B, L) int32, 1, 2, ... for the examples of a row and 0 for padding, so a token attends
  only within its own example and padding only to padding.

In a packed row the loss may still shift labels across an example boundary: the next example starts with
BOS, whose label is always ``-100``, so no example is trained to predict another.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from ..errors import UserError
from ..io import read_json
from .constants import CROSS_ENTROPY_IGNORE_INDEX
from .tokenizer import Tokenizer

_ARRAYS = ("input_ids", "labels", "offsets", "category")


def read_meta(data_dir: Union[str, os.PathLike]) -> dict:
    """The ``meta.json`` of a prepared directory; ``UserError`` when it is missing or unreadable."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{data_dir}: not a prepared data directory (no meta.json); run scripts/prepare_data.py")
    return read_json(path)


def check_tokenizer(meta: dict, tokenizer: Tokenizer, source: Optional[Union[str, os.PathLike]] = None) -> None:
    """Raise ``UserError`` unless the data described by ``meta`` was made with ``tokenizer`` (same file hash).

    ``source`` (the data directory) is named in the message when given.
    """
    made_with = meta.get("tokenizer", {})
    if made_with.get("checksum") != tokenizer.checksum:
        where = f"{source}: " if source is not None else ""
        raise UserError(
            f"{where}the data was prepared with another tokenizer ({made_with.get('file')}, sha256 "
            f"{str(made_with.get('checksum'))[:12]}...) than the model's ({tokenizer.path.name}, sha256 "
            f"{tokenizer.checksum[:12]}...); prepare it again with --tokenizer pointing at the model"
        )


def check_context(dataset: "PreparedDataset", limit: int, model_config: Union[str, os.PathLike]) -> None:
    """``UserError`` when an example of ``dataset`` has more tokens than the model's context of ``limit``
    positions (``max_position_embeddings`` in ``model_config``, named in the message with the data folder,
    the split, the longest example and how many are too long)."""
    if len(dataset) == 0:
        return
    index = int(np.argmax(dataset.lengths))
    longest = int(dataset.lengths[index])
    if longest > limit:
        too_long = int((dataset.lengths > limit).sum())
        raise UserError(
            f"{dataset.data_dir}: the longest {dataset.split} example (index {index}) has {longest} tokens, more "
            f"than the model's context of {limit} (max_position_embeddings in {model_config}; {too_long} "
            f"example(s) too long); prepare the data again with --max-seq-len {limit} or less"
        )


class PreparedDataset:
    """One split of a prepared directory, held in memory.

    ``dataset[i]`` is a dict with ``input_ids`` and ``labels`` (int32 arrays of the example's length) and
    ``category`` (int). ``lengths`` (n,) holds every example's token count; ``meta`` the directory's meta.json.
    """

    def __init__(self, data_dir: Union[str, os.PathLike], split: str = "train"):
        from safetensors.numpy import load_file

        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(data_dir)
        path = self.data_dir / f"{split}.safetensors"
        if not path.is_file():
            present = sorted(p.stem for p in self.data_dir.glob("*.safetensors"))
            raise UserError(f"{data_dir}: no {split!r} split (present: {', '.join(present) or 'none'})")
        try:
            arrays = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type
            raise UserError(f"{path}: cannot read ({e})") from None
        missing = [k for k in _ARRAYS if k not in arrays]
        if missing:
            raise UserError(f"{path}: missing array(s) {', '.join(missing)}")
        self.input_ids = arrays["input_ids"]
        self.labels = arrays["labels"]
        self.offsets = arrays["offsets"].astype(np.int64)
        self.category = arrays["category"]
        self.record_index = arrays.get("record_index")
        self.lengths = np.diff(self.offsets)
        n = len(self.offsets) - 1
        if (
            n < 0
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.input_ids)
            or len(self.labels) != len(self.input_ids)
            or len(self.category) != n
            or (self.lengths < 0).any()
        ):
            raise UserError(f"{path}: inconsistent arrays (offsets, input_ids, labels, category do not agree)")

    @staticmethod
    def has_split(data_dir: Union[str, os.PathLike], split: str) -> bool:
        """Whether ``data_dir`` holds ``split`` (``{split}.safetensors``)."""
        return (Path(data_dir) / f"{split}.safetensors").is_file()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return {
            "input_ids": self.input_ids[start:end],
            "labels": self.labels[start:end],
            "category": int(self.category[index]),
        }

    @property
    def category_names(self) -> list[str]:
        return list(self.meta.get("category_names", []))

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, int(math.ceil(n / multiple)) * multiple)


def padded_length(n: int, multiple: int = 8, ladder: bool = True) -> int:
    """The row length L a batch whose longest row has ``n`` tokens is padded to.

    Without ``ladder``: ``n`` rounded up to a multiple of ``multiple``. With it (the default): the smallest
    length of the fixed ladder 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (four steps per doubling, each
    rounded up to a multiple of ``multiple``) that holds ``n``. A compiled training step is built once per
    batch shape; the ladder bounds the shapes a run meets to about four per doubling of the record length,
    at the cost of at most 25% padding over the plain rounding."""
    plain = _round_up(n, multiple)
    if not ladder:
        return plain
    step = 8
    while True:  # rungs m * step for m in 1, 1.25, 1.5, 1.75, then the step doubles
        for rung in (step, step * 5 // 4, step * 3 // 2, step * 7 // 4):
            if rung >= n:
                return max(plain, _round_up(rung, multiple))
        step *= 2


def shard_batch(batch: dict[str, np.ndarray], rank: int, world_size: int) -> dict[str, np.ndarray]:
    """Rows ``rank::world_size`` of every per-row array of ``batch`` (the row length L is kept, so every
    rank sees the same shapes). A final partial batch may leave a rank fewer rows, or none."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    rows = len(batch["input_ids"])
    return {
        k: v[rank::world_size] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == rows else v
        for k, v in batch.items()
    }


class BatchIterator:
    """Seeded batches of a ``PreparedDataset``, every example exactly once per epoch.

    Args:
        dataset: the split to batch.
        batch_size: rows per (global) batch.
        seed: with the epoch number, fixes the order of every epoch.
        shuffle: shuffle examples each epoch (off: the dataset's order, or sorted by length with bucketing).
        packing: put several examples in one row of at most ``max_seq_len`` tokens (first-fit decreasing).
        max_seq_len: row capacity when packing; examples longer than it are an error
            (default: the ``max_seq_len`` the data was prepared with).
        pad_to_multiple: L is rounded up to a multiple of this.
        fixed_lengths: pad L to the ladder of ``padded_length`` (a few shapes per run), not just to the
            next multiple of ``pad_to_multiple``.
        max_batch_tokens: batch by a token budget instead of ``batch_size``: a batch holds as many rows as
            fit in rows x L <= max_batch_tokens (at least one row; a multiple of ``world_size``), and a
            batch with fewer examples gets empty rows (no learned token) up to that count, so every batch
            of a row length L has the same shape.
        pad_id: id written on padding (default: the tokenizer's pad, else its EOS, else 0).
        bucketing: group similar lengths: shuffle, sort within chunks of ``bucket_batches`` batches, cut
            into batches, shuffle the batches.
        repeat: go on with the next epoch after the last batch (else stop; a new loop starts the next epoch).
        drop_last: leave out an epoch's final partial batch (then not every example appears every epoch).
        rank, world_size: yield only rows ``rank::world_size`` of each global batch (data parallelism).

    ``state_dict()`` / ``load_state_dict()`` save and restore the cursor (epoch, position): a restored
    iterator yields exactly the batches the original would have yielded next.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = False,
        max_seq_len: Optional[int] = None,
        pad_to_multiple: int = 8,
        pad_id: Optional[int] = None,
        bucketing: bool = True,
        bucket_batches: int = 50,
        repeat: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        fixed_lengths: bool = True,
        max_batch_tokens: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size % world_size and max_batch_tokens is None:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if len(dataset) == 0:
            raise UserError(f"{dataset.data_dir}: the {dataset.split!r} split has no examples")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.packing = packing
        self.max_seq_len = int(max_seq_len or dataset.meta.get("max_seq_len") or dataset.lengths.max())
        longest = int(dataset.lengths.max())
        if longest > self.max_seq_len:
            raise UserError(
                f"{dataset.data_dir}: an example of {longest} tokens is longer than max_seq_len="
                f"{self.max_seq_len}; prepare the data again with --max-seq-len {self.max_seq_len}"
            )
        self.pad_to_multiple = pad_to_multiple
        self.fixed_lengths = fixed_lengths
        self.max_batch_tokens = max_batch_tokens
        if pad_id is None:
            tok = dataset.meta.get("tokenizer", {})
            pad_id = next((v for v in (tok.get("pad_id"), tok.get("eos_id")) if v is not None), 0)
        self.pad_id = int(pad_id)
        self.bucketing = bucketing
        self.bucket_batches = max(1, bucket_batches)
        self.repeat = repeat
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._plan_cache: Optional[tuple[int, list]] = None
        self.real_tokens = 0  # over the batches yielded so far (this rank)
        self.computed_tokens = 0

    # --- the plan of an epoch: a list of batches; a batch is a list of rows; a row a list of examples ---

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def width(self, longest: int) -> int:
        """The row length L of a batch whose longest row has ``longest`` tokens."""
        return padded_length(longest, self.pad_to_multiple, self.fixed_lengths)

    def rows_for(self, width: int) -> int:
        """Rows of a batch of row length ``width``: ``batch_size``, or with ``max_batch_tokens`` as many as fit
        (at least one per rank)."""
        if self.max_batch_tokens is None:
            return self.batch_size
        ranks = self.world_size
        return max(ranks, self.max_batch_tokens // width // ranks * ranks)

    def _cut(self, units: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
        """Consecutive batches of ``units``: ``batch_size`` each, or under ``max_batch_tokens`` as many units
        as fit at the row length of the longest so far."""
        b = self.batch_size
        if self.max_batch_tokens is None:
            return [units[i : i + b] for i in range(0, len(units), b)]
        batches, start, longest = [], 0, 0
        for i, unit in enumerate(units):
            longest = max(longest, int(sizes[unit]))
            if i > start and i - start + 1 > self.rows_for(self.width(longest)):
                batches.append(units[start:i])
                start, longest = i, int(sizes[unit])
        if start < len(units):
            batches.append(units[start:])
        return batches

    def _full(self, batch: np.ndarray, sizes: np.ndarray) -> bool:
        return len(batch) == self.rows_for(self.width(int(sizes[batch].max())))

    def _group(self, units: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Cut ``units`` (already in epoch order) into batches, bucketing by ``sizes`` when asked."""
        if self.bucketing and self.shuffle:
            if self.max_batch_tokens is None:
                chunk = self.batch_size * self.bucket_batches
            else:  # about bucket_batches batches of rows of the mean size
                chunk = self.bucket_batches * self.rows_for(self.width(max(1, int(sizes[units].mean()))))
            batches = []
            for start in range(0, len(units), chunk):
                part = units[start : start + chunk]
                part = part[np.argsort(sizes[part], kind="stable")]
                batches += self._cut(part, sizes)
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            if self.bucketing:
                units = units[np.argsort(sizes[units], kind="stable")]
            batches = self._cut(units, sizes)
        if self.drop_last:
            batches = [x for x in batches if self._full(x, sizes)]
        return batches

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """First-fit-decreasing packing of ``order`` into rows of ``max_seq_len``, chunk by chunk."""
        lengths = self.dataset.lengths
        mean = max(1.0, float(lengths.mean()))
        chunk = max(self.batch_size, int(self.bucket_batches * self.batch_size * self.max_seq_len / mean))
        rows: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-lengths[part], kind="stable")]
            room = np.empty(len(part), dtype=np.int64)
            chunk_rows: list[list[int]] = []
            for index in part:
                length = lengths[index]
                fits = np.flatnonzero(room[: len(chunk_rows)] >= length)
                if len(fits):
                    chunk_rows[fits[0]].append(int(index))
                    room[fits[0]] -= length
                else:
                    room[len(chunk_rows)] = self.max_seq_len - length
                    chunk_rows.append([int(index)])
            rows += chunk_rows
        return rows

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The batches of ``epoch``: each a list of rows, each row a list of example indices."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = self._rng(epoch)
        n = len(self.dataset)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.packing:
            rows = self._pack(order)
            fill = np.array([sum(int(self.dataset.lengths[i]) for i in r) for r in rows], dtype=np.int64)
            row_order = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
            plan = [[rows[r] for r in batch] for batch in self._group(row_order, fill, rng)]
        else:
            plan = [[[int(i)] for i in batch] for batch in self._group(order, self.dataset.lengths, rng)]
        self._plan_cache = (epoch, plan)
        return plan

    def __len__(self) -> int:
        """Batches in the current epoch."""
        return len(self.plan(self.epoch))

    def batch_shape(self, rows: list[list[int]]) -> tuple[list[int], int, int]:
        """For one batch's rows of example indices: each row's real tokens, and the batch's row count B and
        row length L (with ``max_batch_tokens``, B counts the empty rows that ``make_batch`` adds)."""
        fills = [int(self.dataset.lengths[row].sum()) for row in rows]
        width = self.width(max(fills))
        return fills, len(rows) if self.max_batch_tokens is None else self.rows_for(width), width

    def row_lengths(self, epoch: Optional[int] = None) -> list[int]:
        """The distinct row lengths L of an epoch's batches, in order (one compiled step each)."""
        return sorted({self.batch_shape(rows)[2] for rows in self.plan(self.epoch if epoch is None else epoch)})

    def epoch_efficiency(self, epoch: Optional[int] = None) -> float:
        """Real tokens / tokens computed (B x L summed over batches) for a whole epoch's plan."""
        real = computed = 0
        for rows in self.plan(self.epoch if epoch is None else epoch):
            fills, b, width = self.batch_shape(rows)
            real += sum(fills)
            computed += b * width
        return real / computed

    @property
    def efficiency(self) -> float:
        """Real tokens / tokens computed over the batches yielded so far by this iterator."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0

    # --- batches ---

    def make_batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """The arrays of one global batch from its rows of example indices (see the module docstring)."""
        ds = self.dataset
        fills, b, width = self.batch_shape(rows)
        # under max_batch_tokens, empty rows up to the count of this row length: one shape per L
        rows, fills = list(rows) + [[]] * (b - len(rows)), fills + [0] * (b - len(rows))
        input_ids = np.full((b, width), self.pad_id, dtype=np.int32)
        labels = np.full((b, width), CROSS_ENTROPY_IGNORE_INDEX, dtype=np.int32)
        attention_mask = np.zeros((b, width), dtype=np.int32)
        if self.packing:
            position_ids = np.zeros((b, width), dtype=np.int32)
            segment_ids = np.zeros((b, width), dtype=np.int32)
            indices = np.full((b, max(1, max(len(r) for r in rows))), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            col = 0
            for k, index in enumerate(row):
                start, end = ds.offsets[index], ds.offsets[index + 1]
                n = int(end - start)
                input_ids[r, col : col + n] = ds.input_ids[start:end]
                labels[r, col : col + n] = ds.labels[start:end]
                if self.packing:
                    position_ids[r, col : col + n] = np.arange(n)
                    segment_ids[r, col : col + n] = k + 1
                    indices[r, k] = index
                col += n
            attention_mask[r, :col] = 1
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "lengths": np.asarray(fills, dtype=np.int32),
        }
        if self.packing:
            batch.update(position_ids=position_ids, segment_ids=segment_ids, indices=indices)
        else:
            batch["indices"] = np.asarray([row[0] if row else -1 for row in rows], dtype=np.int64)
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Every batch of ``epoch`` in order (this rank's rows), leaving the cursor and the counters alone."""
        for rows in self.plan(epoch):
            batch = self.make_batch(rows)
            yield shard_batch(batch, self.rank, self.world_size) if self.world_size > 1 else batch

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next batch (``next(iterator)``)."""
        return self.__next__()

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self.plan(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            if not self.repeat:
                raise StopIteration
            plan = self.plan(self.epoch)
        batch = self.make_batch(plan[self.position])
        self.position += 1
        if self.world_size > 1:
            batch = shard_batch(batch, self.rank, self.world_size)
        self.real_tokens += int(batch["lengths"].sum())
        self.computed_tokens += int(batch["input_ids"].size)
        return batch

    # --- resume ---

    def state_dict(self) -> dict[str, Any]:
        """The cursor and the settings that fix the order (JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "packing": self.packing,
            "shuffle": self.shuffle,
            "bucketing": self.bucketing,
            "max_batch_tokens": self.max_batch_tokens,
            "n_examples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict``); ``UserError`` if it was made with other settings."""
        for key in ("seed", "batch_size", "packing", "shuffle", "bucketing", "max_batch_tokens", "n_examples"):
            mine = len(self.dataset) if key == "n_examples" else getattr(self, key)
            if key in state and state[key] != mine:
                raise UserError(f"cannot resume the batch order: saved {key}={state[key]!r}, now {mine!r}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
