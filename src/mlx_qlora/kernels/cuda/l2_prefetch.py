"""Blocks of a CUDA launch that only ask the GPU's L2 cache for arrays a later kernel will read.

A decoding step runs one small kernel after another; while a kernel waits on latency (attention over
the cache) or starts and drains, the memory is idle. Appending a few blocks to such a launch that issue
prefetches of the next kernel's weights (no registers, no results) lets that kernel read them from L2.

``prefix`` is the code a kernel body starts with: blocks ``WORK_BLOCKS`` and up prefetch their share of
inputs ``pf0``, ``pf1``, .. (bytes ``PF<i>_BEGIN`` to ``PF<i>_END``, template constants), one
``prefetch.global.L2`` per 128-byte line, and return; the others run the body unchanged (a body must not
read ``gridDim``, which the appended blocks enlarge; none of ours does). ``HEADER`` holds the device
function (``l2_prefetch.cu``). Settings: ``prefetch`` (on or off) and ``prefetch_blocks`` (blocks
appended to a launch). What decoding prefetches: ``model/fused_decode.py``.
"""

from __future__ import annotations

from ... import settings
from .sources import sections

HEADER = sections("l2_prefetch.cu")["header"]


def enabled() -> bool:
    """Whether launches get prefetching blocks: ``settings.prefetch`` on and ``prefetch_blocks`` > 0."""
    s = settings.current()
    return s.prefetch and s.prefetch_blocks > 0


def prefix(n_arrays: int) -> str:
    """The start of a kernel body whose blocks from ``WORK_BLOCKS`` on prefetch ``n_arrays`` inputs."""
    if not n_arrays:
        return ""
    calls = "\n".join(f"    l2_prefetch(pf{i}, PF{i}_BEGIN, PF{i}_END, t, n);" for i in range(n_arrays))
    return f"""  if (blockIdx.x >= WORK_BLOCKS) {{
    const size_t t = (size_t)(blockIdx.x - WORK_BLOCKS) * blockDim.x + threadIdx.x;
    const size_t n = (size_t)(gridDim.x - WORK_BLOCKS) * blockDim.x;
{calls}
    return;
  }}
"""


def launch(work_blocks: int, ranges: tuple[tuple[int, int], ...], blocks: int) -> tuple[list[tuple[str, int]], int]:
    """A launch of ``work_blocks`` working blocks that prefetches ``ranges`` (one byte range per array; none:
    no prefetching) with ``blocks`` appended blocks -> (``prefix``'s template constants, the launch's blocks)."""
    if not ranges:
        return [], work_blocks
    out = [("WORK_BLOCKS", work_blocks)]
    for i, (begin, end) in enumerate(ranges):
        out += [(f"PF{i}_BEGIN", begin), (f"PF{i}_END", end)]
    return out, work_blocks + blocks


def ranges(entries) -> tuple[list, tuple[tuple[int, int], ...]]:
    """``entries``: arrays (all of it) or (array, begin, end) byte ranges -> (arrays, ranges), the empty
    ranges dropped; nothing while prefetching is off (``enabled``)."""
    if not enabled():
        return [], ()
    full = [e if isinstance(e, tuple) else (e, 0, e.nbytes) for e in entries]
    kept = [(a, b, min(e, a.nbytes)) for a, b, e in full if min(e, a.nbytes) > b]
    return [a for a, _, _ in kept], tuple((b, e) for _, b, e in kept)
