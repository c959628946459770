"""BatchIterator invariants: every example once per epoch, exact rows, bucketing, packing, resume, sharding."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_qlora.data import CROSS_ENTROPY_IGNORE_INDEX as IGNORE
from mlx_qlora.data import BatchIterator, PreparedDataset, shard_batch
from mlx_qlora.data.dataset import padded_length
from mlx_qlora.errors import UserError

MAX_LEN = 128


def write_prepared(folder, lengths, seed=0, max_seq_len=MAX_LEN, split="train"):
    """A prepared directory with random examples of the given lengths (BOS=1 first, a masked prompt)."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for n in lengths:
        x = rng.integers(3, 300, size=n).astype(np.int32)
        x[0] = 1
        y = x.copy()
        y[: max(1, n // 3)] = IGNORE
        ids.append(x)
        labels.append(y)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "input_ids": np.concatenate(ids),
            "labels": np.concatenate(labels),
            "offsets": offsets,
            "category": (np.arange(len(lengths)) % 3).astype(np.int32),
        },
        str(folder / f"{split}.safetensors"),
    )
    meta = {"max_seq_len": max_seq_len, "tokenizer": {"checksum": "x", "pad_id": None, "eos_id": 2}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return PreparedDataset(folder, split)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(1)
    lengths = rng.integers(4, MAX_LEN + 1, size=203)  # not a multiple of the batch size
    return write_prepared(tmp_path_factory.mktemp("prepared"), lengths)


def examples_of(batch):
    """(example index, its tokens, its labels) of every example in a batch, read back from the arrays."""
    out = []
    for r in range(len(batch["input_ids"])):
        if "segment_ids" not in batch:
            n = batch["lengths"][r]
            out.append((int(batch["indices"][r]), batch["input_ids"][r, :n], batch["labels"][r, :n]))
            continue
        for k, index in enumerate(i for i in batch["indices"][r] if i >= 0):
            cols = np.flatnonzero(batch["segment_ids"][r] == k + 1)
            out.append((int(index), batch["input_ids"][r, cols], batch["labels"][r, cols]))
    return out


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_exactly_once_per_epoch(dataset, packing, shuffle):
    it = BatchIterator(dataset, batch_size=8, seed=3, shuffle=shuffle, packing=packing)
    orders = []
    for epoch in range(3):
        seen = []
        for _ in range(len(it)):
            batch = next(it)
            assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].dtype == np.int32
            for index, tokens, labels in examples_of(batch):
                ref = dataset[index]
                np.testing.assert_array_equal(tokens, ref["input_ids"])
                np.testing.assert_array_equal(labels, ref["labels"])
                seen.append(index)
            # Padding: pad id on the inputs, -100 on the labels, 0 in the attention mask.
            real = batch["attention_mask"].astype(bool)
            assert (batch["labels"][~real] == IGNORE).all() and (batch["input_ids"][~real] == 2).all()
            np.testing.assert_array_equal(real.sum(1), batch["lengths"])
        assert sorted(seen) == list(range(len(dataset))), f"epoch {epoch}"
        assert it.epoch == epoch and it.position == len(it.plan(epoch))
        orders.append(seen)
    if shuffle:
        assert orders[0] != orders[1] != orders[2]
    else:
        assert orders[0] == orders[1] == orders[2]


def test_packed_rows_layout(dataset):
    it = BatchIterator(dataset, batch_size=4, seed=0, packing=True)
    for batch in (next(it) for _ in range(len(it))):
        for r in range(len(batch["input_ids"])):
            seg, pos = batch["segment_ids"][r], batch["position_ids"][r]
            n = batch["lengths"][r]
            assert n <= MAX_LEN and (seg[n:] == 0).all() and (pos[n:] == 0).all()
            examples = [i for i in batch["indices"][r] if i >= 0]
            # Segments 1..k in order, each holding one whole example, positions restarting at 0.
            expected_seg = np.concatenate([np.full(dataset.lengths[i], k + 1) for k, i in enumerate(examples)])
            expected_pos = np.concatenate([np.arange(dataset.lengths[i]) for i in examples])
            np.testing.assert_array_equal(seg[:n], expected_seg)
            np.testing.assert_array_equal(pos[:n], expected_pos)
            # A segment starts with BOS, whose label is -100: a shifted loss never crosses examples.
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[:n]])) != 0)
            assert (batch["labels"][r, starts] == IGNORE).all() and (batch["input_ids"][r, starts] == 1).all()


