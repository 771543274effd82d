"""Uncertainty of every reported score: bootstrap intervals over test images and seeds, and the paired test
behind each direction verdict.

A score is a mean over test images of a readout trained with one seed, or over several seeds. Both are
samples: other images, or another initialisation and batch order, would give another number. The interval
resamples both at once (a two-way bootstrap: seeds with replacement, images with replacement, the mean of
the resampled grid), so it is as wide as either source of variation makes it. With a few seeds the seed part
cannot reach beyond the seeds observed, so the interval is somewhat narrower than 95% would need: read
verdicts from 3 seeds as the demo's budget allows, and use 5 or more where a direction matters. With one seed it is the
ordinary bootstrap over images; with one image (a synthetic input) it is over seeds alone; with one of each
there is no interval (NaN), and nothing is claimed from such a cell.

A direction of the paper ("SPC rises along a -> b -> c") is tested step by step on the *paired*
differences b - a (same test images, same seeds), so the spread shared by both cells cancels:
a step is *up* when its 95% interval lies above 0, *down* when below, *unresolved* otherwise, and
*unconverged* when a readout of either cell did not finish training in some seed (convergence.py): its score then
measures the optimiser, not the features, and decides nothing. The direction is **reproduced** when every
step is up, **not reproduced** when a step is down, **inconclusive** otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LEVEL = 0.95
RESAMPLES = 2000
# Seeds whose mean SPCs differ by more than this (std across seeds) measured the optimiser's luck as much as the
# features: such a cell is marked, since its training, although finished by convergence.RULE, has not settled.
SEED_SPREAD_LIMIT = 0.03

TEST = (
    f"each step's mean SPC difference (same images, same seeds) with a {LEVEL:.0%} two-way bootstrap "
    f"interval over test images and seeds ({RESAMPLES:,} resamples); a step is up when the interval lies above "
    "0, down when below, unresolved otherwise, and decides nothing when a readout of either cell did not finish "
    "in some seed; reproduced = every step up, not reproduced = a step down, inconclusive = otherwise"
)


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval."""

    mean: float
    lo: float
    hi: float

    def __str__(self) -> str:
        if math.isnan(self.lo):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _as_grid(values: torch.Tensor) -> torch.Tensor:
    """(N,) per-image values of one seed or (S, N) of several -> (S, N) float64."""
    v = values.detach().double().cpu()
    return v[None] if v.dim() == 1 else v


def _resample_means(grids: list[torch.Tensor], resamples: int, seed: int) -> torch.Tensor:
    """(resamples, k): the mean of each of k same-shaped (S, N) grids under the same two-way resamples, so that
    statistics of several grids keep their pairing (the same seeds and images in every grid)."""
    s, n = grids[0].shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(s, (resamples, s), generator=gen) if s > 1 else torch.zeros(resamples, 1, dtype=torch.long)
    cols = torch.randint(n, (resamples, n), generator=gen) if n > 1 else torch.zeros(resamples, 1, dtype=torch.long)
    chunk = max(1, (1 << 22) // (rows.shape[1] * cols.shape[1]))  # resamples per pass: ~32 MB of float64
    out = []
    for grid in grids:
        out.append(
            torch.cat(
                [
                    grid[rows[i : i + chunk, :, None], cols[i : i + chunk, None, :]].mean((1, 2))  # (r, S', N')
                    for i in range(0, resamples, chunk)
                ]
            )
        )
    return torch.stack(out, dim=1)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi


def bootstrap(values: torch.Tensor, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Mean of (S, N) seed x image values (or (N,)) and its two-way percentile bootstrap interval.

    Seeded, so the same values always get the same interval.
    """
    grid = _as_grid(values)  # (S, N)
    s, n = grid.shape
    mean = float(grid.mean())
    if s * n == 0 or not math.isfinite(mean) or s * n == 1:
        return Interval(mean, math.nan, math.nan)
    return Interval(mean, *_percentiles(_resample_means([grid], resamples, seed)[:, 0], level))


def paired_statistic(
    values: Sequence[torch.Tensor],
    statistic: Callable[[torch.Tensor], torch.Tensor],
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """``statistic`` of the means of several paired score grids (each (S, N) or (N,): the same seeds and images),
    with the two-way bootstrap interval that resamples the same seeds and images in all of them.

    ``statistic`` maps (R, k) means (R resamples, or 1 for the point estimate; k grids) to (R,): e.g. selectivity
    ``m[:, 0] - m[:, 1:].max(1)``, whose interval a per-grid bootstrap could not give.
    """
    grids = [_as_grid(v) for v in values]
    if any(g.shape != grids[0].shape for g in grids):
        raise ValueError(f"paired scores need the same seeds and images; got {[tuple(g.shape) for g in grids]}")
    point = float(statistic(torch.stack([g.mean() for g in grids])[None])[0])
    s, n = grids[0].shape
    if s * n <= 1 or not math.isfinite(point):
        return Interval(point, math.nan, math.nan)
    return Interval(point, *_percentiles(statistic(_resample_means(grids, resamples, seed)), level))


def step_direction(before: torch.Tensor, after: torch.Tensor) -> tuple[str, Interval]:
    """'up', 'down' or 'unresolved' for the paired difference after - before, with its interval."""
    a, b = _as_grid(before), _as_grid(after)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same seeds and images; got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = bootstrap(b - a)
    if diff.lo > 0:
        return "up", diff
    if diff.hi < 0:
        return "down", diff
    return "unresolved", diff


def verdict(steps: list[str]) -> str:
    """'reproduced', 'not reproduced' or 'inconclusive' from the steps of one direction."""
    if any(s == "down" for s in steps):
        return "not reproduced"
    if steps and all(s == "up" for s in steps):
        return "reproduced"
    return "inconclusive"
