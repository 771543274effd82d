"""Location tasks on a canvas: where on a blank canvas does a photo crop sit, read from a frozen network's
globally pooled features (Islam et al., IJCV 2024; Kayhan & van Gemert, CVPR 2020).

A content image (a square crop of a photo, ``content`` px) is pasted on a constant canvas (``image_size`` px;
black, white or the content's own mean colour) either at the cells of a g x g grid or at uniformly drawn
positions. Global average pooling (GAP) removes every explicit coordinate from the features: a network whose
features merely shift with the content gives the same GAP vector wherever the content sits, so a linear probe
that still tells the cell must be reading something the network computes from the canvas border (padding).

- ``CanvasImages``: the canvases as a Dataset with stable ids (``photo#cropK@cellJ`` / ``photo#cropK@xX,yY``),
  each item's ``Placement`` (cell, centre, distance to the nearest border) and a content identity for the
  feature cache (same photos, seed and settings -> the same cache key).
- ``photo_contents``: the seeded square crops of a list of photo files, resized to ``content`` px.
- ``gap_features``: per level the (N, C) GAP of an EncodedSet (through ``features.levels.level_views``).
- ``GapProbe``: the exact ridge probe (cell classifier or (x, y) regressor), regularisation chosen on held-out
  photos.
- ``cluster_interval``: a ratio of sums with its 95% bootstrap interval over photos (``intervals``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import UnreadableImage, display_name, image_group, open_image, random_square_crops, to_tensor, upright
from ..errors import PosprobeError, parse_choices, unknown_choice
from ..features.encode import EncodedSet
from ..features.levels import level_views
from ..intervals import Interval, paired_statistic

CANVAS_COLOURS = ("black", "white", "mean")
PLACEMENTS = ("grid", "continuous")
TASKS = ("cell", "xy")
# ridge penalties tried, as multiples of the number of training images (features are standardised, so the
# Gram matrix's diagonal is ~N per feature): 1e-4 N is nearly least squares, 1e3 N nearly the mean
ALPHA_RATIOS = tuple(10.0**k for k in range(-4, 4))


@dataclass(frozen=True)
class Placement:
    """Where one content sits on the canvas: top-left corner (``left``, ``top``) in pixels, the content side and
    canvas side, and the grid cell (row-major) its centre falls in."""

    left: int
    top: int
    content: int
    image_size: int
    cell: int

    @property
    def x(self) -> float:
        """The content's centre, in pixels from the canvas's left edge (pixel i spans [i, i + 1))."""
        return self.left + self.content / 2

    @property
    def y(self) -> float:
        return self.top + self.content / 2

    @property
    def border(self) -> int:
        """Pixels between the content and the nearest canvas border (0: it touches one)."""
        s, c = self.image_size, self.content
        return min(self.left, self.top, s - self.left - c, s - self.top - c)

    def to_dict(self) -> dict:
        return {**asdict(self), "x": self.x, "y": self.y, "border": self.border}


def check_geometry(image_size: int, content: int, grid: int, jitter: int = 0) -> None:
    """Refuse a content that does not fit the canvas or its grid cell (``PosprobeError``, one line)."""
    if grid < 2:
        raise PosprobeError(f"--grid must be at least 2 cells per side (one cell leaves nothing to tell); given {grid}")
    if content < 1 or content > image_size:
        raise PosprobeError(
            f"--content must be between 1 and the canvas side --image-size {image_size} px; given {content}"
        )
    cell = image_size / grid
    if content > cell:
        raise PosprobeError(
            f"the grid cells ({image_size} / {grid} = {cell:.1f} px) are smaller than the content ({content} px); "
            f"use --content <= {math.floor(cell)}, a smaller --grid or a larger --image-size"
        )
    room = math.floor((cell - content) / 2)
    if jitter < 0 or jitter > room:
        raise PosprobeError(
            f"--jitter must be between 0 and {room} px (half the room the content has in its "
            f"{cell:.1f} px cell); given {jitter}"
        )


def cell_of(x: float, y: float, image_size: int, grid: int) -> int:
    """The row-major index of the grid cell holding the point (x, y)."""
    col = min(int(x * grid / image_size), grid - 1)
    row = min(int(y * grid / image_size), grid - 1)
    return row * grid + col


def grid_placements(
    image_size: int, content: int, grid: int, jitter: int = 0, rng: np.random.Generator | None = None
) -> list[Placement]:
    """One placement per cell of a ``grid`` x ``grid`` grid, row-major: the content centred in its cell (rounded
    to whole pixels), moved by a uniform integer offset in [-jitter, jitter] per axis when ``jitter``."""
    check_geometry(image_size, content, grid, jitter)
    if jitter and rng is None:
        raise ValueError("jitter needs a random generator")
    out = []
    for row in range(grid):
        for col in range(grid):
            left = round(col * image_size / grid + (image_size / grid - content) / 2)
            top = round(row * image_size / grid + (image_size / grid - content) / 2)
            if jitter:
                dx, dy = rng.integers(-jitter, jitter + 1, size=2)
                left, top = left + int(dx), top + int(dy)
            out.append(Placement(left, top, content, image_size, row * grid + col))
    return out


def continuous_placements(
    image_size: int, content: int, n: int, rng: np.random.Generator, grid: int = 3
) -> list[Placement]:
    """``n`` placements with the top-left corner uniform over every whole-pixel position where the content fits;
    ``cell`` is the grid cell of the centre (so the cell classifier runs on continuous placements too)."""
    check_geometry(image_size, content, grid)
    out = []
    for _ in range(n):
        left, top = (int(v) for v in rng.integers(0, image_size - content + 1, size=2))
        cell = cell_of(left + content / 2, top + content / 2, image_size, grid)
        out.append(Placement(left, top, content, image_size, cell))
    return out


def fill_colour(content: torch.Tensor, canvas: str) -> torch.Tensor:
    """(3,) RGB in [0, 1] of the canvas behind ``content`` (3, c, c): black, white or the content's mean."""
    if canvas == "black":
        return torch.zeros(3)
    if canvas == "white":
        return torch.ones(3)
    if canvas == "mean":
        return content.mean(dim=(1, 2))
    raise unknown_choice("canvas colour", canvas, CANVAS_COLOURS)


