"""Translation equivariance of the features: StyleGAN3's EQ-T (Karras et al., "Alias-Free Generative Adversarial
Networks", NeurIPS 2021), applied to a frozen backbone's tapped levels.

A network that encodes no absolute position is equivariant: shifting the input shifts every feature map. For
a shift of s input pixels along x (or y) and a level of stride r that divides s, the map should move by
t = s / r cells. The input is rolled circularly (``torch.roll``, content moving right / down), so no content is
lost, and the level's features f(roll(x, s)) are compared with roll(f(x), t):

- **circular**: over the whole map. Only a network that is circular throughout (circular padding, no position
  embedding) can match exactly; zero padding shows at the borders and at the roll's wrap seam.
- **interior**: on the locations away from both. With m = max(1, floor(side / 8 + 1/2)) cells for each axis's
  side, a location (i, j) of a map h x w is kept when m_y <= i <= h-1-m_y and m_x <= j <= w-1-m_x (the m outermost
  rows and columns on every side are dropped: f(roll(x))'s own padding) and, for a shift along x, j is not in the
  seam band {(t - m_x + q) mod w : q = 0 .. 2 m_x - 1} (along y, the same for i with m_y and h): the m columns on
  each side of the line between cells t-1 and t, where the rolled input's wrap seam lands in f(roll(x)) and
  f(x)'s borders land in roll(f(x)). What remains compares features whose whole neighbourhood is natural image
  in both maps (for receptive fields up to about m cells). If nothing remains the interior mode is skipped.

MSE is averaged over the kept locations, channels and images; EQ-T = 10 log10(V / MSE) dB, V the level's
per-channel variance over the unshifted images and locations, averaged over channels, so that levels of different
scale compare. MSE = 0 gives +inf (an exactly equivariant network; float32 rounding alone gives 120-140 dB).
The interval resamples images: per-image error sums and variance terms (resample.py); it is the percentile
interval of MSE / V, written in dB.

A level whose stride does not divide s is skipped for that s, with the reason. A level whose map is not S / r on a
side (a network without padding loses border pixels) is a crop of the map a padded network would have: its cell j
reads the input window starting at j r, so on the rolled input the cells j >= t read exactly the windows that
cells j - t read on the original, with no wrapped content in them. For such a level the interior mode compares
f(roll(x, s))[j] with f(x)[j - t] on exactly those cells (no margin needed: nothing there is padding or seam), and
the circular mode, which needs a torus, is skipped with the reason. A shift of the whole map side or more leaves
nothing to compare and is skipped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..backbones import Backbone
from ..errors import PosprobeError
from ..features.encode import prepare_encoder, unreadable_list
from ..intervals import RESAMPLES, Interval
from .resample import percentile_interval, resample_counts, total_variance

AXES = ("x", "y")


@dataclass(frozen=True)
class Equivariance:
    """EQ-T of one level for one shift along one axis (dB with 95% intervals), or why it was not measured."""

    level: str
    axis: str
    shift: int  # input pixels
    stride: int
    cells: int  # the level's shift t = shift / stride (0 when skipped)
    size: tuple[int, int]
    n_images: int
    circular_db: Interval | None
    interior_db: Interval | None
    margin: int  # m, cells, along the shift axis
    interior_locations: int  # locations the interior mode keeps
    circular_mse: float = math.nan
    interior_mse: float = math.nan
    variance: float = math.nan  # V: per-channel variance over images and locations, mean over channels
    skipped: str = ""  # why the level was not measured at this shift
    interior_skipped: str = ""  # why the interior mode was not
    circular_skipped: str = ""  # why the circular mode was not (a map without padding is no torus)

    def to_dict(self) -> dict:
        def db(iv: Interval | None) -> dict | None:
            return None if iv is None else {k: _number(getattr(iv, k)) for k in ("mean", "lo", "hi")}

        return {
            "level": self.level,
            "axis": self.axis,
            "shift": self.shift,
            "stride": self.stride,
            "cells": self.cells,
            "size": list(self.size),
            "n_images": self.n_images,
            "circular_db": db(self.circular_db),
            "interior_db": db(self.interior_db),
            "margin": self.margin,
            "interior_locations": self.interior_locations,
            "circular_mse": _number(self.circular_mse),
            "interior_mse": _number(self.interior_mse),
            "variance": _number(self.variance),
            "skipped": self.skipped,
            "interior_skipped": self.interior_skipped,
            "circular_skipped": self.circular_skipped,
        }


def _number(v: float) -> float | str | None:
    """JSON: +inf as "inf" (an exact match), NaN as null."""
    if math.isnan(v):
        return None
    return ("inf" if v > 0 else "-inf") if math.isinf(v) else float(v)


def margin(side: int) -> int:
    """m = max(1, side / 8 rounded half up): the cells dropped at each border and on each side of the seam."""
    return max(1, math.floor(side / 8 + 0.5))


def interior_mask(h: int, w: int, cells: int, axis: str, cropped: bool = False) -> torch.Tensor:
    """(h, w) bool: the locations the interior mode keeps for a shift of ``cells`` along ``axis`` (module doc);
    ``cropped``: a level without padding, where exactly the cells at least ``cells`` from the start are kept."""
    if cropped:
        keep = torch.arange(w if axis == "x" else h) >= cells
        return keep[None, :].expand(h, w) if axis == "x" else keep[:, None].expand(h, w)
    my, mx = margin(h), margin(w)
    rows = torch.zeros(h, dtype=torch.bool)
    rows[my : h - my] = True
    cols = torch.zeros(w, dtype=torch.bool)
    cols[mx : w - mx] = True
    side, m, line = (w, mx, cols) if axis == "x" else (h, my, rows)
    band = [(cells - m + q) % side for q in range(2 * m)]
    line[band] = False
    return rows[:, None] & cols[None, :]


def default_shifts(backbone: Backbone, image_size: int | None = None) -> tuple[int, ...]:
    """1, 2 and 4 times the deepest tapped level's stride (those under ``image_size``, else the smallest one)."""
    r = max(lv.stride for lv in backbone.levels)
    shifts = (r, 2 * r, 4 * r)
    return shifts if image_size is None else (tuple(s for s in shifts if s < image_size) or shifts[:1])


