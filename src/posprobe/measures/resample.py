"""The bootstrap over images that every readout-free measure shares, done on per-image statistics.

A measure that is a ratio of sums over images (and, for the position variance, over pairs of images) can be
recomputed for a bootstrap resample from a few per-image numbers, without touching the features again: a
resample is a vector of counts k (N,), sum N, and each sum over images becomes a k-weighted sum. The resamples
are seeded and drawn exactly as ``intervals.bootstrap`` draws its image indices, in chunks of resamples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..intervals import LEVEL, RESAMPLES


def resample_counts(
    n: int, resamples: int = RESAMPLES, seed: int = 0, chunk: int | None = None
) -> Iterator[torch.Tensor]:
    """Seeded bootstrap resamples of n images as counts, (r, n) float64 per chunk, rows summing to n."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(n, (resamples, n), generator=gen)  # (R, n) image indices, as intervals.bootstrap draws
    chunk = chunk or max(1, (1 << 22) // max(n, 1))  # (r, n) counts: ~32 MB of float64
    for i in range(0, resamples, chunk):
        idx = rows[i : i + chunk]
        counts = torch.zeros(idx.shape[0], n, dtype=torch.float64)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        yield counts


def percentile_interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The (lo, hi) percentile interval of bootstrap replicates (linear interpolation, as intervals.bootstrap)."""
    v = values.double()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()):
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo, hi = torch.quantile(v, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi


def total_variance(counts: torch.Tensor, within: torch.Tensor, means: torch.Tensor, locations: int) -> torch.Tensor:
    """Sum over channels of each channel's variance over the images and locations of each resample, (r,);
    counts (r, N) need not sum to N (a resample of groups of images).

    within (N,): per image, the sum over channels and locations of the squared deviations from that image's own
    channel means; means (N, C): each image's channel means. The variance splits into the mean within-image part
    and the variance of the image means (the means are centred first: no cancellation between large raw moments).
    """
    weight = counts.sum(1)  # (r,) images in each resample (N, unless groups of images are resampled)
    centred = means - means.mean(0)  # the variance is shift-invariant; (N, C)
    inside = counts @ within / (weight * locations)  # (r,)
    between = counts @ centred.pow(2).sum(1) / weight - (counts @ centred / weight[:, None]).pow(2).sum(1)  # (r,)
    return inside + between
