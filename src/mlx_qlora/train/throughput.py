"""When a training step was done, as the host can tell, so that logged tokens/s windows are right when steps
overlap.

With ``overlap_steps`` the loop queues step k+1 before it reads step k's loss. Queueing may itself wait on
the device: with gradient accumulation each micro-batch is evaluated before the next one is built, and on
CUDA a bounded run-ahead (``run_ahead.py``) blocks the host once enough work is in flight. Then step k has
run by the time its loss is read, and the host was waiting inside the queueing of step k+1 when k ended.
Timing each window from the moment a loss is read shifts every window by one step's work: harmless in
the middle of a run (each window still holds one step's time per step), but the last step of a run (or
the step before an evaluation or a save, after which nothing is queued) is then read with only its own
tail left to run, and its window logged many times the real rate.

``step_done_at`` picks, for each step, a moment that sits at the same place in the pipeline either way:
where queueing the next step took longer than waiting for this one (the host waited on the device while
queueing, so this step ended during it), the moment that queueing began, which is when the previous
window's work was as good as done; otherwise (queueing returned at once and the read waited) the moment
the read returned. A step with nothing queued after it is done when its read returns.
"""

from __future__ import annotations


def step_done_at(queue_start: float, finish_start: float, finish_end: float, queued_next: bool) -> float:
    """The host's best moment for "this step is done" (seconds on one clock).

    queue_start: when queueing the next step began (or would have); finish_start / finish_end: when
    reading this step's results began and returned; queued_next: whether a next step was queued between
    queue_start and finish_start."""
    if queued_next and finish_start - queue_start > finish_end - finish_start:
        return queue_start
    return finish_end
