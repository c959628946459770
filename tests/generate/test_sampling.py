"""Sampling filters against transformers' logits processors (float32, 1e-6), seeded sampling, greedy."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.generate.sampling import (
    KeyStream, SamplerConfig, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
    mark_seen, process_logits, sample, seen_mask,
)

V = 50


def _logits(seed=0, batch=3):
    return np.random.default_rng(seed).normal(0, 2.0, size=(batch, V)).astype(np.float32)


def _history(seed=0, batch=3, length=12):
    return np.random.default_rng(seed + 100).integers(0, V, size=(batch, length))


def _assert_same(ours: mx.array, ref) -> None:
    ours = np.array(ours)
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], atol=1e-6, rtol=1e-6)


def test_seen_mask_and_mark_seen_match_numpy():
    ids = _history()
    valid = np.ones_like(ids)
    valid[0, :4] = 0  # left padding of row 0 does not count
    expected = np.zeros((3, V), bool)
    for b in range(3):
        expected[b, ids[b][valid[b] == 1]] = True
    seen = seen_mask(mx.array(ids), V, mx.array(valid))
    np.testing.assert_array_equal(np.array(seen), expected)
    new = np.array([5, 7, 49])
    expected[np.arange(3), new] = True
    np.testing.assert_array_equal(np.array(mark_seen(seen, mx.array(new))), expected)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, ids = _logits(1), _history(1)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits))
    ours = apply_repetition_penalty(mx.array(logits), seen_mask(mx.array(ids), V), penalty)
    _assert_same(ours, ref)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(k):
    import torch
    from transformers import TopKLogitsWarper

    logits = _logits(2)
    logits[0, :3] = logits[0].max()  # a three-way tie at the top: kept together
    ref = TopKLogitsWarper(k)(None, torch.tensor(logits))
    _assert_same(apply_top_k(mx.array(logits), k), ref)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    import torch
    from transformers import TopPLogitsWarper

    logits = _logits(3)
    ref = TopPLogitsWarper(p)(None, torch.tensor(logits))
    _assert_same(apply_top_p(mx.array(logits), p), ref)


@pytest.mark.parametrize("min_p", [0.01, 0.2, 0.9])
def test_min_p_matches_transformers(min_p):
    import torch
    from transformers import MinPLogitsWarper

    logits = _logits(4)
    ref = MinPLogitsWarper(min_p)(None, torch.tensor(logits))
    _assert_same(apply_min_p(mx.array(logits), min_p), ref)


def test_all_filters_in_transformers_order():
    import torch
    from transformers import (
        LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper,
    )

    logits, ids = _logits(5), _history(5)
    config = SamplerConfig(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
        TopPLogitsWarper(0.8), MinPLogitsWarper(0.05),
    ])
    ref = chain(torch.tensor(ids), torch.tensor(logits))
    _assert_same(process_logits(mx.array(logits), config, seen_mask(mx.array(ids), V)), ref)
    _assert_same(apply_temperature(mx.array(logits), 0.7), torch.tensor(logits) / 0.7)


def test_greedy_is_argmax_of_penalised_logits():
    logits, ids = _logits(6), _history(6)
    seen = seen_mask(mx.array(ids), V)
    plain = sample(mx.array(logits), SamplerConfig())
    np.testing.assert_array_equal(np.array(plain), logits.argmax(-1))
    penalised = np.where(np.array(seen), np.where(logits < 0, logits * 3.0, logits / 3.0), logits)
    tokens = sample(mx.array(logits), SamplerConfig(repetition_penalty=3.0), seen=seen)
    np.testing.assert_array_equal(np.array(tokens), penalised.argmax(-1))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = mx.array(_logits(7, batch=1))
    config = SamplerConfig(temperature=1.0)

    def draw(seed):
        keys = KeyStream(seed)
        return [int(sample(logits, config, keys.next())[0]) for _ in range(40)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_sample_frequencies_follow_the_filtered_distribution():
    """20000 draws at temperature 0.8 with top-k 6: frequencies within 5 binomial sigmas of softmax."""
    row = _logits(8, batch=1)
    config = SamplerConfig(temperature=0.8, top_k=6)
    n = 20000
    logits = mx.broadcast_to(mx.array(row), (n, V))
    tokens = np.array(sample(logits, config, mx.random.key(0)))
    counts = np.bincount(tokens, minlength=V)
    z = row[0] / 0.8
    kept = z >= np.sort(z)[-6]
    probs = np.where(kept, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    assert counts[~kept].sum() == 0
    sigma = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * sigma + 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_sampling_without_a_key_is_refused():
    with pytest.raises(ValueError, match="needs an mx.random key"):
        sample(mx.array(_logits(9)), SamplerConfig(temperature=1.0))
