"""The readout-free measures of one backbone, as the ``measure`` command runs them: the position-variance fraction
and mean maps of every tapped level on the training set (and on the same images circularly rolled, ``rolled``),
the blank-input maps, and the translation equivariance (EQ-T) on the test set; one run directory.

Nothing is trained: the numbers depend only on the backbone and the images. The training set's features come
through the feature cache, each level read once, at the resolution the cache stores it (aligned to feat_size,
or native where alignment would upsample it; stated per level).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones import Backbone, create_backbone
from ..data import RolledImages, image_group
from ..errors import PosprobeError
from ..features.cache import GB, encode_images
from ..features.levels import level_views
from ..measures import (
    BlankMap,
    Equivariance,
    PositionVariance,
    blank_maps,
    default_shifts,
    position_variance_fraction,
    translation_equivariance,
)
from ..output.plots import layer_measures_plot, position_maps_plot
from ..output.rundir import atomic_run_dir, environment, write_csv, write_json
from .probe_run import ReadoutSettings, backbone_record

NATURAL, ROLLED = "natural", "rolled"
# ReadoutSettings fields that only a trained readout uses: not part of a measure run's record
_READOUT_FIELDS = ("patterns", "kernel_size", "depth", "readout_padding", "profile", "train")
DEFINITIONS = {
    "pvf": "unbiased position-variance fraction: sum_c V_pos_u(c) / sum_c V_tot(c), V_pos_u the U-statistic over "
    "pairs of distinct images of the spatial variance of the per-location mean of each image's spatially centred "
    "features; 95% percentile bootstrap interval over images",
    "pvf_raw": "the plug-in sum_c mean_ij (mean_n d_n(c, ij))^2 / sum_c V_tot(c): biased upward by ~1/N of the "
    "image-to-image variance",
    "position_energy": "(h, w): sum_c (mean_n d_n(c, ij))^2 / sum_c V_tot(c); its mean is pvf_raw",
    "mean_map": "(h, w): mean over images and live channels of each channel standardised by its total std",
    "blank_position_ratio": "sum_c spatial variance of the features of a constant image / sum_c V_tot(c) of the "
    "natural training images; blank maps are the channel-RMS deviation from each channel's spatial mean, in units "
    "of the natural RMS std",
    "eqt_db": "10 log10(V / MSE) between f(roll(x, s)) and roll(f(x), s / stride), V the mean per-channel variance "
    "over the unshifted test images; circular: whole map; interior: away from the borders and the wrap seam",
}


@dataclass(frozen=True)
class MeasureConfig(ReadoutSettings):
    """Everything that determines a measure run's numbers; saved as config.json (without the readout fields)."""

    backbone: str = "vgg16"
    backbone_padding: str | None = None  # None: the model's own padding (see backbones.padding)
    pos_embed: str = "keep"  # keep, zero or shuffle a ViT's position embedding
    rolled: bool = False  # also measure the training images circularly rolled (data.RolledImages)
    shifts: tuple[int, ...] | None = None  # EQ-T shifts in input pixels; None: 1, 2, 4 x the deepest stride
    blank_values: tuple[float, ...] = (0.0, 1.0)
    interval: bool = True  # the PVF's bootstrap interval: an N x N Gram matrix (hours on CPU at DUT-S's 10,553)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for k in _READOUT_FIELDS:
            out.pop(k, None)
        return out