def compose(content: torch.Tensor, placement: Placement, canvas: str) -> torch.Tensor:
    """The (3, S, S) canvas with ``content`` (3, c, c) pasted at ``placement``."""
    s, c, left, top = placement.image_size, placement.content, placement.left, placement.top
    image = fill_colour(content, canvas)[:, None, None].expand(3, s, s).clone()  # (3,) -> (3, S, S)
    image[:, top : top + c, left : left + c] = content
    return image


def parse_colours(text: str) -> tuple[str, ...]:
    """'black,mean' -> ('black', 'mean'), each checked."""
    return parse_choices(text, "--canvas", "canvas colour", CANVAS_COLOURS)


def photo_contents(
    paths: Sequence[str | Path], content: int, per_photo: int, seed: int = 0, min_fraction: float = 0.5
) -> tuple[torch.Tensor, list[str], list[str]]:
    """(M, 3, c, c) contents, their ids ('photo#cropK') and the photos that could not be read.

    Each photo gives ``per_photo`` square crops (``data.random_square_crops``: side uniform in [min_fraction, 1]
    of the shorter side), drawn from one generator seeded with ``seed`` in the order of ``paths``, each resized
    to ``content`` px: the same photos and seed always give the same contents."""
    if per_photo < 1:
        raise PosprobeError(f"--per-photo must be at least 1 (crops of each photo); given {per_photo}")
    rng = np.random.default_rng(seed)
    images, ids, skipped = [], [], []
    seen: dict[str, int] = {}
    for path in map(Path, paths):
        try:
            with open_image(path) as img:
                img.draft("RGB", (max(content, img.width // 4), max(content, img.height // 4)))  # JPEG: faster
                img = upright(img).convert("RGB")
                crops = random_square_crops(img, per_photo, rng, min_fraction)
                tensors = [to_tensor(crop, content) for crop in crops]
        except (UnreadableImage, OSError, ValueError) as err:
            skipped.append(display_name(path))
            warnings.warn(f"{display_name(path)}: {getattr(err, 'reason', err)}; not used", stacklevel=2)
            continue
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        photo = stem if seen[stem] == 1 else f"{stem}~{seen[stem]}"  # two folders may hold the same name
        images.extend(tensors)
        ids.extend(f"{photo}#crop{k}" for k in range(per_photo))
    if not images:
        raise PosprobeError(f"none of the {len(paths)} photos could be read ({', '.join(skipped[:3])}...)")
    return torch.stack(images), ids, skipped


class CanvasImages(Dataset):
    """Contents pasted on a constant canvas: every content at every cell of the grid (``placement="grid"``,
    a balanced design in which the content says nothing about the cell) or at ``positions`` uniform positions
    (``"continuous"``, default g x g of them). Item k is content k // P at placement k % P.

    Placements are drawn from a generator seeded with ``seed`` and the content's index, so they do not depend on
    how many contents there are. Items are composed when read; ``cache_identity`` keys them by content.
    """

    def __init__(
        self,
        contents: torch.Tensor,
        content_ids: Sequence[str],
        image_size: int = 224,
        canvas: str = "black",
        placement: str = "grid",
        grid: int = 3,
        jitter: int = 0,
        positions: int | None = None,
        seed: int = 0,
        name: str = "canvas",
    ):
        if contents.dim() != 4 or contents.shape[1] != 3 or contents.shape[-1] != contents.shape[-2]:
            raise ValueError(f"contents must be (M, 3, c, c); got {tuple(contents.shape)}")
        if len(content_ids) != contents.shape[0]:
            raise ValueError(f"{contents.shape[0]} contents but {len(content_ids)} ids")
        if placement not in PLACEMENTS:
            raise unknown_choice("placement", placement, PLACEMENTS)
        fill_colour(contents[0], canvas)  # an unknown colour fails here
        side = int(contents.shape[-1])
        check_geometry(image_size, side, grid, jitter if placement == "grid" else 0)
        positions = grid * grid if positions is None else positions
        if placement == "continuous" and positions < 1:
            raise PosprobeError(f"--positions must be at least 1 per content; given {positions}")
        self.contents, self.content_ids = contents, list(content_ids)
        self.image_size, self.content, self.canvas, self.placement = image_size, side, canvas, placement
        self.grid, self.jitter, self.seed, self.name = grid, jitter, seed, name
        self.placements: list[Placement] = []  # item order
        self.ids: list[str] = []
        for m, cid in enumerate(self.content_ids):
            rng = np.random.default_rng([seed, m])
            if placement == "grid":
                ps = grid_placements(image_size, side, grid, jitter, rng)
                self.ids += [f"{cid}@cell{p.cell}" + (f",x{p.x:g},y{p.y:g}" if jitter else "") for p in ps]
            else:
                ps = continuous_placements(image_size, side, positions, rng, grid)
                self.ids += [f"{cid}@x{p.x:g},y{p.y:g}" for p in ps]
            self.placements += ps
        self.per_content = len(self.placements) // max(1, len(self.content_ids))
        where = (
            f"{grid}x{grid} grid" + (f", jitter {jitter} px" if jitter else "")
            if placement == "grid"
            else (f"{self.per_content} uniform positions each")
        )
        self.description = (
            f"{len(self.content_ids)} contents ({side} px) on a {canvas} {image_size} px canvas, {where}, "
            f"seed {seed} = {len(self)} images"
        )

    def __len__(self) -> int:
        return len(self.placements)

    def __getitem__(self, k: int) -> torch.Tensor:
        return compose(self.contents[k // self.per_content], self.placements[k], self.canvas)

    @property
    def cells(self) -> torch.Tensor:
        """(N,) int64 row-major grid cell of each item."""
        return torch.tensor([p.cell for p in self.placements], dtype=torch.long)

    @property
    def centres(self) -> torch.Tensor:
        """(N, 2) float64 (x, y) content centre of each item, in pixels."""
        return torch.tensor([(p.x, p.y) for p in self.placements], dtype=torch.float64)

    @property
    def borders(self) -> torch.Tensor:
        """(N,) int64 distance of each item's content to the nearest canvas border, in pixels."""
        return torch.tensor([p.border for p in self.placements], dtype=torch.long)

    @property
    def groups(self) -> list[str]:
        """The photo of each item: items of one photo are one unit of the bootstrap and of the held-out split."""
        return [image_group(i) for i in self.ids]

    def cache_identity(self) -> dict:
        """What the feature cache keys these images by: the contents' bytes, the ids, canvas and placements."""
        h = hashlib.sha256()
        h.update(f"{self.canvas}\0{self.image_size}\0".encode())
        h.update("\n".join(self.ids).encode("utf-8", "surrogateescape"))
        h.update(repr([(p.left, p.top) for p in self.placements]).encode())
        c = self.contents.detach().cpu().contiguous()
        h.update(f"{tuple(c.shape)}{c.dtype}".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy())
        return {"kind": "canvas", "n": len(self), "image_size": self.image_size, "sha256": h.hexdigest()}


# ---- pooled features and the probe ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pooled:
    """One level's GAP features (N, C) float64 and where they were pooled from, in words."""

    level: str
    features: torch.Tensor
    pooled_from: str
    exact: bool  # pooled at the level's own resolution (not from a resized copy)


def gap_features(
    encoded: EncodedSet, levels: Sequence, native_shapes: Sequence[tuple[int, int, int]], batch: int = 64
) -> list[Pooled]:
    """The global average pool of every level of ``encoded``, in order.

    A level the cache keeps native is pooled exactly; one stored resized to feat_size (bilinear, corners
    aligned) is pooled from that copy, which weights border rows slightly differently from the native map (an
    approximation, said in ``pooled_from``; none when feat_size equals the level's side). ``exact_feat_size``
    gives the feat_size at which every level is pooled exactly. Read in batches of images: a memory-mapped
    entry stays on disk.
    """
    out = []
    for view, shape in zip(level_views(encoded, levels), native_shapes):
        native = tuple(shape[-2:])
        chunks = [
            view.data[i : i + batch].double().mean(dim=(-2, -1)) * view.scale  # (b, C, h, w) -> (b, C)
            for i in range(0, view.data.shape[0], batch)
        ]
        exact = view.native or view.size == native  # a level of feat_size's side is stored as it is
        where = f"native {native[0]}x{native[1]}" if exact else view.resolution(native)
        out.append(Pooled(view.level.name, torch.cat(chunks), where, exact))
    return out


def exact_feat_size(shapes: Sequence[tuple[int, int, int]]) -> int:
    """The feat_size at which the cache keeps every level at its own resolution: the largest level's side when
    every other level is small enough to be kept native (``features.parts.plan_parts``: at most half the
    aligned pixels), else the smallest side that makes them all native (valid padding shrinks levels unevenly).
    Native parts take the same room whatever the feat_size."""
    sides = [(int(h), int(w)) for _, h, w in shapes]
    top = max(max(s) for s in sides)

    def exact(fs: int) -> bool:
        return all(s == (fs, fs) or 2 * s[0] * s[1] <= fs * fs for s in sides)

    return top if exact(top) else math.isqrt(2 * top * top - 1) + 1  # the least fs with fs^2 >= 2 top^2


def holdout_split(groups: Sequence[str], fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) boolean masks: a seeded ``fraction`` of the groups (photos), at least one, held out
    whole; everything in train when there is only one group."""
    names = sorted(set(groups))
    held = torch.zeros(len(groups), dtype=torch.bool)
    if len(names) > 1:
        order = np.random.default_rng(seed).permutation(len(names))
        chosen = {names[i] for i in order[: max(1, round(fraction * len(names)))]}
        held = torch.tensor([g in chosen for g in groups])
    return ~held, held


class GapProbe:
    """A linear probe on pooled features, in the scikit-learn shape: ``task="cell"`` classifies the grid cell,
    ``task="xy"`` regresses the normalised centre (x, y) / image_size.

    Both are ridge regressions on standardised features (a one-hot target for cells, argmax to predict): exact
    and deterministic, solved from one SVD for every penalty, so choosing the penalty on held-out photos costs
    no more than one fit, and there is no optimiser whose convergence would need checking (multinomial logistic
    regression would need one per penalty and class count). On a balanced design the least-squares classifier's
    argmax ranks cells as the logistic one does wherever the classes are linearly separable; what we report is
    the accuracy of that argmax, not calibrated probabilities. The penalty ``alpha_`` (from ``ALPHA_RATIOS`` x N)
    is chosen on a seeded ``holdout`` fraction of the training photos, then the probe is refitted on all of them.
    """

    def __init__(
        self, task: str = "cell", n_classes: int | None = None, holdout: float = 0.25, seed: int = 0, ratios=None
    ):
        if task not in TASKS:
            raise unknown_choice("probe task", task, TASKS)
        self.task, self.n_classes, self.holdout, self.seed = task, n_classes, holdout, seed
        self.ratios = tuple(ALPHA_RATIOS if ratios is None else ratios)

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.task == "cell":
            return torch.nn.functional.one_hot(y.long(), self.n_classes_).double()  # (N,) -> (N, K)
        return y.double().reshape(len(y), -1)  # (N, 2)

    def _solve(self, x: torch.Tensor, t: torch.Tensor, alphas: Sequence[float]) -> list[tuple[torch.Tensor, ...]]:
        """(W, b) of ridge on standardised ``x`` for each alpha, from one SVD."""
        xm, tm = x.mean(0), t.mean(0)
        u, s, vh = torch.linalg.svd(x - xm, full_matrices=False)  # (N, r), (r,), (r, D)
        ut = u.T @ (t - tm)  # (r, K)
        out = []
        for a in alphas:
            w = vh.T @ ((s / (s * s + a))[:, None] * ut)  # (D, K)
            out.append((w, tm - xm @ w))
        return out

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean_) / self.scale_

    def fit(self, x: torch.Tensor, y: torch.Tensor, groups: Sequence[str]) -> GapProbe:
        """x: (N, D) features; y: (N,) cells or (N, 2) normalised centres; groups: (N,) photo of each item."""
        x = x.double()
        self.n_classes_ = int(self.n_classes or int(y.max()) + 1) if self.task == "cell" else 0
        self.mean_ = x.mean(0)
        std = x.std(0)
        self.scale_ = torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
        z, t = self._standardise(x), self._targets(y)
        alphas = [r * len(x) for r in self.ratios]
        fit_mask, held = holdout_split(groups, self.holdout, self.seed)
        self.holdout_scores_: list[float] = []
        if held.any() and fit_mask.any():
            for w, b in self._solve(z[fit_mask], t[fit_mask], [r * int(fit_mask.sum()) for r in self.ratios]):
                self.holdout_scores_.append(self._score(z[held] @ w + b, y[held]))
            best = max(range(len(alphas)), key=lambda i: (self.holdout_scores_[i], i))  # ties: the larger alpha
        else:
            best = len(alphas) // 2
        self.alpha_ = alphas[best]
        self.coef_, self.intercept_ = self._solve(z, t, [self.alpha_])[0]
        return self

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        return self._standardise(x) @ self.coef_ + self.intercept_

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) cells, or (N, 2) normalised centres."""
        out = self.decision_function(x)
        return out.argmax(1) if self.task == "cell" else out

    def _score(self, out: torch.Tensor, y: torch.Tensor) -> float:
        if self.task == "cell":
            return float((out.argmax(1) == y).double().mean())
        return -float((out - y.double()).norm(dim=1).mean())

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy (cells) or minus the mean Euclidean error in normalised units (xy): higher is better."""
        return self._score(self.decision_function(x), y)


def cluster_interval(values: torch.Tensor, groups: Sequence[str], seed: int = 0) -> tuple[Interval, int]:
    """The mean of per-item ``values`` (N,) with its 95% bootstrap interval over ``groups`` (photos) resampled
    whole, and the number of groups.

    Items of one photo share its content, so they are not independent: the interval resamples photos, each with
    all its items, and the statistic is the ratio of the resampled sums to the resampled counts (the pooled
    mean, photos of more items weighing more, as in the point estimate); ``intervals.paired_statistic`` keeps
    the sums and counts paired."""
    names = sorted(set(groups))
    if not names:
        return Interval(math.nan, math.nan, math.nan), 0
    index = {g: i for i, g in enumerate(names)}
    g = torch.tensor([index[x] for x in groups])
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, g, values.double())
    counts = torch.zeros(len(names), dtype=torch.float64).index_add_(0, g, torch.ones(len(g), dtype=torch.float64))
    iv = paired_statistic([sums, counts], lambda m: m[:, 0] / m[:, 1], seed=seed)
    return iv, len(names)


def distance_bins(borders: torch.Tensor, edges: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[lo, hi) pixel bins of distance to the border that hold at least one item: ``edges`` given, else
    0, 1, 2, 4, 8, ... (finer near the border, where padding acts); the last bin closes above the largest."""
    top = int(borders.max()) + 1 if len(borders) else 1
    if edges is None:
        edges = [0, 1]
        while edges[-1] < top:
            edges.append(edges[-1] * 2)
    edges = sorted(set(int(e) for e in edges))
    if edges[-1] < top:
        edges.append(top)
    bins = [(lo, hi) for lo, hi in zip(edges, edges[1:]) if bool(((borders >= lo) & (borders < hi)).any())]
    return bins
