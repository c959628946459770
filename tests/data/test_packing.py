"""Packed rows never attend across examples: the model's logits on a packed row equal those of each example
run alone (float32, 1e-5). Padded (unpacked) rows likewise equal the example alone at its real positions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_qlora.config import DataConfig
from mlx_qlora.data import BatchIterator, PreparedDataset, prepare_dataset


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory, tiny_spm_path):
    root = tmp_path_factory.mktemp("packing")
    rng = np.random.default_rng(0)
    words = "the river city music blue green quick fox answer question".split()
    rows = [
        {"instruction": " ".join(rng.choice(words, size=int(rng.integers(2, 8)))),
         "context": "", "response": " ".join(rng.choice(words, size=int(rng.integers(1, 12))))}
        for _ in range(24)
    ]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_dataset(root / "d.jsonl", tiny_spm_path, root / "out", DataConfig(max_seq_len=96, val_fraction=0.0))
    return PreparedDataset(root / "out", "train")


@pytest.mark.parametrize("window", [None, 16])
def test_packed_logits_equal_examples_alone(packed_data, tiny_model, window):
    import mlx.core as mx

    model = tiny_model(seed=0, vocab_size=320, sliding_window=window)  # 320: the tiny tokenizer's vocabulary
    assert max(packed_data.lengths) > 16  # the window matters inside examples

    alone = {}
    for i in range(len(packed_data)):
        ids = mx.array(packed_data[i]["input_ids"][None])
        alone[i] = np.array(model(ids)[0])

    it = BatchIterator(packed_data, batch_size=2, seed=0, packing=True, max_seq_len=160, repeat=False)
    checked = 0
    for batch in it:
        logits = np.array(model(mx.array(batch["input_ids"]), position_ids=mx.array(batch["position_ids"]),
                                segment_ids=mx.array(batch["segment_ids"])))
        for r in range(len(batch["input_ids"])):
            for k, index in enumerate(i for i in batch["indices"][r] if i >= 0):
                cols = np.flatnonzero(batch["segment_ids"][r] == k + 1)
                np.testing.assert_allclose(logits[r, cols], alone[int(index)], atol=1e-5, rtol=0)
                checked += 1
        assert np.isfinite(logits).all()  # padding (its own segment) produces no NaN
    assert checked == len(packed_data)
    assert any((batch["indices"] >= 0).sum(1).max() > 1 for batch in [it.make_batch(p) for p in it.plan(0)])

    for batch in BatchIterator(packed_data, batch_size=4, seed=0, repeat=False):
        logits = np.array(model(mx.array(batch["input_ids"])))
        for r, index in enumerate(batch["indices"]):
            n = batch["lengths"][r]
            np.testing.assert_allclose(logits[r, :n], alone[int(index)], atol=1e-5, rtol=0)
