"""The L2 prefetch blocks' plumbing (``kernels/cuda/l2_prefetch.py``): which byte ranges reach a launch, and the
code that sends the appended blocks to them. The blocks' effect on the working blocks' results is checked
by the kernel emulation (tests/kernels/test_emulated.py)."""

import mlx.core as mx

from mlx_qlora import settings
from mlx_qlora.kernels.cuda import l2_prefetch


def test_ranges_clip_to_the_array_and_drop_empty_ones():
    a, b, c = mx.zeros((16, 8), dtype=mx.uint32), mx.zeros((4,), dtype=mx.bfloat16), mx.zeros((8,))
    with settings.override(prefetch=True):
        arrays, ranges = l2_prefetch.ranges([a, (b, 0, 1 << 20), (c, 64, 64), (a, 128, 256)])
    assert [x is y for x, y in zip(arrays, (a, b, a))] == [True] * 3 and len(arrays) == 3
    assert ranges == ((0, 512), (0, 8), (128, 256))  # a whole; b clipped to its 8 bytes; c's empty range dropped


def test_nothing_is_prefetched_when_off():
    with settings.override(prefetch=False):  # MLX_QLORA_PREFETCH=0
        assert l2_prefetch.ranges([mx.zeros((8,))]) == ([], ())
    with settings.override(prefetch=True, prefetch_blocks=0):  # no blocks to append
        assert l2_prefetch.ranges([mx.zeros((8,))]) == ([], ())


def test_prefix_and_launch_name_each_array():
    code = l2_prefetch.prefix(2)
    assert "blockIdx.x >= WORK_BLOCKS" in code and code.rstrip().endswith("}")
    assert "l2_prefetch(pf0, PF0_BEGIN, PF0_END, t, n);" in code
    assert "l2_prefetch(pf1, PF1_BEGIN, PF1_END, t, n);" in code
    assert l2_prefetch.prefix(0) == ""
    assert l2_prefetch.launch(12, ((0, 512), (128, 256)), 32) == ([
        ("WORK_BLOCKS", 12), ("PF0_BEGIN", 0), ("PF0_END", 512), ("PF1_BEGIN", 128), ("PF1_END", 256)], 12 + 32)
    assert l2_prefetch.launch(12, (), 32) == ([], 12)  # nothing to prefetch: no blocks appended


def test_the_bodies_that_take_prefetch_blocks_do_not_read_the_grid_size():
    """The appended blocks enlarge ``gridDim``: a body that read it (a grid-stride loop) would skip work."""
    from mlx_qlora.kernels.cuda import attention as attention_cuda
    from mlx_qlora.kernels.cuda.qmv_source import Variant

    bodies = [attention_cuda.partial_source(0.1, 8)]
    for variant in (Variant(1, residual=True), Variant(2, swiglu=True, norm_eps=1e-5)):
        bodies += [variant.source(mma=True), variant.source()]
    bodies.append(Variant(2, swiglu=True, norm_eps=1e-5).source(stage=True))
    assert all("gridDim" not in body for body in bodies)
    assert "gridDim" in l2_prefetch.prefix(1)  # the prefetching blocks' share is by grid size
