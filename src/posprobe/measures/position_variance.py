"""The position-variance fraction: how much of a level's feature variance is tied to where a location is.

For one tapped level, N images and features X (N, C, h, w), L = h*w, let d_n = X_n - mean_ij X_n be image n's
features with each channel centred on its own spatial mean, so the image's overall brightness or content level
does not count as position. Per channel c:

- total variance V_tot(c) = mean over n, i, j of (X - the channel's grand mean)^2;
- raw position variance V_pos(c) = mean_ij (mean_n d_n(c, ij))^2: the spatial variance of the per-location mean
  over images, i.e. what every image has in common at each location;
- PVF(c) = V_pos(c) / V_tot(c); a level's PVF = sum_c V_pos / sum_c V_tot (channels weighted by their variance).

V_pos is biased upwards at small N: the mean over images keeps 1/N of the image-to-image noise, so
E[V_pos] = true + mean_ij Var(d(ij)) / N. Pure noise then reads as PVF ~ 1/N. The unbiased estimator drops the
pairs of an image with itself from ||sum_n d_n||^2 = sum_{n, n'} <d_n, d_n'>:

    V_pos_u(c) = (||sum_n d_n(c)||^2 - sum_n ||d_n(c)||^2) / (N (N-1) L),

a U-statistic over pairs of distinct images, whose every term has expectation <E d, E d> when images are
independent, whatever the spatial correlation within an image: it is exact for i.i.d. images. It can be slightly
negative (noise, nothing systematic) and is reported as it is. A dead channel (V_tot = 0) has PVF NaN, is counted
as dead and adds 0 to both of the level's sums.

The 95% interval resamples images, exactly and without re-reading the features, from sums gathered in the same
single pass: the Gram matrix G[n, n'] = sum_c <d_n(c), d_n'(c)> (N x N), each image's channel means and its
within-image sum of squares (G's diagonal). For counts k (N,) of a resample, sum_c V_pos = k^T G k / (N^2 L) (the
plug-in bootstrap of the raw value), and the total variance is its k-weighted decomposition (resample.py).

The U-statistic of a resample counts the pairs of *distinct images*: (k^T G k - sum_n k_n^2 G[n, n]) /
((N^2 - sum_n k_n^2) L). A duplicated image's copies are the same image, not independent draws, so their pairs are
dropped as the self-pairs are (a resample with one distinct image has no pair and is left out). The plain plug-in
that keeps them, (k^T G k - sum_n k_n G[n, n]) / (N (N-1) L), is unbiased for the *raw* value of the sample, so its
replicates centre on PVF_raw, not PVF_u: on pure noise (N = 64, C*L = 2048) its interval lies around 1/N, many
standard errors away from both the estimate and the truth, 0 (tests/test_measures.py checks both: the distinct-image
interval covers 0, the plain one lies above it).
Measured over 100 draws of N = 64: with a position pattern (true PVF .082) the interval covered the truth 94 times
and its width matched the estimate's spread; on pure noise (PVF 0, where the U-statistic is degenerate) it
covered 0 every time and was about twice as wide as the spread: conservative there. The raw value's plug-in
replicates carry its bias once more, so its interval sits about one bias above it (~1/N of the within-image share):
read PVF_raw as the naive estimate beside PVF_u, not for inference.

Images that are not independent (the bundled training set's 8 crops of each photo, the rolls of one image) are
*groups* (``groups``: a label per image, ``data.image_group`` of its id): the U-statistic then keeps only pairs of
images from different groups, and the bootstrap resamples groups, so overlapping crops of one photo neither count
as agreeing on position nor narrow the interval. The Gram matrix gives both exactly (group sums of its blocks).
Without groups every image is its own.

Cost: one pass over the level, O(N^2 C L) for the Gram matrix (float64; 312 images of VGG16 at 28x28 take a few
seconds on 2 cores) and N^2 * 8 bytes to hold it; chunks of the features converted to float64 stay under
``max_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PosprobeError
from ..intervals import RESAMPLES, Interval
from .resample import percentile_interval, resample_counts, total_variance

MAX_BYTES = 256 * 2**20  # float64 features held at once


@dataclass(frozen=True)
class PositionVariance:
    """A level's position-variance fraction (unbiased ``pvf`` and ``pvf_raw``, each with its 95% interval over
    images), per-channel values, and where over the map the position variance sits (``position_energy``)."""

    level: str
    n_images: int
    channels: int
    size: tuple[int, int]
    pvf: Interval  # unbiased: sum_c V_pos_u / sum_c V_tot
    pvf_raw: Interval  # sum_c V_pos / sum_c V_tot, biased upward by ~1/N of the image-to-image variance
    pvf_channels: np.ndarray  # (C,) V_pos_u(c) / V_tot(c); NaN for dead channels
    pvf_raw_channels: np.ndarray  # (C,)
    dead_channels: int
    total_variance: float  # sum_c V_tot(c)
    position_variance: float  # sum_c V_pos_u(c)
    position_variance_raw: float  # sum_c V_pos(c)
    position_energy: np.ndarray  # (h, w) sum_c (mean_n d_n(c, ij))^2 / sum_c V_tot; its mean over ij is pvf_raw
    mean_map: np.ndarray  # (h, w) mean over images and live channels of each channel standardised by its total std

    @property
    def reference_std(self) -> float:
        """The RMS over channels of each channel's total standard deviation: one unit of natural variation."""
        return math.sqrt(self.total_variance / self.channels)

    def to_dict(self) -> dict:
        """Everything, JSON-able: NaN as null, per-channel values and maps as lists."""
        return {
            "level": self.level,
            "n_images": self.n_images,
            "channels": self.channels,
            "size": list(self.size),
            "pvf": _finite(self.pvf.mean),
            "pvf_lo": _finite(self.pvf.lo),
            "pvf_hi": _finite(self.pvf.hi),
            "pvf_raw": _finite(self.pvf_raw.mean),
            "pvf_raw_lo": _finite(self.pvf_raw.lo),
            "pvf_raw_hi": _finite(self.pvf_raw.hi),
            "dead_channels": self.dead_channels,
            "total_variance": self.total_variance,
            "position_variance": self.position_variance,
            "position_variance_raw": self.position_variance_raw,
            "pvf_channels": [_finite(v) for v in self.pvf_channels.tolist()],
            "pvf_raw_channels": [_finite(v) for v in self.pvf_raw_channels.tolist()],
            "position_energy": self.position_energy.tolist(),
            "mean_map": [[_finite(v) for v in row] for row in self.mean_map.tolist()],
        }


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass
class _Sums:
    """What one pass over a level gathers (float64)."""

    gram: torch.Tensor | None  # (N, N) sum_c <d_n(c), d_n'(c)>
    means: torch.Tensor  # (N, C) each image's channel means
    within: torch.Tensor  # (N, C) sum_ij d_n(c, ij)^2
    pooled: torch.Tensor  # (C,) ||sum_n d_n(c)||^2
    grouped: torch.Tensor  # (C,) sum over groups g of ||sum_{n in g} d_n(c)||^2 (singleton groups: sum_n ||d_n||^2)
    total: torch.Tensor  # (C,) V_tot(c), exactly 0 for dead channels
    dead: torch.Tensor  # (C,) bool: the channel is constant over images and locations
    energy: torch.Tensor  # (L,) sum_c (mean_n d_n(c, ij))^2
    standardised: torch.Tensor  # (L,) sum over live c of mean_n d_n(c, ij) / sqrt(V_tot(c))