@dataclass
class _Stats:
    """Per-image sums for one level, filled batch by batch (float64, CPU)."""

    means: list  # (B, C) per batch: channel means of the unshifted features
    within: list  # (B,) per batch: sum over channels and locations of squared deviations from those means
    circular: dict  # (axis, shift) -> list of (B,) squared-error sums over the whole map
    interior: dict  # (axis, shift) -> list of (B,) squared-error sums over the kept locations


def cropped_levels(backbone: Backbone, image_size: int) -> set[int]:
    """The levels whose map is not image_size / stride on a side: crops, as a network without padding makes."""
    shapes = backbone.level_shapes(image_size)
    return {
        i
        for i, (lv, (_, h, w)) in enumerate(zip(backbone.levels, shapes))
        if image_size % lv.stride or (h, w) != (image_size // lv.stride,) * 2
    }


def _plan(backbone: Backbone, image_size: int, shifts: Sequence[int], axes: Sequence[str]) -> dict:
    """(level index, axis, shift) -> the skip reason, or '' when measured."""
    shapes = backbone.level_shapes(image_size)
    plan = {}
    for i, (lv, (_, h, w)) in enumerate(zip(backbone.levels, shapes)):
        for s in shifts:
            for a in axes:
                reason = ""
                if s % lv.stride:
                    reason = f"stride {lv.stride} does not divide the shift {s}"
                elif s // lv.stride >= (w if a == "x" else h):
                    reason = f"the shift moves the {h}x{w} map by its whole side or more"
                plan[(i, a, s)] = reason
    return plan


def _batches(images: Dataset | torch.Tensor, batch_size: int, skipped: list[int]):
    """(B, 3, S, S) batches of the readable images, in order; an unreadable one (None) goes to ``skipped``."""
    batch = []
    for i in range(len(images)):
        x = images[i]
        if x is None:
            skipped.append(i)
        else:
            batch.append(x)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _accumulate(backbone, x: torch.Tensor, plan: dict, shifts, axes, stats: list[_Stats], cropped: set[int]) -> None:
    """One batch: the unshifted pass, then one pass per (shift, axis); per-image sums into ``stats``."""
    base = backbone(x)
    for st, f in zip(stats, base):
        m = f.mean((2, 3), dtype=torch.float64)  # (B, C)
        dev = f - m.to(f.dtype)[..., None, None]  # (B, C, h, w) in the features' dtype: no float64 copy of a level
        st.means.append(m.cpu())
        st.within.append((dev * dev).sum((1, 2, 3), dtype=torch.float64).cpu())
    for s in shifts:
        for a in axes:
            dim = -1 if a == "x" else -2
            if all(plan[(i, a, s)] for i in range(len(stats))):
                continue
            moved = backbone(torch.roll(x, s, dims=dim))
            for i, (st, f, g) in enumerate(zip(stats, base, moved)):
                if plan[(i, a, s)]:
                    continue
                t = s // backbone.levels[i].stride
                d = g - torch.roll(f, t, dims=dim)  # exact in float32 where the two agree closely
                err = (d * d).sum(1, dtype=torch.float64)  # (B, h, w): over channels
                mask = interior_mask(err.shape[-2], err.shape[-1], t, a, i in cropped).to(err.device)
                if i not in cropped:
                    st.circular.setdefault((a, s), []).append(err.sum((1, 2)).cpu())
                st.interior.setdefault((a, s), []).append(err[:, mask].sum(1).cpu())


@torch.inference_mode()
def translation_equivariance(
    backbone: Backbone,
    images: Dataset | torch.Tensor,
    shifts: Sequence[int] | None = None,
    axes: Sequence[str] = AXES,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    resamples: int = RESAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> list[Equivariance]:
    """EQ-T of every tapped level for each shift (input pixels; default ``default_shifts``) along each axis,
    over ``images`` (N, 3, S, S) in [0, 1] (a tensor or an image set), one result per (level, axis, shift)."""
    given = None if shifts is None else tuple(shifts)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise PosprobeError(f"unknown shift axis '{bad[0]}'; expected x or y")
    backbone, channels_last = prepare_encoder(backbone, device)
    stats = [_Stats([], [], {}, {}) for _ in backbone.levels]
    size, plan, skipped = None, {}, []
    bar = tqdm(total=len(images), desc="equivariance", unit="img", disable=None if progress else True, leave=False)
    for x in _batches(images, batch_size, skipped):
        if size is None:  # the first batch: check the shifts against the image side before any pass
            size = int(x.shape[-1])
            shifts = default_shifts(backbone, size) if given is None else given
            for s in shifts:
                if not 0 < s < size:
                    raise PosprobeError(
                        f"a shift must be between 1 and {size - 1} pixels (the image side - 1); given {s}"
                    )
            plan, cropped = _plan(backbone, size, shifts, axes), cropped_levels(backbone, size)
        x = x.to(device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        _accumulate(backbone, x, plan, shifts, axes, stats, cropped)
        bar.update(len(x))
    bar.close()
    name = getattr(images, "name", "images")
    ids = [getattr(images, "ids", [str(i) for i in range(len(images))])[i] for i in skipped]
    if size is None:
        raise PosprobeError(
            f"none of the {len(images)} image(s) in {name} could be read: {unreadable_list(ids, images)}"
        )
    if ids:  # stacklevel 1: inference_mode's wrapper would attribute it to torch, whose warnings the CLI silences
        warnings.warn(f"skipped {len(ids)} unreadable image(s) in {name}: {unreadable_list(ids, images)}", stacklevel=1)
    shapes = backbone.level_shapes(size)
    out = []
    for i, (lv, st) in enumerate(zip(backbone.levels, stats)):
        c, h, w = shapes[i]
        means, within = torch.cat(st.means), torch.cat(st.within)  # (N, C), (N,)
        for s in shifts:
            for a in axes:
                reason = plan[(i, a, s)]
                common = dict(level=lv.name, axis=a, shift=s, stride=lv.stride, size=(h, w), n_images=len(within))
                if reason:
                    out.append(
                        Equivariance(
                            cells=0,
                            circular_db=None,
                            interior_db=None,
                            margin=0,
                            interior_locations=0,
                            skipped=reason,
                            **common,
                        )
                    )
                    continue
                out.append(_result(st, a, s, means, within, (c, h, w), resamples, seed, common, i in cropped))
    return out


def _result(
    st: _Stats, a: str, s: int, means, within, shape, resamples: int, seed: int, common: dict, cropped: bool
) -> Equivariance:
    """The dB values and intervals of one (level, axis, shift) from its per-image sums."""
    c, h, w = shape
    t = s // common["stride"]
    kept = int(interior_mask(h, w, t, a, cropped).sum())
    n = len(within)
    ones = torch.ones(1, n, dtype=torch.float64)
    variance = float(total_variance(ones, within, means, h * w)[0]) / c
    inner = torch.cat(st.interior[(a, s)])  # (N,)
    circ_db, circ_mse, no_torus = None, math.nan, ""
    if cropped:
        no_torus = f"the {h}x{w} map is a crop (no padding), not a torus: only the interior mode applies"
    else:
        circ_db, circ_mse = _db(
            torch.cat(st.circular[(a, s)]), c * h * w, variance, within, means, h * w, c, resamples, seed
        )
    inner_db, inner_mse, why = None, math.nan, ""
    if kept:
        inner_db, inner_mse = _db(inner, c * kept, variance, within, means, h * w, c, resamples, seed)
    else:
        why = f"no location of the {h}x{w} map is {margin(w if a == 'x' else h)} cells from the borders and the seam"
    return Equivariance(
        cells=t,
        circular_db=circ_db,
        interior_db=inner_db,
        margin=0 if cropped else margin(w if a == "x" else h),
        interior_locations=kept,
        circular_mse=circ_mse,
        interior_mse=inner_mse,
        variance=variance,
        interior_skipped=why,
        circular_skipped=no_torus,
        **common,
    )


def _db(errors, per_image: int, variance: float, within, means, locations: int, c: int, resamples: int, seed: int):
    """(EQ-T in dB with its interval, MSE): errors (N,) per-image squared-error sums over ``per_image`` values."""
    n = len(errors)
    mse = float(errors.sum()) / (n * per_image)
    point = _to_db(variance, mse)
    ratios = []
    for k in resample_counts(n, resamples, seed):  # (r, N)
        v = total_variance(k, within, means, locations) / c
        ratios.append((k @ errors) / (n * per_image) / v)  # MSE / V per resample
    lo, hi = percentile_interval(torch.cat(ratios)) if n > 1 else (math.nan, math.nan)
    return Interval(point, _to_db(1.0, hi), _to_db(1.0, lo)), mse


def _to_db(variance: float, mse: float) -> float:
    """10 log10(V / MSE); +inf when MSE is 0, NaN when either is not a number or V is 0."""
    if math.isnan(mse) or math.isnan(variance) or variance <= 0:
        return math.nan
    return math.inf if mse == 0 else 10 * math.log10(variance / mse)