def test_bucketing_and_packing_reduce_padding(dataset):
    # Rounded to multiples of 8 only: the ladder of row lengths adds its own padding (tested below).
    plain = BatchIterator(dataset, batch_size=8, seed=0, bucketing=False, fixed_lengths=False)
    bucketed = BatchIterator(dataset, batch_size=8, seed=0, bucket_batches=10, fixed_lengths=False)
    packed = BatchIterator(dataset, batch_size=8, seed=0, packing=True, fixed_lengths=False)
    e_plain, e_bucket, e_pack = plain.epoch_efficiency(), bucketed.epoch_efficiency(), packed.epoch_efficiency()
    assert e_plain < e_bucket < 1 and e_plain < e_pack <= 1
    assert e_bucket > 0.85 and e_pack > 0.9
    # The reported efficiency of yielded batches is real tokens / B x L, computed here from the arrays.
    real = computed = 0
    for _ in range(len(bucketed)):
        batch = next(bucketed)
        real += int(batch["attention_mask"].sum())
        computed += batch["input_ids"].size
    assert bucketed.efficiency == pytest.approx(real / computed) == pytest.approx(e_bucket)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_is_exact(dataset, packing):
    kwargs = dict(batch_size=8, seed=11, packing=packing)
    reference = BatchIterator(dataset, **kwargs)
    n = len(reference)
    expected = [next(reference) for _ in range(2 * n + 3)]  # crosses two epoch boundaries
    for stop in (0, 5, n - 1, n, n + 2):
        first = BatchIterator(dataset, **kwargs)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = BatchIterator(dataset, **kwargs)
        resumed.load_state_dict(state)
        for want in expected[stop:]:
            got = next(resumed)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_resume_refuses_other_settings(dataset):
    state = BatchIterator(dataset, batch_size=8, seed=1).state_dict()
    with pytest.raises(UserError, match="saved seed=1, now 2"):
        BatchIterator(dataset, batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="saved batch_size=8, now 4"):
        BatchIterator(dataset, batch_size=4, seed=1).load_state_dict(state)


def test_same_seed_same_batches_other_seed_other_order(dataset):
    a = [next(BatchIterator(dataset, batch_size=8, seed=5))["indices"] for _ in range(1)]
    b = [next(BatchIterator(dataset, batch_size=8, seed=5))["indices"] for _ in range(1)]
    c = [next(BatchIterator(dataset, batch_size=8, seed=6))["indices"] for _ in range(1)]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_no_repeat_stops_after_each_epoch(dataset):
    it = BatchIterator(dataset, batch_size=16, shuffle=False, repeat=False)
    first = [b["indices"] for b in it]
    second = [b["indices"] for b in it]
    assert len(first) == len(second) == int(np.ceil(len(dataset) / 16))
    assert Counter(np.concatenate(first).tolist()) == Counter(range(len(dataset)))
    # Without shuffling, bucketing sorts by length.
    lengths = dataset.lengths[np.concatenate(first)]
    assert (np.diff(lengths) >= 0).all()