def _one_pass(x: torch.Tensor, scale: float, max_bytes: int, device: str, gram: bool, group: torch.Tensor) -> _Sums:
    """Every sum the measure needs, over chunks of channels that hold all N images (G needs every pair);
    ``group`` (N,) is each image's group index 0..B-1."""
    n, c, h, w = x.shape
    loc = h * w
    f64 = dict(dtype=torch.float64, device=device)
    n_groups = int(group.max()) + 1
    group = group.to(device)
    sums = _Sums(
        torch.zeros(n, n, **f64) if gram else None,
        torch.empty(n, c, **f64),
        torch.empty(n, c, **f64),
        torch.empty(c, **f64),
        torch.empty(c, **f64),
        torch.empty(c, **f64),
        torch.empty(c, dtype=torch.bool, device=device),
        torch.zeros(loc, **f64),
        torch.zeros(loc, **f64),
    )
    step = max(1, max_bytes // (n * loc * 8))
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        chunk = x[:, c0:c1].to(memory_format=torch.contiguous_format, copy=True, **f64)  # never the caller's tensor
        chunk = chunk.view(n, c1 - c0, loc)  # (N, k, h, w) -> (N, k, L)
        if scale != 1.0:
            chunk.mul_(scale)
        dead = chunk.amax((0, 2)) == chunk.amin((0, 2))
        m = chunk.mean(2)  # (N, k)
        chunk.sub_(m[..., None])  # d_n(c, ij)
        within = torch.linalg.vector_norm(chunk, dim=2).pow(2)  # (N, k)
        pooled = chunk.sum(0)  # (k, L) sum_n d_n(c, ij)
        total = within.sum(0) / (n * loc) + (m - m.mean(0)).pow(2).mean(0)  # within-image + between-image means
        total[dead] = 0.0
        if sums.gram is not None:
            d = chunk.reshape(n, (c1 - c0) * loc)  # (N, k*L)
            sums.gram.addmm_(d, d.T)
        sums.means[:, c0:c1], sums.within[:, c0:c1], sums.dead[c0:c1], sums.total[c0:c1] = m, within, dead, total
        sums.pooled[c0:c1] = pooled.pow(2).sum(1)
        by_group = torch.zeros(n_groups, c1 - c0, loc, **f64).index_add_(0, group, chunk)  # (B, k, L)
        sums.grouped[c0:c1] = by_group.pow(2).sum((0, 2))
        sums.energy += (pooled / n).pow(2).sum(0)
        live = ~dead
        sums.standardised += (pooled[live] / (n * total[live].sqrt()[:, None])).sum(0)
    return sums


def position_variance_fraction(
    features: torch.Tensor,
    scale: float = 1.0,
    level: str = "",
    *,
    interval: bool = True,
    resamples: int = RESAMPLES,
    seed: int = 0,
    max_bytes: int = MAX_BYTES,
    device: str | torch.device = "cpu",
    groups: Sequence[Hashable] | None = None,
) -> PositionVariance:
    """The PVF of one level's features (N, C, h, w), values ``features * scale`` (float16 or memory-mapped works:
    each chunk is converted to float64), with the 95% bootstrap interval over images (over ``groups`` of images
    when given: a label per image) unless ``interval`` is off (then no N x N Gram matrix is made)."""
    if features.dim() != 4:
        raise PosprobeError(f"features must be (N, C, h, w); got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    if n < 2:
        raise PosprobeError(f"the position-variance fraction needs at least 2 images; given {n}")
    group = _group_index(groups, n)
    sizes = torch.bincount(group).double()  # (B,) images per group
    if len(sizes) < 2:
        raise PosprobeError(f"the position-variance fraction needs images of at least 2 groups; given {n} of one")
    loc = h * w
    s = _one_pass(features, float(scale), max_bytes, str(device), interval, group)
    pairs = n * n - float(sizes.pow(2).sum())  # ordered pairs of images from different groups
    v_raw = s.pooled / (n * n * loc)
    v_u = (s.pooled - s.grouped) / (pairs * loc)
    tot = s.total
    safe = torch.where(s.dead, torch.ones_like(tot), tot)
    nan = torch.full_like(tot, math.nan)
    per_u, per_raw = torch.where(s.dead, nan, v_u / safe), torch.where(s.dead, nan, v_raw / safe)
    total, pos_u, pos_raw = float(tot.sum()), float(v_u.sum()), float(v_raw.sum())
    point_u = pos_u / total if total > 0 else math.nan
    point_raw = pos_raw / total if total > 0 else math.nan
    lo_u = hi_u = lo_raw = hi_raw = math.nan
    if interval and total > 0:
        (lo_u, hi_u), (lo_raw, hi_raw) = _bootstrap(s, loc, resamples, seed, group)
    live = int((~s.dead).sum())
    return PositionVariance(
        level=level,
        n_images=n,
        channels=c,
        size=(h, w),
        pvf=Interval(point_u, lo_u, hi_u),
        pvf_raw=Interval(point_raw, lo_raw, hi_raw),
        pvf_channels=per_u.cpu().numpy(),
        pvf_raw_channels=per_raw.cpu().numpy(),
        dead_channels=c - live,
        total_variance=total,
        position_variance=pos_u,
        position_variance_raw=pos_raw,
        position_energy=(s.energy / total if total > 0 else s.energy * math.nan).view(h, w).cpu().numpy(),
        mean_map=(s.standardised / live if live else s.standardised * math.nan).view(h, w).cpu().numpy(),
    )


def _group_index(groups: Sequence[Hashable] | None, n: int) -> torch.Tensor:
    """(N,) each image's group as an index 0..B-1, in order of first appearance (None: every image its own)."""
    if groups is None:
        return torch.arange(n)
    if len(groups) != n:
        raise PosprobeError(f"groups must give one label per image; given {len(groups)} for {n} images")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in groups])


