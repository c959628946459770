"""Chunked cross-entropy over learned positions against torch.nn.functional.cross_entropy (ignore_index=-100)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_qlora  # noqa: F401  (OpenBLAS before MLX)
import mlx.core as mx

from mlx_qlora.data.constants import CROSS_ENTROPY_IGNORE_INDEX
from mlx_qlora.train.loss import cross_entropy_loss, loss_sums, shift_for_next_token

B, L, D, V = 3, 11, 16, 50


def _case(seed: int = 0):
    """hidden (B, L, D), head weight (V, D) and bias (V,), labels (B, L) with row 1 fully ignored."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, L, D)).astype(np.float32)
    weight = (rng.standard_normal((V, D)) * 0.5).astype(np.float32)
    bias = rng.standard_normal(V).astype(np.float32)
    labels = rng.integers(0, V, (B, L)).astype(np.int32)
    labels[rng.random((B, L)) < 0.4] = CROSS_ENTROPY_IGNORE_INDEX
    labels[1] = CROSS_ENTROPY_IGNORE_INDEX
    labels[0, 0] = V - 1  # the last vocabulary entry is a valid target
    return hidden, weight, bias, labels


def _torch_reference(hidden, weight, bias, labels):
    """(loss sum, d loss_sum / d hidden, d loss_sum / d weight) from torch."""
    import torch
    import torch.nn.functional as F

    h = torch.tensor(hidden, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    logits = h.reshape(-1, D) @ w.T + torch.tensor(bias)
    loss = F.cross_entropy(logits, torch.tensor(labels, dtype=torch.long).reshape(-1), ignore_index=-100,
                           reduction="sum")
    loss.backward()
    return loss.item(), h.grad.numpy(), w.grad.numpy()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16, B * L, 1024])
def test_sum_count_and_hidden_gradient_match_torch(chunk, fused):
    hidden, weight, bias, labels = _case()
    ref_loss, ref_grad, _ = _torch_reference(hidden, weight, bias, labels)
    w, b = mx.array(weight), mx.array(bias)

    def f(h):
        return loss_sums(h, lambda x: x @ w.T + b, mx.array(labels), chunk=chunk, fused=fused)

    (loss, count), grad = mx.value_and_grad(f)(mx.array(hidden))
    assert count.dtype == mx.int32 and count.item() == int((labels != -100).sum())
    assert loss.dtype == mx.float32
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.array(grad), ref_grad, rtol=0, atol=1e-5)
    assert np.all(np.array(grad)[1] == 0)  # the fully ignored row gets no gradient


def test_unfused_path_also_differentiates_the_head():
    hidden, weight, bias, labels = _case(1)
    _, _, ref_weight_grad = _torch_reference(hidden, weight, bias, labels)

    def f(w):
        return loss_sums(mx.array(hidden), lambda x: x @ w.T + mx.array(bias), mx.array(labels), chunk=4,
                         fused=False)[0]

    np.testing.assert_allclose(np.array(mx.grad(f)(mx.array(weight))), ref_weight_grad, rtol=0, atol=1e-5)


def test_all_ignored_batch_gives_zero_and_no_nan():
    hidden, weight, _, labels = _case()
    labels[:] = CROSS_ENTROPY_IGNORE_INDEX
    w = mx.array(weight)

    def mean(h):
        return cross_entropy_loss(h, lambda x: x @ w.T, mx.array(labels), chunk=7)

    value, grad = mx.value_and_grad(mean)(mx.array(hidden))
    total, count = loss_sums(mx.array(hidden), lambda x: x @ w.T, mx.array(labels), chunk=7)
    assert total.item() == 0.0 and count.item() == 0 and value.item() == 0.0
    assert np.all(np.array(grad) == 0)


def test_compiled_equals_eager_and_mean_is_sum_over_count():
    hidden, weight, _, labels = _case(2)
    w, y = mx.array(weight), mx.array(labels)

    def f(h):
        total, count = loss_sums(h, lambda x: x @ w.T, y, chunk=8)
        return total, count

    eager = mx.value_and_grad(lambda h: f(h)[0])(mx.array(hidden))
    compiled = mx.compile(mx.value_and_grad(lambda h: f(h)[0]))(mx.array(hidden))
    np.testing.assert_allclose(compiled[0].item(), eager[0].item(), rtol=1e-6)
    np.testing.assert_allclose(np.array(compiled[1]), np.array(eager[1]), rtol=0, atol=1e-6)
    total, count = f(mx.array(hidden))
    mean = cross_entropy_loss(mx.array(hidden), lambda x: x @ w.T, y, chunk=8)
    assert mean.item() == pytest.approx(total.item() / count.item(), rel=1e-6)