def test_drop_last(dataset):
    it = BatchIterator(dataset, batch_size=16, seed=0, drop_last=True)
    sizes = [len(next(it)["indices"]) for _ in range(len(it))]
    assert sizes == [16] * (len(dataset) // 16)


@pytest.mark.parametrize("packing", [False, True])
def test_sharding_splits_each_global_batch(dataset, packing):
    world = 4
    full = BatchIterator(dataset, batch_size=8, seed=2, packing=packing)
    ranks = [BatchIterator(dataset, batch_size=8, seed=2, packing=packing, rank=r, world_size=world)
             for r in range(world)]
    for _ in range(len(full) + 2):
        batch = next(full)
        shards = [next(it) for it in ranks]
        for r, shard in enumerate(shards):
            want = shard_batch(batch, r, world)
            assert all(np.array_equal(shard[k], want[k]) for k in batch)
            assert shard["input_ids"].shape[1] == batch["input_ids"].shape[1]
        rows = sorted(row for s in shards for row in map(tuple, s["input_ids"].tolist()))
        assert rows == sorted(map(tuple, batch["input_ids"].tolist()))
    with pytest.raises(ValueError, match="not divisible by world_size"):
        BatchIterator(dataset, batch_size=6, world_size=4, rank=0)


def test_errors(tmp_path, dataset):
    with pytest.raises(UserError, match="longer than max_seq_len=64"):
        BatchIterator(dataset, batch_size=4, packing=True, max_seq_len=64)
    with pytest.raises(UserError, match="no 'test' split"):
        PreparedDataset(dataset.data_dir, "test")
    with pytest.raises(UserError, match="not a prepared data directory"):
        PreparedDataset(tmp_path, "train")
    bad = tmp_path / "bad"
    write_prepared(bad, [5, 6])
    arrays = {"input_ids": np.zeros(3, np.int32), "labels": np.zeros(3, np.int32),
              "offsets": np.array([0, 5], np.int32), "category": np.zeros(1, np.int32)}
    save_file(arrays, str(bad / "train.safetensors"))
    with pytest.raises(UserError, match="inconsistent arrays"):
        PreparedDataset(bad)


def test_epoch_batches_leave_the_cursor(dataset):
    it = BatchIterator(dataset, batch_size=8, seed=4, packing=True)
    next(it)
    state = it.state_dict()
    listed = list(it.epoch_batches(1))
    assert it.state_dict() == state
    it.load_state_dict({**state, "epoch": 1, "position": 0})
    for want in listed:
        got = it.next_batch()
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert PreparedDataset.has_split(dataset.data_dir, "train") and not PreparedDataset.has_split(dataset.data_dir, "test")


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_padded_length_ladder(multiple):
    lengths = np.arange(1, 4097)
    widths = np.array([padded_length(int(n), multiple) for n in lengths])
    plain = np.array([padded_length(int(n), multiple, ladder=False) for n in lengths])
    assert (widths >= lengths).all() and (widths % multiple == 0).all() and (np.diff(widths) >= 0).all()
    # At most 25% padding over the plain rounding (the rungs are 1.25, 1.2, 1.17, 1.14 apart; the first is 8) ...
    bound = np.maximum(plain, -(-np.ceil(np.maximum(lengths, 8) * 1.25) // multiple) * multiple)
    assert (widths[7:] <= bound[7:]).all() and (widths[:8] == padded_length(8, multiple)).all()
    # ... for at most four shapes per doubling of the length (plus the rungs below 8).
    assert len(set(widths.tolist())) <= 4 * np.log2(4096 / 8) + 4
    np.testing.assert_array_equal(plain, np.maximum(multiple, -(-lengths // multiple) * multiple))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_token_budget_batches(dataset, packing, world_size):
    budget = 512
    iters = [BatchIterator(dataset, batch_size=1, seed=5, packing=packing, max_batch_tokens=budget, rank=r,
                           world_size=world_size) for r in range(world_size)]
    shapes, seen = {}, []
    for rows in iters[0].plan(0):
        batch = iters[0].make_batch(rows)  # the global batch
        b, width = batch["input_ids"].shape
        assert b == iters[0].rows_for(width) and b % world_size == 0
        assert b * width <= budget or b == world_size  # a row longer than the budget still runs
        assert shapes.setdefault(width, b) == b  # one shape per row length
        empty = batch["lengths"] == 0
        assert (batch["labels"][empty] == IGNORE).all() and (batch["attention_mask"][empty] == 0).all()
        assert len(rows) == (~empty).sum() and not empty[: len(rows)].any()  # empty rows come last
        seen += [index for index, _, _ in examples_of(batch) if index >= 0]
        for r, it in enumerate(iters):  # each rank's rows of the same global batch
            mine = next(it)
            np.testing.assert_array_equal(mine["input_ids"], batch["input_ids"][r::world_size])
    assert sorted(seen) == list(range(len(dataset)))
    # Short records fill a batch with many rows: far fewer batches than one example per batch.
    assert len(iters[0]) < len(dataset) / 2


def test_token_budget_resume_and_settings(dataset):
    it = BatchIterator(dataset, batch_size=1, seed=2, max_batch_tokens=300)
    for _ in range(3):
        next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(4)]
    again = BatchIterator(dataset, batch_size=1, seed=2, max_batch_tokens=300)
    again.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(expected, (next(again) for _ in range(4))):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = BatchIterator(dataset, batch_size=1, seed=2, max_batch_tokens=400)
    with pytest.raises(UserError, match="max_batch_tokens"):
        other.load_state_dict(state)