def _bootstrap(
    s: _Sums, loc: int, resamples: int, seed: int, group: torch.Tensor
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile intervals of the unbiased and the raw level PVF over resamples of the groups (images when each
    is its own), from the Gram matrix."""
    g, within, means = s.gram.cpu(), s.within.sum(1).cpu(), s.means.cpu()
    member = torch.zeros(int(group.max()) + 1, g.shape[0], dtype=torch.float64)
    member[group, torch.arange(g.shape[0])] = 1.0  # (B, N) membership
    unbiased, raw = [], []
    for k in resample_counts(member.shape[0], resamples, seed):  # (r, B)
        u, r = resampled_pvf(g, within, means, loc, k, member)
        unbiased.append(u[torch.isfinite(u)])  # a resample of one distinct group has no pair
        raw.append(r)
    return percentile_interval(torch.cat(unbiased)), percentile_interval(torch.cat(raw))


def resampled_pvf(
    gram: torch.Tensor,
    within: torch.Tensor,
    means: torch.Tensor,
    locations: int,
    counts: torch.Tensor,
    member: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unbiased, raw) level PVF of each resample, (r,) each, from G (N, N), the per-image within-image sums of
    squares (N,), the channel means (N, C) and the counts (r, B) of the groups in ``member`` (B, N) (None: every
    image its own group); all ones gives the sample's own values. The unbiased value counts the ordered pairs of
    images of distinct draws of distinct groups (module doc); NaN without one."""
    member = torch.eye(gram.shape[0], dtype=torch.float64) if member is None else member
    images = counts @ member  # (r, N) each image's count
    quad = ((images @ gram) * images).sum(1)  # k^T G k over images
    block = ((member @ gram) * member).sum(1)  # (B,) sum of G over each group's own pairs
    k2 = counts.pow(2)
    size = member.sum(1)  # (B,)
    weight = images.sum(1)  # (r,)
    pairs = weight.pow(2) - k2 @ size.pow(2)
    vt = total_variance(images, within, means, locations)
    unbiased = (quad - k2 @ block) / (pairs * locations) / vt
    unbiased[pairs == 0] = math.nan
    return unbiased, quad / (weight.pow(2) * locations) / vt
