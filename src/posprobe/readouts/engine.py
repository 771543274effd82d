"""The one path from encoded features to scores, which every command takes: readout cells are trained
together, then scored on each test set.

A *cell* is one readout to train: a readout setting (kernel, depth, padding, the levels it reads), a target
(a pattern name or a user's map) and a seed. ``probe`` trains a cell per target, ``reproduce`` / ``demo`` a
cell per distinct (setting, pattern, seed) of its tables, ``layer-curve`` a cell per (level, pattern) and the
benchmark the probe's. Controls, readout-free measures and sweeps add cells or consume ``Scores``; none needs
a loop of its own.

Every cell of one seed trains in the same passes over the features (``joint.train_readouts``: the same batches,
fused first convolutions), from a readout drawn with ``torch.manual_seed(seed)``, so a cell's readout does not
depend on which other cells train beside it (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ..backbones import Backbone
from ..errors import PosprobeError
from ..intervals import bootstrap
from ..metrics import is_constant, mae, spearman
from .convergence import Convergence
from .joint import predict_each, train_readouts
from .pem import Readout
from .train import ReadoutJob, Schedule, TrainConfig


@dataclass(frozen=True)
class ReadoutSetting:
    """How a readout is built: kernel, depth, padding, and the tapped levels it reads (None: all of them)."""

    kernel_size: int = 3
    depth: int = 1
    padding: int = 0
    levels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Cell:
    """One readout to train: a setting, the name of its target map, the seed of its initialisation and batches."""

    setting: ReadoutSetting
    target: str
    seed: int = 0


@dataclass
class TrainedCell:
    """A cell's trained readout and what its training did."""

    cell: Cell
    readout: Readout
    channels: torch.Tensor | None  # the input channels it reads (None: all)
    losses: list[float]  # every update's training loss
    schedule: Schedule
    convergence: Convergence
    label: str  # the readout in words, for messages


@dataclass
class Scores:
    """Per-image scores of one readout on one test set."""

    ids: list[str]
    spc: torch.Tensor  # (N,)
    mae: torch.Tensor  # (N,)
    constant: torch.Tensor  # (N,) bool: prediction carries no rank information (SPC defined as 0)
    first_maps: torch.Tensor | None = None  # (n_preview, S, S): the first predictions, for figures

    def summary(self) -> dict[str, float | int]:
        """Mean, 95% bootstrap interval over images (NaN for a single image) and population standard
        deviation over images (0 for a single image)."""
        spc, err = self.spc.double(), self.mae.double()
        spc_ci, mae_ci = bootstrap(spc), bootstrap(err)
        return {
            "spc_mean": spc_ci.mean,
            "spc_lo": spc_ci.lo,
            "spc_hi": spc_ci.hi,
            "spc_std": float(spc.std(correction=0)),
            "mae_mean": mae_ci.mean,
            "mae_lo": mae_ci.lo,
            "mae_hi": mae_ci.hi,
            "mae_std": float(err.std(correction=0)),
            "n": len(self.ids),
            "n_constant": int(self.constant.sum()),
        }


def pooled(scores: Scores, source_of: Mapping[str, str]) -> Scores:
    """Scores of several copies of each image (e.g. ``data.RolledImages``: item id -> source image id) -> one score
    per source image: the mean over its copies, constant only when every copy's map is. Intervals are then over
    images, not over correlated copies of one image."""
    groups: dict[str, list[int]] = {}
    for j, item in enumerate(scores.ids):
        groups.setdefault(source_of[item], []).append(j)
    ids = list(groups)
    mean = lambda t: torch.stack([t[groups[i]].float().mean() for i in ids])  # noqa: E731
    constant = torch.tensor([bool(scores.constant[groups[i]].all()) for i in ids])
    return Scores(ids, mean(scores.spc), mean(scores.mae), constant, scores.first_maps)


def level_channels(backbone: Backbone, levels: Sequence[str] | None) -> torch.Tensor | None:
    """Indices of ``levels``' channels in the backbone's aligned (concatenated) features (None: all levels)."""
    if levels is None:
        return None
    offsets, start = {}, 0
    for lv in backbone.levels:
        offsets[lv.name] = (start, start + lv.channels)
        start += lv.channels
    idx = []
    for name in levels:
        if name not in offsets:
            raise PosprobeError(f"backbone {backbone.name} has no level '{name}'; its levels: {', '.join(offsets)}")
        idx += range(*offsets[name])
    return torch.tensor(idx)


def new_readout(
    setting: ReadoutSetting,
    seed: int,
    in_channels: int,
    feat_size: int = 28,
    image_size: int = 224,
    width: int | None = None,
) -> Readout:
    """A readout drawn from ``torch.manual_seed(seed)`` without touching the global random state: the same
    seed and setting give the same initial weights whatever else is drawn around it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Readout(in_channels, setting.kernel_size, setting.depth, setting.padding, feat_size, image_size, width)


def train_cells(
    features,
    cells: Sequence[Cell],
    targets: Mapping[str, torch.Tensor],
    backbone: Backbone,
    config: TrainConfig,
    feat_size: int = 28,
    image_size: int = 224,
    device: str | torch.device = "cpu",
    progress: bool = True,
    labels: Mapping[Cell, str] | None = None,
) -> dict[Cell, TrainedCell]:
    """Train every cell's readout on ``features`` (an EncodedSet, a feature source or a tensor) against
    ``targets[cell.target]`` (H, W); the cells of one seed share their passes, with ``config``'s schedule and
    optimiser and that seed's batch order. ``labels``: each cell in words for messages (default: its target)."""
    by_seed: dict[int, list[Cell]] = {}
    for cell in dict.fromkeys(cells):
        by_seed.setdefault(cell.seed, []).append(cell)
    out = {}
    for seed, group in by_seed.items():
        jobs = []
        for cell in group:
            channels = level_channels(backbone, cell.setting.levels)
            in_channels = backbone.channels if channels is None else len(channels)
            readout = new_readout(
                cell.setting, seed, in_channels, feat_size, image_size, config.readout_width(in_channels)
            )
            label = (labels or {}).get(cell, cell.target)
            jobs.append(ReadoutJob(cell, readout, targets[cell.target], channels, label=label))
        train_readouts(features, jobs, replace(config, seed=seed), device, progress)
        for job in jobs:
            out[job.key] = TrainedCell(
                job.key, job.readout, job.channels, job.losses, job.schedule, job.convergence(), job.describe()
            )
    return out


def score_maps(ids: Sequence[str], pred: torch.Tensor, target: torch.Tensor, n_preview: int = 0) -> Scores:
    """Per-image SPC and MAE of predicted maps (N, S, S) against one target (S, S), and the first maps."""
    first = pred[:n_preview].clone() if n_preview else None
    return Scores(list(ids), spearman(pred, target), mae(pred, target), is_constant(pred), first)


def score_cells(
    trained: Mapping[Cell, TrainedCell],
    test,
    targets: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    n_preview: int = 0,
) -> dict[Cell, Scores]:
    """Every trained readout's per-image SPC and MAE on ``test`` (one pass over its features for all of them),
    and its first ``n_preview`` predicted maps."""
    ids = list(getattr(test, "ids", range(len(test))))
    out = {}
    for cell, pred in predict_each(
        {c: t.readout for c, t in trained.items()},
        test,
        device,
        {c: t.channels for c, t in trained.items()},
        {c: t.label for c, t in trained.items()},
    ):  # (N, S, S) each
        out[cell] = score_maps(ids, pred, targets[cell.target], n_preview)
    return out