@dataclass
class MeasureResult:
    """What a measure run produced: per condition the per-level PVF, the blank maps and the EQ-T results."""

    config: MeasureConfig
    backbone: Backbone
    position: dict[str, list[PositionVariance]]  # condition -> one per level, in order
    resolution: dict[str, str]  # level -> where it was measured, in words
    blank: list[BlankMap]
    equivariance: list[Equivariance]
    shifts: tuple[int, ...]
    data: dict[str, dict]
    seconds: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """measures.csv: one row per level and condition; blank and EQ-T values (test set) on the natural rows."""
        rows = []
        for condition, per_level in self.position.items():
            for i, (lv, pv) in enumerate(zip(self.backbone.levels, per_level)):
                row = {
                    "condition": condition,
                    "level": lv.name,
                    "index": i,
                    "stride": lv.stride,
                    "channels": lv.channels,
                    "measured_at": self.resolution[lv.name],
                    "n_images": pv.n_images,
                    "pvf": pv.pvf.mean,
                    "pvf_lo": pv.pvf.lo,
                    "pvf_hi": pv.pvf.hi,
                    "pvf_raw": pv.pvf_raw.mean,
                    "pvf_raw_lo": pv.pvf_raw.lo,
                    "pvf_raw_hi": pv.pvf_raw.hi,
                    "dead_channels": pv.dead_channels,
                    "total_variance": pv.total_variance,
                }
                row.update(self._network_columns(lv.name, condition == NATURAL))
                rows.append(row)
        return rows

    def _network_columns(self, level: str, filled: bool) -> dict:
        """Blank ratios and EQ-T dB per shift and axis (test set, not per condition): empty unless ``filled``."""
        cols = {}
        for b in self.config.blank_values:
            m = next((x for x in self.blank if x.level == level and x.value == b), None)
            cols[f"blank_position_ratio_{b:g}"] = m.blank_position_ratio if filled and m else ""
        for mode in ("interior", "circular"):
            for s in self.shifts:
                for a in ("x", "y"):
                    e = next((x for x in self.equivariance if (x.level, x.axis, x.shift) == (level, a, s)), None)
                    iv = getattr(e, f"{mode}_db") if e is not None else None
                    cols[f"eqt_{mode}_db_{a}{s}"] = iv.mean if filled and iv is not None else ""
        return cols

    def to_dict(self) -> dict:
        return {
            "definitions": DEFINITIONS,
            "position_variance": {
                c: [{**pv.to_dict(), "measured_at": self.resolution[pv.level]} for pv in per_level]
                for c, per_level in self.position.items()
            },
            "blank_maps": [b.to_dict() for b in self.blank],
            "equivariance": [e.to_dict() for e in self.equivariance],
            "shifts": list(self.shifts),
            "rows": [{k: _csv_json(v) for k, v in r.items()} for r in self.rows()],
            "seconds": self.seconds,
        }


