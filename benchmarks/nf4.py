"""bitsandbytes' NF4 (4-bit NormalFloat, Dettmers et al. 2023) in numpy, as the reference peer for our 4-bit
formats: a block of ``block`` consecutive weights is divided by its absolute maximum and each value is
replaced by the nearest of 16 fixed levels; the levels are quantiles of N(0, 1) scaled to [-1, 1].

The levels are built here from that definition (``nf4_levels``), as the paper's ``create_normal_map`` does:
8 positive quantiles at probabilities evenly spaced from 0.5 to ``OFFSET`` (the last one dropped), 7
negative ones from 0.5 to ``OFFSET`` mirrored, and an exact zero, all divided by the largest.
``OFFSET = 0.9677083`` is the paper's: the mean of the 1 - 1/(2*15) and 1 - 1/(2*16) quantile positions.

The absmax is kept in float32 (bitsandbytes' plain NF4: 4.5 bits per weight at block 64; its "double
quantization" stores it in 8 bits, 4.127 bits per weight, at a further small error not modelled here).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

OFFSET = 0.9677083


def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels, ascending, from -1 to 1 with an exact 0."""
    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(OFFSET, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(OFFSET, 0.5, 8)[:-1]]
    levels = np.array(sorted(positive + negative + [0.0]))
    return levels / np.abs(levels).max()


def nf4_roundtrip(w: np.ndarray, block: int = 64) -> np.ndarray:
    """``w`` (out, in) through NF4 with one float32 absmax per ``block`` consecutive weights of a row."""
    out_features, in_features = w.shape
    blocks = w.astype(np.float32).reshape(out_features, in_features // block, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = blocks / np.where(absmax > 0, absmax, 1.0)
    levels = nf4_levels().astype(np.float32)
    index = np.abs(normed[..., None] - levels).argmin(-1)
    return (levels[index] * absmax).reshape(out_features, in_features)
