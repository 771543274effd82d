"""Where position lives: every tapped level of a network probed on its own (the paper's Table 3, for any
backbone), giving SPC against depth per pattern, for several backbones, paddings or position-embedding
controls on one figure.

Each curve encodes the image sets once with all its levels; one readout per (level, pattern) then reads
only that level's channels of the shared features (``ReadoutJob.channels``), and all of a curve's
readouts train in one pass. "all" is the paper's last column: one readout over every level together.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..backbones import Backbone, create_backbone
from ..backbones.padding import check_padding_mode
from ..backbones.pos_embed import check_pos_embed_mode
from ..backbones.registry import parse_layers
from ..data import RolledImages, image_group
from ..errors import PosprobeError
from ..features.cache import encode_images
from ..features.encode import EncodedSet
from ..features.levels import level_views
from ..measures import position_variance_fraction
from ..output.plots import layer_curve_plot
from ..output.rundir import atomic_run_dir, environment, write_csv, write_json
from ..readouts.convergence import RULE, Convergence, loss_curve
from ..readouts.engine import Cell, ReadoutSetting, pooled, score_cells, train_cells
from ..readouts.pem import check_readout_config
from ..targets import make_target, resolve_patterns
from .controls import STUDY_CONTROLS, check_rolls, control_columns, study_controls
from .probe_run import ReadoutSettings

ALL = "all"


@dataclass(frozen=True)
class LayerCurveConfig(ReadoutSettings):
    """Everything that determines a layer curve's numbers; saved as config.json.

    ``backbones`` entries are NAME or NAME@LAYER,LAYER (that backbone's taps; ``layers`` applies to the
    entries without '@'). Every backbone is probed under every ``paddings`` x ``pos_embeds`` setting
    (None: the model's own padding), so "zeros vs valid" or "keep vs zero" share one figure.
    """

    backbones: tuple[str, ...] = ("vgg16",)
    paddings: tuple[str | None, ...] = (None,)
    pos_embeds: tuple[str, ...] = ("keep",)
    patterns: tuple[str, ...] = ("H", "G")  # the patterns Table 3 reports
    include_all: bool = True
    position_variance: bool = True  # each level's readout-free PVF with its interval (an N x N Gram matrix)
    controls: tuple[str, ...] = STUDY_CONTROLS  # pixels: PosENet with the same readout; rolled: rolled test photos
    rolls: int = 4  # rolled copies of each test image


@dataclass(frozen=True)
class Curve:
    """One line of the figure: a backbone (with its taps) under one padding and position-embedding setting."""

    label: str
    backbone: str
    layers: tuple[str, ...] | None
    padding: str | None
    pos_embed: str


def parse_entry(entry: str, default_layers: tuple[str, ...] | None) -> tuple[str, tuple[str, ...] | None]:
    """'tv:resnet18@layer1,layer3' -> ('tv:resnet18', ('layer1', 'layer3')); no '@': the default layers."""
    name, sep, layers = entry.partition("@")
    if not name.strip():
        raise PosprobeError(f"--backbone '{entry}' names no backbone; expected NAME or NAME@LAYER,LAYER")
    return name.strip(), (parse_layers(layers) if sep else default_layers)


def curves_of(config: LayerCurveConfig) -> list[Curve]:
    """The backbones x paddings x position-embedding settings to draw, with unique labels."""
    if not config.backbones:
        raise PosprobeError("layer-curve needs at least one --backbone")
    for p in config.paddings:
        if p is not None:
            check_padding_mode(p)
    for m in config.pos_embeds:
        check_pos_embed_mode(m)
    curves = []
    for entry in config.backbones:
        name, layers = parse_entry(entry, config.layers)
        for padding in config.paddings:
            for pos in config.pos_embeds:
                notes = ([f"padding {padding}"] if padding is not None and len(config.paddings) > 1 else []) + (
                    [f"pos-embed {pos}"] if len(config.pos_embeds) > 1 else []
                )
                label = entry + (f" ({', '.join(notes)})" if notes else "")
                curves.append(Curve(label, name, layers, padding, pos))
    labels = [c.label for c in curves]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise PosprobeError(f"layer-curve would draw '{repeated[0]}' twice; give each --backbone once")
    return curves


@dataclass
class LayerCurve:
    """Scores of every (curve, level, pattern) on the natural test set, and what each curve ran as."""

    config: LayerCurveConfig
    rows: list[dict]
    resolved: dict[str, dict]  # curve label -> weights, levels, shapes, surgery
    losses: dict[str, list[tuple[int, float]]]  # "curve | level | pattern" -> loss curve (convergence.loss_curve)
    data: dict[str, dict]
    seconds: dict[str, float]
    convergence: dict[str, Convergence] = field(default_factory=dict)  # same keys: the training verdict


def _level_columns(backbone: Backbone, shapes: list, level: str) -> dict:
    """Where a level sits: its index, relative depth (0 first .. 1 last), channels, stride and map size;
    blank for ALL (every level together)."""
    i = next((k for k, lv in enumerate(backbone.levels) if lv.name == level), None)
    if i is None:
        return {"level": level, "index": "", "depth": "", "channels": backbone.channels, "stride": "", "size": ""}
    n = len(backbone.levels)
    return {
        "level": level,
        "index": i,
        "depth": i / (n - 1) if n > 1 else 0.0,
        "channels": backbone.levels[i].channels,
        "stride": backbone.levels[i].stride,
        "size": f"{shapes[i][1]}x{shapes[i][2]}",
    }


def _build_backbones(config: LayerCurveConfig, curves: list) -> dict[str, Backbone]:
    """Every curve's backbone, built and dry-run before any heavy work: bad settings fail first."""
    backbones = {}
    for c in curves:
        backbones[c.label] = create_backbone(
            c.backbone,
            config.weights,
            config.seed,
            config.input_norm,
            layers=c.layers,
            padding=c.padding,
            pos_embed=c.pos_embed,
            image_size=config.image_size,
        )
        backbones[c.label].level_shapes(config.image_size)
    return backbones


def _resolved(curve, backbone: Backbone, shapes: list, schedule) -> dict:
    """What a curve's settings resolved to: weights, input, levels and their sizes, surgery, schedule."""
    return {
        "backbone": curve.backbone,
        "weights": backbone.weights_label,
        "input_norm": backbone.input_norm,
        "interpolation": backbone.interpolation,
        "levels": [asdict(lv) for lv in backbone.levels],
        "level_shapes": shapes,
        "exact_strides": backbone.spec.exact_strides,
        "backbone_padding": backbone.padding_report.to_dict() if backbone.padding_report else None,
        "pos_embed": backbone.pos_embed_note,
        "input": backbone.input_description,
        "schedule": schedule.to_dict(),
    }


def _encode_pair(backbone: Backbone, train_set, test_set, config: LayerCurveConfig, cache, progress: bool):
    """(train, test) features; the test set first: it is small, and an unreadable one then fails before the
    costly training pass."""
    common = dict(device=config.device, progress=progress, cache=cache)
    test = encode_images(backbone, test_set, config.feat_size, allow_stream=False, **common)
    return encode_images(backbone, train_set, config.feat_size, **common), test


def _pixel_control(config: LayerCurveConfig, train_set, test_set, targets, cache, progress: bool):
    """pattern -> the test scores of PosENet with the curves' readout, the pixels control every level's
    selectivity is measured against; and its trained cells."""
    backbone = create_backbone("posenet")
    train, test = _encode_pair(backbone, train_set, test_set, config, cache, progress)
    setting = ReadoutSetting(config.kernel_size, config.depth, config.readout_padding)
    cells = [Cell(setting, p, config.seed) for p in targets]
    labels = {cell: f"pixels / {cell.target}" for cell in cells}
    trained = train_cells(
        train,
        cells,
        targets,
        backbone,
        config.train,
        config.feat_size,
        config.image_size,
        config.device,
        progress,
        labels,
    )
    return {c.target: s for c, s in score_cells(trained, test, targets, config.device).items()}, trained


def _rolled_scores(trained, backbone: Backbone, rolled_set, targets, config: LayerCurveConfig, cache, progress: bool):
    """Every trained cell's scores on the rolled test images, one per source image ({} without a rolled set)."""
    if rolled_set is None:
        return {}
    common = dict(device=config.device, progress=progress, cache=cache, allow_stream=False)
    rolled = encode_images(backbone, rolled_set, config.feat_size, **common)
    return {c: pooled(s, rolled_set.source_of) for c, s in score_cells(trained, rolled, targets, config.device).items()}


def position_variance_by_level(backbone: Backbone, train, shapes: list, device: str) -> dict[str, dict]:
    """level -> the readout-free position-variance fraction of its training features (measures/; one more pass
    over them) and where it was measured; ALL: the levels pooled (their position variances over their total
    variances, no interval). Nothing for a streamed set (no stored features to read)."""
    if not isinstance(train, EncodedSet):
        return {}
    out, pos, total = {}, 0.0, 0.0
    groups = [image_group(i) for i in train.ids]  # the crops of one photo are not independent images
    for view, shape in zip(level_views(train, backbone.levels), shapes):
        pv = position_variance_fraction(view.data, view.scale, view.level.name, device=device, groups=groups)
        out[view.level.name] = {
            "pvf": pv.pvf.mean,
            "pvf_lo": pv.pvf.lo,
            "pvf_hi": pv.pvf.hi,
            "pvf_raw": pv.pvf_raw.mean,
            "pvf_measured_at": view.resolution(tuple(shape[1:])),
        }
        pos, total = pos + pv.position_variance, total + pv.total_variance
    nan = float("nan")
    pooled_pvf = pos / total if total > 0 else nan
    out[ALL] = {"pvf": pooled_pvf, "pvf_lo": nan, "pvf_hi": nan, "pvf_raw": nan, "pvf_measured_at": "levels pooled"}
    return out


def _level_cells(config: LayerCurveConfig, backbone: Backbone, patterns: list[str]) -> dict[Cell, str]:
    """One readout cell per (tapped level, pattern), and per pattern one over every level (ALL) when asked."""
    levels: list[str | None] = [lv.name for lv in backbone.levels]
    if config.include_all and len(levels) > 1:
        levels.append(None)  # every level together
    setting = lambda level: ReadoutSetting(  # noqa: E731
        config.kernel_size, config.depth, config.readout_padding, None if level is None else (level,)
    )
    return {Cell(setting(level), p, config.seed): level or ALL for level in levels for p in patterns}


def _pixel_baseline(config: LayerCurveConfig, train_set, test_set, targets, cache, progress: bool, losses, verdicts):
    """The pixels control's scores and its training verdicts per pattern ({} without it); its loss curves and
    verdicts go into ``losses`` / ``verdicts`` beside the curves'."""
    if "pixels" not in config.controls:
        return {}, {}
    pixels, trained = _pixel_control(config, train_set, test_set, targets, cache, progress)
    status = {}
    for cell, done in trained.items():
        losses[f"pixels | {ALL} | {cell.target}"] = loss_curve(done.losses)
        verdicts[f"pixels | {ALL} | {cell.target}"] = done.convergence
        status[cell.target] = {"pixels_convergence": done.convergence.status}
    return pixels, status


def run_layer_curve(config: LayerCurveConfig, progress: bool = True) -> LayerCurve:
    """Probe every tapped level of every curve on its own (and all levels together)."""
    check_readout_config(config.feat_size, config.kernel_size, config.depth, config.readout_padding)
    patterns = resolve_patterns(list(config.patterns))
    study_controls(config.controls)
    check_rolls(config.rolls)
    curves = curves_of(config)
    backbones = _build_backbones(config, curves)
    started = time.perf_counter()
    train_set, test_set = config.image_sets()
    cache = config.feature_cache()
    targets = {p: make_target(p, config.image_size, config.image_size) for p in patterns}
    rows, resolved, losses, data, verdicts = [], {}, {}, {}, {}
    rolled_set = RolledImages(test_set, config.rolls, config.seed) if "rolled" in config.controls else None
    pixels, pixel_status = _pixel_baseline(config, train_set, test_set, targets, cache, progress, losses, verdicts)
    for c in curves:
        backbone = backbones[c.label]
        train, test = _encode_pair(backbone, train_set, test_set, config, cache, progress)
        data = {
            "train": {"description": train.description, "n": len(train), "skipped": train.skipped},
            "test": {"description": test.description, "n": len(test), "skipped": test.skipped},
        }
        cells = _level_cells(config, backbone, patterns)
        trained = train_cells(
            train,
            list(cells),
            targets,
            backbone,
            config.train,
            config.feat_size,
            config.image_size,
            config.device,
            progress,
            {cell: f"{level} / {cell.target}" for cell, level in cells.items()},
        )
        scores = score_cells(trained, test, targets, config.device)
        rolled = _rolled_scores(trained, backbone, rolled_set, targets, config, cache, progress)
        shapes = backbone.level_shapes(config.image_size)
        pvf = position_variance_by_level(backbone, train, shapes, config.device) if config.position_variance else {}
        for cell, level in cells.items():
            p, done = cell.target, trained[cell]
            rows.append(
                {
                    "curve": c.label,
                    "backbone": c.backbone,
                    "padding": c.padding or "model",
                    "pos_embed": c.pos_embed,
                    **_level_columns(backbone, shapes, level),
                    "pattern": p,
                    "test_set": test.name,
                    **scores[cell].summary(),
                    **control_columns(scores[cell], pixels.get(p), rolled.get(cell)),
                    **pixel_status.get(p, {}),
                    **pvf.get(level, {}),
                    "updates": done.schedule.updates,
                    "convergence": done.convergence.status,
                }
            )
            losses[f"{c.label} | {level} | {p}"] = loss_curve(done.losses)
            verdicts[f"{c.label} | {level} | {p}"] = done.convergence
        resolved[c.label] = _resolved(c, backbone, shapes, next(iter(trained.values())).schedule)
    return LayerCurve(config, rows, resolved, losses, data, {"total": time.perf_counter() - started}, verdicts)


def format_curve_table(rows: list[dict]) -> str:
    """One line per (curve, level): stride, size, each pattern's mean SPC (◌ a flat map, ⚠ not finished) and
    selectivity over the pixel control, and the level's readout-free PVF."""
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    has_sel, has_pvf = "selectivity" in rows[0], "pvf" in rows[0]
    head = f"{'curve':<40}{'level':<16}{'stride':>7}{'size':>9}" + "".join(f"{'SPC ' + p:>11}" for p in patterns)
    head += "".join(f"{'sel ' + p:>9}" for p in patterns) if has_sel else ""
    lines = [head + (f"{'PVF':>9}" if has_pvf else "")]
    by_level: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_level.setdefault((r["curve"], r["level"]), {})[r["pattern"]] = r
    mark = {"converged": "  ", "flat map": " ◌"}
    for (curve, level), cells in by_level.items():
        r = next(iter(cells.values()))
        spc = "".join(
            f"{cells[p]['spc_mean']:>9.3f}{mark.get(cells[p]['convergence'], ' ⚠')}" if p in cells else f"{'':>11}"
            for p in patterns
        )
        sel = "".join(f"{cells[p]['selectivity']:>9.3f}" if p in cells else f"{'':>9}" for p in patterns)
        lines.append(
            f"{curve[:39]:<40}{level[:15]:<16}{r['stride']!s:>7}{r['size']:>9}{spc}"
            + (sel if has_sel else "")
            + (f"{r['pvf']:>9.3f}" if has_pvf else "")
        )
    return "\n".join(lines)


def write_layer_curve(curve: LayerCurve, out: Path, overwrite: bool = False) -> Path:
    """The run directory: config.json, layer_curve.csv, metrics.json, layer_curve.png, environment.json."""
    with atomic_run_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", {**curve.config.to_dict(), "resolved": curve.resolved, "data": curve.data})
        write_csv(tmp / "layer_curve.csv", curve.rows)
        write_json(
            tmp / "metrics.json",
            {"rows": curve.rows, "train_loss_curve": curve.losses, "convergence_rule": RULE, "seconds": curve.seconds},
        )
        write_json(tmp / "environment.json", environment(curve.config.device))
        points: dict[str, dict[str, list[tuple[float, str, float]]]] = {}
        bars: dict[str, dict[str, list[tuple[float, float]]]] = {}
        together: dict[str, dict[str, float]] = {}
        for r in curve.rows:
            if r["level"] == ALL:
                together.setdefault(r["curve"], {})[r["pattern"]] = r["spc_mean"]
            else:
                points.setdefault(r["curve"], {}).setdefault(r["pattern"], []).append(
                    (float(r["depth"]), r["level"], r["spc_mean"])
                )
                bars.setdefault(r["curve"], {}).setdefault(r["pattern"], []).append((r["spc_lo"], r["spc_hi"]))
        cfg = curve.config
        stand_ins = {label for label, r in curve.resolved.items() if "stand-in" in str(r["weights"])}
        layer_curve_plot(
            tmp / "layer_curve.png",
            points,
            together,
            title=f"SPC of one level at a time on {curve.rows[0]['test_set']} "
            f"({cfg.image_size} px, readout k={cfg.kernel_size})",
            stand_ins=stand_ins,
            intervals=bars,
            control={r["pattern"]: r["spc_pixels"] for r in curve.rows if "spc_pixels" in r},
        )
        _position_variance_plot(curve, tmp / "position_variance.png")
    return out


def _position_variance_plot(curve: LayerCurve, path: Path) -> None:
    """position_variance.png: each level's readout-free position-variance fraction against depth, per curve."""
    points: dict[str, dict[str, list[tuple[float, str, float]]]] = {}
    bars: dict[str, dict[str, list[tuple[float, float]]]] = {}
    together: dict[str, dict[str, float]] = {}
    first = curve.rows[0]["pattern"]  # one row per level: the measure does not depend on the pattern
    for r in curve.rows:
        if r["pattern"] != first or "pvf" not in r:
            continue
        if r["level"] == ALL:
            together.setdefault(r["curve"], {})["PVF"] = r["pvf"]
        else:
            points.setdefault(r["curve"], {}).setdefault("PVF", []).append((float(r["depth"]), r["level"], r["pvf"]))
            bars.setdefault(r["curve"], {}).setdefault("PVF", []).append((r["pvf_lo"], r["pvf_hi"]))
    if points:
        title = "position-variance fraction of the training features, per level (readout-free)"
        layer_curve_plot(path, points, together, title=title, intervals=bars, quantity="position-variance fraction")
