"""The moment a step counts as done, on a simulated pipeline: a device that runs steps of equal length back
to back, a host that queues step k+1 before reading step k, either waiting inside the queueing (gradient
accumulation, bounded run-ahead) or not. Every logged window must then hold one step's time per step,
including the last step, after which nothing is queued."""

from __future__ import annotations

import pytest

from mlx_qlora.train.throughput import step_done_at


def _simulate(steps: int, device_s: float, host_s: float, micro_batches: int, blocking: bool):
    """Each step's (queue_start, finish_start, finish_end, queued_next), as the training loop times them.

    The device runs a step in ``device_s``; the host needs ``host_s`` to build one. Blocking: the host
    evaluates each micro-batch but the last before building the next (queueing returns once the step's
    first ``micro_batches - 1`` parts have run)."""
    clock, device_free = 0.0, 0.0
    ends = {}

    def queue(k):
        nonlocal clock, device_free
        clock += host_s
        start = max(device_free, clock)
        ends[k] = device_free = start + device_s
        if blocking:
            clock = max(clock, start + device_s * (micro_batches - 1) / micro_batches)

    queue(1)
    timings = []
    for k in range(1, steps + 1):
        queue_start = clock
        if k < steps:
            queue(k + 1)
        finish_start = clock
        clock = max(clock, ends[k])
        timings.append((queue_start, finish_start, clock, k < steps))
    return timings


@pytest.mark.parametrize("blocking,micro_batches,host_s", [(True, 4, 0.05), (True, 2, 0.2), (False, 1, 0.1),
                                                          (False, 4, 0.3)])
def test_every_window_after_the_first_holds_one_step_of_device_time(blocking, micro_batches, host_s):
    device_s = 1.0
    timings = _simulate(8, device_s, host_s, micro_batches, blocking)
    done = [step_done_at(*t) for t in timings]
    windows = [b - a for a, b in zip(done, done[1:])]
    # blocking: each boundary sits where the last micro-batch of a step begins, so the window that ends
    # with the last step (read when it has run) is longer by that micro-batch
    tolerance = device_s / micro_batches if blocking else 1e-9
    for w in windows:
        assert abs(w - device_s) <= tolerance + 1e-9, windows


def test_reading_the_loss_alone_would_log_the_last_step_many_times_too_fast():
    """The rule this module replaces: windows from the moment each loss was read."""
    timings = _simulate(8, 1.0, 0.05, 4, blocking=True)
    reads = [t[2] for t in timings]
    assert reads[-1] - reads[-2] <= 0.25 + 1e-9  # a quarter of the step: four times the rate