def test_low_precision_logits_are_reduced_in_float32():
    import torch
    import torch.nn.functional as F

    hidden, weight, _, labels = _case(3)
    w16 = mx.array(weight * 8).astype(mx.bfloat16)  # large logits: a bfloat16 log-softmax would be far off
    logits16 = (mx.array(hidden).astype(mx.bfloat16).reshape(-1, D) @ w16.T)
    reference = F.cross_entropy(torch.tensor(np.array(logits16.astype(mx.float32))),
                                torch.tensor(labels.reshape(-1), dtype=torch.long), reduction="sum").item()
    total, _ = loss_sums(mx.array(hidden).astype(mx.bfloat16), lambda x: x @ w16.T, mx.array(labels), chunk=6)
    assert total.dtype == mx.float32
    np.testing.assert_allclose(total.item(), reference, rtol=1e-6, atol=1e-4)


def test_peak_memory_stays_near_one_chunk_of_logits():
    n, vocab, dim, chunk = 4096, 8000, 32, 64
    rng = np.random.default_rng(4)
    w = mx.array((rng.standard_normal((vocab, dim)) * 0.1).astype(np.float32))
    h = mx.array(rng.standard_normal((4, n // 4, dim)).astype(np.float32))
    y = mx.array(rng.integers(0, vocab, (4, n // 4)).astype(np.int32))
    grad_fn = mx.value_and_grad(lambda h: loss_sums(h, lambda x: x @ w.T, y, chunk=chunk)[0])
    mx.eval(w, h, y)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad_fn(h))
    all_logits = n * vocab * 4
    # MLX runs a few operations ahead, so a handful of chunks may overlap; all the logits must not.
    assert mx.get_peak_memory() - base < 0.3 * all_logits


def test_shift_aligns_position_t_with_label_t_plus_1():
    ids = mx.array([[10, 11, 12, 13]])
    labels = mx.array([[-100, -100, 12, 13]])
    inputs, targets = shift_for_next_token(ids, labels)
    assert inputs.tolist() == [[10, 11, 12]] and targets.tolist() == [[-100, 12, 13]]


def test_matches_transformers_causal_lm_loss_on_a_tiny_model(tiny_hf_checkpoint):
    import torch
    import transformers

    from mlx_qlora.model import load_model

    rng = np.random.default_rng(5)
    ids = rng.integers(3, 320, (2, 12)).astype(np.int32)
    labels = ids.copy()
    labels[0, :5] = CROSS_ENTROPY_IGNORE_INDEX  # a prompt
    labels[1, 9:] = CROSS_ENTROPY_IGNORE_INDEX  # padding
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long)).loss.item()

    model = load_model(tiny_hf_checkpoint)
    inputs, targets = shift_for_next_token(mx.array(ids), mx.array(labels))
    loss = cross_entropy_loss(model.hidden_states(inputs), model.logits_from_hidden, targets, chunk=5)
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)


def test_bad_shapes_and_chunk_are_refused():
    h = mx.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="labels"):
        loss_sums(h, lambda x: x, mx.zeros((2, 4), dtype=mx.int32))
    with pytest.raises(ValueError, match="chunk"):
        loss_sums(h, lambda x: x, mx.zeros((2, 3), dtype=mx.int32), chunk=0)


def test_the_backward_pass_is_not_an_array_of_the_sequence_per_chunk():
    # 64 chunks: the gradient with respect to the hidden states is a concatenation of the chunks' (their
    # slices' gradients would be 64 (B*L, D) arrays, about 13 times the hidden states' size at the peak).
    n, dim, vocab = 64 * 256, 256, 128
    hidden = mx.random.normal((1, n, dim), key=mx.random.key(0))
    weight = mx.random.normal((vocab, dim), key=mx.random.key(1)) * 0.02
    labels = mx.random.randint(0, vocab, (1, n), key=mx.random.key(2))
    mx.eval(hidden, weight, labels)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(mx.grad(lambda h: loss_sums(h, lambda x: x @ weight.T, labels, chunk=256)[0])(hidden))
    assert (mx.get_peak_memory() - base) / hidden.nbytes <= 4.0  # about 3 (MLX 0.32.4 on the CPU)
