"""Data parallelism over the ranks of ``mx.distributed``: who this process is, and the collective sums.

Every rank holds the same model and adapters and reads its own rows of every global batch (see
``BatchIterator``'s ``rank`` / ``world_size``). A rank's micro-batch returns the *sums* of its token
losses and of their gradients, and its number of learned tokens; the step adds these over the ranks
with ``mx.distributed.all_sum`` and divides once by the total count, so N ranks with their shards of a
global batch take the same step as one process with the whole batch (up to float rounding).

The transport is MLX's: the ring backend over TCP (Macs, Linux CPUs), NCCL on CUDA GPUs, MPI, JACCL.
``mx.distributed.init()`` with no launcher around returns a group of size 1; then nothing here
communicates and a run behaves exactly as a single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class World:
    """This process's place among the ranks.

    ``group`` is the ``mx.distributed.Group`` (None for a lone process, or in tests that only need
    ``rank`` and ``size`` and make no collective call).
    """

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files, the logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ---- collectives: every rank must make the same calls in the same order --------------------

    def all_sum(self, x: mx.array) -> mx.array:
        """The element-wise sum of ``x`` over the ranks (``x`` itself for one rank)."""
        if not self.distributed:
            return x
        return mx.distributed.all_sum(x, group=self.group)

    def gather(self, values: Sequence[float]) -> np.ndarray:
        """Every rank's ``values`` (k floats): a float array (size, k), row r from rank r."""
        local = mx.array(np.asarray(values, dtype=np.float32).reshape(1, -1))  # (1, k)
        if not self.distributed:
            return np.array(local)
        return np.array(mx.distributed.all_gather(local, group=self.group))  # (size, k)

    def sum_exact(self, values: Sequence[float]) -> list[float]:
        """Sums over the ranks of k Python floats, in float64 whatever the backend supports: each value
        travels as two float32 parts (high and low) in one all_gather, and the parts are added here."""
        if not self.distributed:
            return [float(v) for v in values]
        high = np.asarray(values, dtype=np.float64).astype(np.float32)
        low = (np.asarray(values, dtype=np.float64) - high).astype(np.float32)
        table = self.gather(np.concatenate([high, low])).astype(np.float64)  # (size, 2k)
        k = len(high)
        return [float(v) for v in table[:, :k].sum(axis=0) + table[:, k:].sum(axis=0)]

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag made true when it is true on at least one rank (one collective for all of them), so
        that every rank takes the same decision, e.g. to stop after this step."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        votes = self.all_sum(mx.array([1 if f else 0 for f in flags], dtype=mx.int32))  # (n_flags,)
        return tuple(bool(v > 0) for v in np.array(votes))


def init_world(backend: str = "any") -> World:
    """Join the ranks started by ``mlx.launch`` (or by ``MLX_RANK`` / ``MLX_HOSTFILE`` and the like).

    Without a launcher this returns ``World(rank=0, size=1)``: a single process.
    """
    group = mx.distributed.init(strict=False, backend=backend)
    return World(rank=group.rank(), size=group.size(), group=group if group.size() > 1 else None)


def all_sum_step(world: World, grad_sums: dict[str, mx.array], loss_sum: mx.array, n_learned: mx.array,
                 real_tokens: int) -> tuple[dict[str, mx.array], mx.array, mx.array, int]:
    """Sum one optimizer step's local sums over the ranks.

    Args:
        grad_sums: flat gradients of this rank's summed token losses, by parameter path (any shapes).
        loss_sum: () float, this rank's summed token losses; n_learned: () int, its learned tokens.
        real_tokens: this rank's non-padding tokens.

    Returns the same four, summed over all ranks. The gradients and the loss travel in one float32
    buffer (one all_sum), the two counts in one int32 buffer, so counts stay exact at any size.
    """
    if not world.distributed:
        return grad_sums, loss_sum, n_learned, real_tokens
    keys = list(grad_sums)
    shapes = [grad_sums[k].shape for k in keys]
    dtypes = [grad_sums[k].dtype for k in keys]
    flat = [grad_sums[k].astype(mx.float32).reshape(-1) for k in keys] + [loss_sum.astype(mx.float32).reshape(1)]
    total = world.all_sum(mx.concatenate(flat))  # (n_params + 1,)
    counts = world.all_sum(mx.stack([n_learned.astype(mx.int32), mx.array(real_tokens, dtype=mx.int32)]))  # (2,)
    sizes = [int(np.prod(s)) for s in shapes]
    pieces = mx.split(total, list(np.cumsum(sizes))) if sizes else [total]
    summed = {k: p.reshape(s).astype(d) for k, p, s, d in zip(keys, pieces[:-1], shapes, dtypes)}
    mx.eval(summed, pieces[-1], counts)
    return summed, pieces[-1].reshape(()), counts[0], int(counts[1].item())


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank`` for a step whose rank-0 seed is ``seed``: rank 0 keeps ``seed`` (so one
    process draws what it always drew), other ranks get independent dropout masks for their rows."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint64)[0] % (2**63))


def check_same_everywhere(world: World, what: dict[str, float]) -> Optional[str]:
    """Compare ``what`` (name -> number) across ranks; the first name that differs, with every rank's
    value, or None when all agree (every rank gets the same answer, so all can raise together)."""
    if not world.distributed:
        return None
    names = list(what)
    table = world.gather([float(what[n]) for n in names])  # (size, k)
    for j, name in enumerate(names):
        if not np.all(table[:, j] == table[0, j]):
            values = ", ".join(f"rank {r}: {_number(table[r, j])}" for r in range(world.size))
            return f"{name} differs between ranks ({values})"
    return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
