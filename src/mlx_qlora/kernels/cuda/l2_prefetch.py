"""Blocks of a CUDA launch that only ask the GPU's L2 cache for arrays a later kernel will read.

A decoding step runs one small kernel after another; while a kernel waits on latency (attention over
the cache) or starts and drains, the memory is idle. Appending a few blocks to such a launch that issue
prefetches of the next kernel's weights (no registers, no results) lets that kernel read them from L2.

``prefix`` is the code a kernel body starts with: blocks ``WORK_BLOCKS`` and up prefetch their share of
inputs ``pf0``, ``pf1``, .. (bytes ``PF<i>_BEGIN`` to ``PF<i>_END``, template constants) and return; the others run
the body unchanged (a body must not read ``gridDim``, which the appended blocks enlarge; none of ours
does). ``HEADER`` holds the device function. Modes (``MLX_QLORA_PREFETCH``): "l2" (the
default) one ``prefetch.global.L2`` per 128-byte line, "bulk" one ``cp.async.bulk.prefetch.L2`` per 4 KB
(sm_90 and up), "0" none. Off the GPU (the CPU emulation of the tests) the prefetches compile to nothing.
What decoding prefetches: ``model/fused_decode.py``.
"""

from __future__ import annotations

import os

MODES = {"l2": 1, "bulk": 2}
# "0" turns prefetching off everywhere; BLOCKS: blocks appended to a launch that prefetches (64 measured
# slower than 32 on an H100; "bulk" too: benchmarks/RESULTS.md).
MODE = os.environ.get("MLX_QLORA_PREFETCH", "l2")
BLOCKS = int(os.environ.get("MLX_QLORA_PREFETCH_BLOCKS", "32"))

HEADER = r"""
// Thread t of n asks L2 for its share of bytes [begin, end) of p (a hint: nothing is read into registers).
// MODE 1: one prefetch per 128-byte line; 2: bulk prefetches of 4 KB (sm_90 and up).
template <int MODE>
__device__ __forceinline__ void l2_prefetch(const void* p, size_t begin, size_t end, size_t t, size_t n) {
#if defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p) + begin;
  const size_t bytes = end - begin;
  if (MODE == 2) {
#if __CUDA_ARCH__ >= 900
    for (size_t off = t * 4096; off + 16 <= bytes; off += n * 4096) {
      const unsigned size = (unsigned)((bytes - off < 4096 ? bytes - off : 4096) & ~(size_t)15);
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(c + off), "r"(size) : "memory");
    }
#endif
  } else {
    for (size_t off = t * 128; off < bytes; off += n * 128) {
      asm volatile("prefetch.global.L2 [%0];" :: "l"(c + off));
    }
  }
#endif
}
"""


def enabled() -> bool:
    if MODE != "0" and MODE not in MODES:
        raise ValueError(f"MLX_QLORA_PREFETCH={MODE!r}: expected 0, " + " or ".join(MODES))
    return MODE != "0" and BLOCKS > 0


def prefix(n_arrays: int, mode: str) -> str:
    """The start of a kernel body whose blocks from ``WORK_BLOCKS`` on prefetch ``n_arrays`` inputs."""
    if not n_arrays:
        return ""
    calls = "\n".join(f"    l2_prefetch<{MODES[mode]}>(pf{i}, PF{i}_BEGIN, PF{i}_END, t, n);" for i in range(n_arrays))
    return f"""  if (blockIdx.x >= WORK_BLOCKS) {{
    const size_t t = (size_t)(blockIdx.x - WORK_BLOCKS) * blockDim.x + threadIdx.x;
    const size_t n = (size_t)(gridDim.x - WORK_BLOCKS) * blockDim.x;
{calls}
    return;
  }}
"""


def launch(work_blocks: int, ranges: tuple[tuple[int, int], ...]) -> tuple[list[tuple[str, int]], int]:
    """A launch of ``work_blocks`` working blocks that prefetches ``ranges`` (one byte range per array; none:
    no prefetching) -> (``prefix``'s template constants, the launch's blocks: ``BLOCKS`` more with ranges)."""
    if not ranges:
        return [], work_blocks
    out = [("WORK_BLOCKS", work_blocks)]
    for i, (begin, end) in enumerate(ranges):
        out += [(f"PF{i}_BEGIN", begin), (f"PF{i}_END", end)]
    return out, work_blocks + BLOCKS


def ranges(entries) -> tuple[list, tuple[tuple[int, int], ...]]:
    """``entries``: arrays (all of it) or (array, begin, end) byte ranges -> (arrays, ranges), the empty
    ranges dropped; nothing while prefetching is off."""
    if not enabled():
        return [], ()
    full = [e if isinstance(e, tuple) else (e, 0, e.nbytes) for e in entries]
    kept = [(a, b, min(e, a.nbytes)) for a, b, e in full if min(e, a.nbytes) > b]
    return [a for a, _, _ in kept], tuple((b, e) for _, b, e in kept)