def _csv_json(v):
    """A row value for JSON: +inf as "inf", NaN as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def parse_shifts(text: str | None) -> tuple[int, ...] | None:
    """'16,32,64' -> (16, 32, 64); None or '' -> None (the default shifts)."""
    if text is None or not text.strip():
        return None
    try:
        shifts = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise PosprobeError(f"--shifts must be a comma list of whole pixels such as 16,32,64; given '{text}'") from None
    return shifts


def prepare(config: MeasureConfig) -> tuple[Backbone, tuple[int, ...]]:
    """Validate the settings and build the backbone, before any heavy work; the shifts resolved."""
    if config.image_size < 8:
        raise PosprobeError(f"--image-size must be at least 8; given {config.image_size}")
    if config.feat_size < 1:
        raise PosprobeError(f"--feat-size must be at least 1; given {config.feat_size}")
    backbone = create_backbone(
        config.backbone,
        config.weights,
        config.seed,
        config.input_norm,
        layers=config.layers,
        padding=config.backbone_padding,
        pos_embed=config.pos_embed,
        image_size=config.image_size,
    )
    backbone.level_shapes(config.image_size)  # a too-small input fails here, clearly
    shifts = default_shifts(backbone, config.image_size) if config.shifts is None else tuple(config.shifts)
    bad = [s for s in shifts if not 0 < s < config.image_size]
    if not shifts or bad:
        raise PosprobeError(
            f"--shifts must be between 1 and {config.image_size - 1} pixels (the image side - 1); "
            f"given {','.join(map(str, shifts)) or 'none'}"
            + (" (the default: the deepest level's stride)" if config.shifts is None else "")
        )
    return backbone, shifts


def _measure_levels(backbone: Backbone, images, config: MeasureConfig, cache, progress: bool):
    """The PVF of every level of ``images`` (through the feature cache), and where each level was measured."""
    encoded = encode_images(
        backbone, images, config.feat_size, device=config.device, progress=progress, cache=cache, allow_stream=False
    )
    native = {lv.name: tuple(s[1:]) for lv, s in zip(backbone.levels, backbone.level_shapes(config.image_size))}
    per_level, where = [], {}
    groups = [image_group(i) for i in encoded.ids]  # the crops of one photo are not independent images
    for view in level_views(encoded, backbone.levels):
        pv = position_variance_fraction(
            view.data, view.scale, view.level.name, interval=config.interval, device=config.device, groups=groups
        )
        per_level.append(pv)
        where[view.level.name] = view.resolution(native[view.level.name])
    return encoded, per_level, where


def _check_room(backbone: Backbone, images, config: MeasureConfig, cache) -> None:
    """The measure reads every level whole, so a set whose features the cache would stream instead of keeping
    (over ``--cache-max-gb``) is refused before any work rather than held in memory as float32."""
    if cache is not None:
        need = cache.expected_bytes(
            cache.layout(backbone, config.image_size, config.feat_size), len(images), config.feat_size
        )
        if need > cache.max_gb * GB:
            raise PosprobeError(
                f"the features of {len(images)} images would take {need / GB:.1f} GB, over --cache-max-gb "
                f"{cache.max_gb:g}; measure reads them from the cache: raise --cache-max-gb (the disk needs the room) "
                "or pass a smaller --train"
            )


def run_measures(config: MeasureConfig, progress: bool = True) -> MeasureResult:
    """Every readout-free measure of one backbone (module doc); the library entry point of ``posprobe measure``."""
    backbone, shifts = prepare(config)
    train_set, test_set = config.image_sets()
    cache = config.feature_cache()
    _check_room(backbone, train_set, config, cache)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    # the test set first: it is small, and an unreadable one then fails before the costly training pass
    eq = translation_equivariance(backbone, test_set, shifts, device=config.device, progress=progress)
    t1 = time.perf_counter()
    seconds["equivariance"] = t1 - t0
    encoded, natural, where = _measure_levels(backbone, train_set, config, cache, progress)
    position = {NATURAL: natural}
    t2 = time.perf_counter()
    seconds["position_variance"] = t2 - t1
    data = {
        "train": {"description": encoded.description, "n": len(encoded), "skipped": encoded.skipped},
        "test": {"description": getattr(test_set, "description", ""), "n": eq[0].n_images if eq else 0},
    }
    if config.rolled:
        rolled_set = RolledImages(train_set, rolls=1, seed=config.seed)
        rolled, position[ROLLED], _ = _measure_levels(backbone, rolled_set, config, cache, progress)
        data["rolled"] = {"description": rolled.description, "n": len(rolled), "skipped": rolled.skipped}
        seconds["position_variance_rolled"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    reference = {pv.level: pv.reference_std for pv in natural}
    blank = blank_maps(backbone, config.image_size, config.blank_values, reference, feat_size=config.feat_size)
    seconds["blank_maps"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0
    return MeasureResult(config, backbone, position, where, blank, eq, shifts, data, seconds)


def _db_text(iv) -> str:
    if iv is None or math.isnan(iv.mean):
        return "-"
    return "inf" if math.isinf(iv.mean) else f"{iv.mean:.1f}"


def format_measure_table(result: MeasureResult) -> str:
    """One line per level: stride, where measured, PVF [95% interval] (and rolled), raw PVF, blank ratios and
    the interior EQ-T in dB per shift (x / y)."""
    conditions = list(result.position)
    blanks = [f"blank {b:g}" for b in result.config.blank_values]
    head = (
        f"{'level':<14}{'stride':>6}  {'measured at':<32}"
        + "".join(f"{'PVF ' + c + (' [95%]' if result.config.interval else ''):<28}" for c in conditions)
        + f"{'raw ' + conditions[0][:3]:>8}"
        + "".join(f"{b:>9}" for b in blanks)
        + "".join(f"{str(s) + ' px x/y':>16}" for s in result.shifts)
    )
    note = "EQ-T: interior mode, dB (inf: exact), along x / y; -: not measured (measures.json says why)"
    lines = [note, head]
    for i, lv in enumerate(result.backbone.levels):
        pvs = [result.position[c][i] for c in conditions]
        ratios = [
            next((m.blank_position_ratio for m in result.blank if (m.level, m.value) == (lv.name, b)), math.nan)
            for b in result.config.blank_values
        ]
        eq = {(e.axis, e.shift): e for e in result.equivariance if e.level == lv.name}
        dbs = [f"{_db_text(_interior(eq, 'x', s))}/{_db_text(_interior(eq, 'y', s))}" for s in result.shifts]
        lines.append(
            f"{lv.name[:13]:<14}{lv.stride:>6}  {result.resolution[lv.name][:31]:<32}"
            + "".join(f"{str(pv.pvf).replace('-0.000', '0.000'):<28}" for pv in pvs)
            + f"{pvs[0].pvf_raw.mean:>8.4f}"
            + "".join(f"{r:>9.3g}" for r in ratios)
            + "".join(f"{d:>16}" for d in dbs)
        )
    return "\n".join(lines)


def _interior(eq: dict, axis: str, shift: int):
    e = eq.get((axis, shift))
    return None if e is None else e.interior_db


def write_measures(result: MeasureResult, out: Path, overwrite: bool = False) -> Path:
    """The run directory, atomically: config.json, measures.json, measures.csv, environment.json, position_maps.png
    and layer_measures.png."""
    cfg, backbone = result.config, result.backbone
    with atomic_run_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", {**cfg.to_dict(), "resolved": _resolved(result), "data": result.data})
        write_json(tmp / "measures.json", result.to_dict())
        write_csv(tmp / "measures.csv", result.rows())
        write_json(tmp / "environment.json", environment(cfg.device))
        label = f"{backbone.name} ({backbone.weights_label}), {cfg.image_size} px"
        position_maps_plot(tmp / "position_maps.png", _map_rows(result), title=f"Where position sits: {label}")
        names = [lv.name for lv in backbone.levels]
        pvf = {c: [(pv.pvf.mean, pv.pvf.lo, pv.pvf.hi) for pv in per] for c, per in result.position.items()}
        eqt = {}
        for mode in ("interior", "circular"):
            for s in result.shifts:
                for a in ("x", "y"):
                    by_level = {
                        e.level: getattr(e, f"{mode}_db") for e in result.equivariance if (e.axis, e.shift) == (a, s)
                    }
                    eqt[(mode, a, s)] = [by_level[n].mean if by_level.get(n) else math.nan for n in names]
        layer_measures_plot(tmp / "layer_measures.png", names, pvf, eqt, title=f"Readout-free measures: {label}")
    return out


def _map_rows(result: MeasureResult) -> dict:
    """position_maps.png: per level the mean map, the position energy (per condition) and the blank maps."""
    rows = {}
    for i, lv in enumerate(result.backbone.levels):
        natural = result.position[NATURAL][i]
        panels = [("mean map (std units)", natural.mean_map, True)]
        panels += [(f"position energy, {c}", per[i].position_energy, False) for c, per in result.position.items()]
        for m in result.blank:
            if m.level == lv.name:
                panels.append((f"blank {m.value:g} ({m.units})", m.map, False))
        rows[f"{lv.name}\n{result.resolution[lv.name]}"] = panels
    return rows


def _resolved(result: MeasureResult) -> dict:
    """What the settings resolved to: weights, input, levels and their sizes, surgery, shifts."""
    return {
        **backbone_record(result.backbone, result.config.image_size),
        "measured_at": result.resolution,
        "shifts": list(result.shifts),
    }
