"""Next-token cross-entropy over learned positions, computing the logits a chunk at a time.

A position is learned when its label is not ``CROSS_ENTROPY_IGNORE_INDEX`` (-100). The training loss of
a step is ``sum of token losses / number of learned tokens`` over the whole effective batch (all
micro-batches of the step), so ``loss_sums`` returns the two parts and the caller divides once: k
accumulated micro-batches then give exactly the loss and gradient of one batch k times larger.

Memory: the logits of a batch (B * L * vocab floats) are the largest array of a LoRA step. They are
computed for ``chunk`` positions at a time, one chunk after the other, and each chunk's gradient with
respect to its hidden states is computed right away (the fused path), so at most one chunk's (chunk, V)
float32 logits and their gradient are live at a time, in the forward and in the backward pass.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from ..data.constants import CROSS_ENTROPY_IGNORE_INDEX
from ..model.split import split


def shift_for_next_token(inputs: mx.array, labels: mx.array) -> tuple[mx.array, mx.array]:
    """Align inputs with next-token targets: ``(inputs[:, :-1], labels[:, 1:])``.

    inputs: (B, L, ...) token ids or hidden states; labels: (B, L) with ``labels[b, t]`` the label of
    token t. After the shift, position t of the inputs predicts ``labels[:, 1:][b, t]``.
    """
    return inputs[:, :-1], labels[:, 1:]


def _token_losses(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """logits (n, V) float32, targets (n,) -> (loss_sum, learned (n,), safe targets (n,), logsumexp (n,))."""
    learned = targets != CROSS_ENTROPY_IGNORE_INDEX  # (n,)
    safe = mx.where(learned, targets, 0)  # any valid index where ignored; masked out below
    lse = mx.logsumexp(logits, axis=-1)  # (n,)
    target_logits = mx.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]  # (n,)
    return mx.sum(mx.where(learned, lse - target_logits, 0.0)), learned, safe, lse


def _plain_chunk(lm_head_fn: Callable[[mx.array], mx.array]) -> Callable:
    """``(hidden (n, D), targets (n,)) -> (loss_sum, loss_sum)``, differentiated by MLX itself (the backward
    pass keeps every chunk's logits, and gradients reach the parameters ``lm_head_fn`` reads)."""

    def chunk_loss(hidden: mx.array, targets: mx.array):
        logits = lm_head_fn(hidden).astype(mx.float32)  # (n, V)
        loss_sum = _token_losses(logits, mx.stop_gradient(targets))[0]
        return loss_sum, loss_sum

    return chunk_loss


def _fused_chunk(lm_head_fn: Callable[[mx.array], mx.array]) -> Callable:
    """``(hidden (n, D), targets (n,)) -> (loss_sum, d loss_sum / d hidden (n, D))``, the gradient computed
    in the forward pass while the chunk's logits exist, so nothing of size (n, V) outlives the chunk.

    d loss_sum / d logits = softmax(logits) - onehot(target) on learned rows; it is pulled back through
    ``lm_head_fn`` (``mx.vjp``) and the rows of ignored positions are zeroed afterwards (the head acts on
    each position separately). The backward pass only scales the stored gradient.
    """

    @mx.custom_function
    def chunk_loss(hidden: mx.array, targets: mx.array):
        raw = lm_head_fn(hidden)  # (n, V) in the compute dtype
        logits = raw.astype(mx.float32)
        loss_sum, learned, safe, lse = _token_losses(logits, targets)
        vocab = mx.arange(logits.shape[-1], dtype=safe.dtype)  # (V,)
        d_logits = mx.exp(logits - lse[:, None]) - (vocab[None, :] == safe[:, None])  # (n, V)
        _, (d_hidden,) = mx.vjp(lm_head_fn, [hidden], [d_logits.astype(raw.dtype)])  # (n, D)
        return loss_sum, d_hidden * learned[:, None].astype(d_hidden.dtype)

    @chunk_loss.vjp
    def chunk_loss_vjp(primals, cotangents, outputs):
        hidden, targets = primals
        return (outputs[1] * cotangents[0]).astype(hidden.dtype), mx.zeros_like(targets)

    return chunk_loss


def loss_sums(
    hidden: mx.array,
    lm_head_fn: Callable[[mx.array], mx.array],
    labels: mx.array,
    chunk: int = 1024,
    fused: bool = True,
) -> tuple[mx.array, mx.array]:
    """Sum and count of the cross-entropy over positions whose label is not -100.

    hidden: (B, L, D) final hidden states (already aligned with ``labels``; see ``shift_for_next_token``).
    lm_head_fn: (n, D) -> (n, V) logits (e.g. ``model.logits_from_hidden``); they are cast to float32.
    labels: (B, L) integer targets in [0, V), -100 where nothing is learned.
    chunk: positions (of the flattened B * L) whose logits are computed together.
    fused: compute each chunk's gradient w.r.t. ``hidden`` in the forward pass (see the module docstring).
    Gradients then reach ``hidden`` only: parameters that ``lm_head_fn`` reads are treated as constants,
    which is right for the frozen head of LoRA training. ``fused=False`` lets MLX differentiate everything
    (the head too) at the price of keeping every chunk's logits for the backward pass. Both paths give
    the same values and the same gradient w.r.t. ``hidden``; the fused one also computes that gradient
    when only the value is used (about one more head matmul per evaluation).

    Returns ``(loss_sum, n_learned)``: a float32 scalar and an int32 scalar. An all-ignored batch gives (0, 0).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch, length, dim = hidden.shape
    if tuple(labels.shape) != (batch, length):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {(batch, length)}")
    n = batch * length
    flat_hidden = hidden.reshape(n, dim)  # (B*L, D)
    flat_labels = labels.reshape(n).astype(mx.int32)  # (B*L,)
    chunk_loss = _fused_chunk(lm_head_fn) if fused else _plain_chunk(lm_head_fn)
    total, previous = mx.array(0.0, dtype=mx.float32), None
    # split, not slices: the backward pass then concatenates the chunks' gradients instead of summing one
    # (B*L, D) array per chunk
    cuts = list(range(chunk, n, chunk))
    for start, chunk_hidden in zip(range(0, n, chunk), split(flat_hidden, cuts, axis=0)):  # (n_chunk, D)
        if previous is not None:
            # Start a chunk only once the previous one is finished: MLX would otherwise evaluate the
            # independent chunks side by side and hold all their logits at once.
            chunk_hidden = mx.depends(chunk_hidden, [total, previous])
        loss_sum, previous = chunk_loss(chunk_hidden, flat_labels[start:start + chunk])
        total = total + loss_sum
    n_learned = mx.sum(flat_labels != CROSS_ENTROPY_IGNORE_INDEX).astype(mx.int32)
    return total, n_learned


def cross_entropy_loss(
    hidden: mx.array,
    lm_head_fn: Callable[[mx.array], mx.array],
    labels: mx.array,
    chunk: int = 1024,
    fused: bool = True,
) -> mx.array:
    """Mean cross-entropy over the learned positions of one batch (0 when none is learned).

    Shapes as in ``loss_sums``. For gradient accumulation use ``loss_sums`` and divide by the count of the
    whole effective batch instead.
    """
    total, count = loss_sums(hidden, lm_head_fn, labels, chunk=chunk, fused=fused)
    return total / mx.maximum(count, 1).astype(mx.float32)
