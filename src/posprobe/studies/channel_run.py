"""Position channels of one level, as the ``channels`` command runs them: rank the level's channels by how much
position they carry (measures/channels.py), then ablate the top k of each ranking on held-out test images and
re-score the readouts trained on the intact level, against random k-channel draws.

Every ranker sees only the training images; the readouts (the PEM readout per pattern and seed, and the exact
linear probe) are trained once on the training images' intact features; the ablation changes only the test
features. A top-k ablation that lowers SPC more than ablating k random channels says the ranking found channels
the readout relies on more than on an average channel. The test is stated: the drop beyond random,
SPC(random k) - SPC(top k), with its 95% two-way bootstrap interval over the (readout seed x random draw) rows and
the test images; ``lower`` when the interval lies above 0, ``higher`` below, else ``unresolved``.

The training and test features come through the feature cache (the flipped training images too), so a second
run with other k, draws or ablations re-encodes nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, create_backbone, get_backbone_spec
from ..data import FlippedImages, image_group
from ..errors import PosprobeError, unknown_choice
from ..features.cache import encode_images
from ..features.encode import EncodedSet
from ..features.levels import level_views
from ..intervals import Interval, bootstrap
from ..measures.channels import (
    ABLATIONS,
    DEFINITIONS,
    RANKERS,
    ChannelRanking,
    ablate,
    border_scores,
    channel_moments,
    flip_scores,
    linear_weight_scores,
    random_draws,
)
from ..measures.position_variance import position_variance_fraction
from ..output.channel_plots import ablation_plot, top_channels_plot
from ..output.rundir import atomic_run_dir, environment, markdown_report, write_csv, write_json
from ..readouts.convergence import Convergence
from ..readouts.engine import Cell, ReadoutSetting, TrainedCell, score_cells, train_cells
from ..readouts.linear import LinearProbe
from ..readouts.pem import check_readout_config
from ..targets import probe_targets
from .probe_run import ReadoutSettings, backbone_record

READOUTS = ("pem", "linear")
MEAN = "mean"  # the pattern label of the per-image mean SPC over patterns
TEST_DOC = (
    "drop beyond random = SPC(random k) - SPC(top k), paired per test image; 95% percentile bootstrap over the "
    "(readout seed x random draw) rows and the test images; lower: interval above 0 (the top k matter more than "
    "random k), higher: below 0, unresolved: it contains 0"
)


@dataclass(frozen=True)
class ChannelConfig(ReadoutSettings):
    """Everything that determines a channels run's numbers; saved as config.json."""

    backbone: str = "vgg16"
    level: str | None = None  # None: the backbone's deepest default tap
    backbone_padding: str | None = None
    pos_embed: str = "keep"
    patterns: tuple[str, ...] = ("H", "V", "G")
    rankers: tuple[str, ...] = RANKERS
    ablations: tuple[str, ...] = ("mean",)
    k_percent: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    draws: int = 5  # random k-channel draws per k
    seeds: int = 1  # PEM readout seeds (seed, seed + 1, ...)
    readouts: tuple[str, ...] = READOUTS


@dataclass
class ChannelResult:
    """What a channels run produced: the rankings, the ablation rows, the readouts' convergence."""

    config: ChannelConfig
    backbone: Backbone
    level: str
    ks: list[tuple[float, int]]  # (percent asked, channels)
    rankings: dict[str, ChannelRanking]
    border_ratio: np.ndarray
    moments: tuple[np.ndarray, np.ndarray]  # each channel's mean and std on the training images
    mean_maps: np.ndarray  # (C, h, w): each channel's mean over training images, in std units
    rows: list[dict]
    convergence: dict[str, Convergence]  # PEM readout label -> its verdict
    linear: dict | None
    data: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def channel_rows(self) -> list[dict]:
        """channels.csv: one row per channel, each ranker's score and rank (1: most position)."""
        ranks = {name: np.empty(len(r.scores), dtype=np.int64) for name, r in self.rankings.items()}
        for name, r in self.rankings.items():
            ranks[name][r.order] = np.arange(1, len(r.scores) + 1)
        rows = []
        for c in range(len(self.border_ratio)):
            row = {"channel": c, "mean": float(self.moments[0][c]), "std": float(self.moments[1][c])}
            for name, r in self.rankings.items():
                row[f"{name}_score"] = _finite(r.scores[c])
                row[f"{name}_rank"] = int(ranks[name][c])
            row["border_ratio"] = _finite(self.border_ratio[c])
            rows.append(row)
        return rows

    def agreement(self) -> dict:
        """Between every two rankers: Spearman's rho of their scores and the overlap of their top 10%."""
        from scipy.stats import spearmanr

        names = list(self.rankings)
        k = max(1, round(0.1 * len(self.border_ratio)))
        out = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                sa, sb = self.rankings[a].scores, self.rankings[b].scores
                ok = np.isfinite(sa) & np.isfinite(sb)
                rho = float(spearmanr(sa[ok], sb[ok]).statistic) if ok.sum() > 2 else math.nan
                top = set(self.rankings[a].top(k).tolist()) & set(self.rankings[b].top(k).tolist())
                out[f"{a}~{b}"] = {"spearman": _finite(rho), "top10pct_shared": len(top), "top10pct": k}
        return out


def _finite(v: float) -> float | str | None:
    v = float(v)
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def parse_k_percent(text: str) -> tuple[float, ...]:
    """'1,5,10' -> (1.0, 5.0, 10.0): percentages of the level's channels, each in (0, 100]."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise PosprobeError(f"--k must be a comma list of percentages such as 1,5,10; given '{text}'") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise PosprobeError(f"--k percentages must each be in (0, 100]; given '{text}'")
    return values


def _checked_choices(what: str, given: tuple[str, ...], valid: tuple[str, ...]) -> None:
    if isinstance(given, str):
        raise PosprobeError(f"{what} must be a tuple of names such as {valid[:2]}; given the string '{given}'")
    if not given:
        raise PosprobeError(f"--{what} needs at least one of {', '.join(valid)}; given none")
    for g in given:
        if g not in valid:
            raise unknown_choice(what.rstrip("s"), g, valid)


def prepare(config: ChannelConfig) -> Backbone:
    """Validate the settings and build the one-level backbone, before any heavy work."""
    _checked_choices("rankers", config.rankers, RANKERS)
    _checked_choices("ablations", config.ablations, ABLATIONS)
    _checked_choices("readouts", config.readouts, READOUTS)
    if "linear" in config.rankers and "linear" not in config.readouts:
        raise PosprobeError("the linear ranker reads the linear probe's weights: add linear to --readouts")
    if (
        isinstance(config.k_percent, str)
        or not all(isinstance(v, (int, float)) and 0 < v <= 100 for v in config.k_percent)
        or not config.k_percent
    ):
        raise PosprobeError(f"k_percent must be percentages in (0, 100] such as (1, 5, 10); given {config.k_percent!r}")
    if config.draws < 1 or config.seeds < 1:
        raise PosprobeError(f"--draws and --seeds must be at least 1; given {config.draws} and {config.seeds}")
    if config.image_size < 8:
        raise PosprobeError(f"--image-size must be at least 8; given {config.image_size}")
    check_readout_config(config.feat_size, config.kernel_size, config.depth, config.readout_padding)
    level = config.level or get_backbone_spec(config.backbone, config.image_size).levels[-1].name
    if "," in level or level == "all":
        raise PosprobeError(f"--level takes one layer (its channels are ranked); given '{level}'")
    backbone = create_backbone(
        config.backbone,
        config.weights,
        config.seed,
        config.input_norm,
        layers=(level,),
        padding=config.backbone_padding,
        pos_embed=config.pos_embed,
        image_size=config.image_size,
    )
    backbone.level_shapes(config.image_size)  # a too-small input fails here, clearly
    return backbone


def channel_counts(percents: tuple[float, ...], channels: int) -> list[tuple[float, int]]:
    """Each percentage as a channel count (at least 1, at most all), duplicates dropped."""
    out, seen = [], set()
    for p in sorted(percents):
        k = min(channels, max(1, round(p / 100 * channels)))
        if k not in seen:
            seen.add(k)
            out.append((p, k))
    return out


class _Scorer:
    """Every readout's per-image SPC on one version of the test features: {(readout, pattern): (S, N)}."""

    def __init__(self, test: EncodedSet, pem: dict[Cell, TrainedCell], linear: LinearProbe | None, targets, config):
        self.test, self.pem, self.linear, self.targets, self.config = test, pem, linear, targets, config
        self.features = test.features  # (N, C, fs, fs) aligned float32, ablated per call
        # (readout, pattern) -> whether its training finished (every seed's PEM readout; CG reached its tolerance)
        self.converged: dict[tuple[str, str], bool] = {}
        if pem:
            for p in config.patterns:
                self.converged[("pem", p)] = all(t.convergence.finished for c, t in pem.items() if c.target == p)
            self.converged[("pem", MEAN)] = all(t.convergence.finished for t in pem.values())
        if linear is not None:
            ok = bool(linear.summary()["cg_converged"])
            self.converged.update({("linear", p): ok for p in (*config.patterns, MEAN)})

    def __call__(self, features: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        encoded = EncodedSet.from_aligned(self.test.name, features, self.test.ids)
        out: dict[tuple[str, str], torch.Tensor] = {}
        if self.pem:
            scores = score_cells(self.pem, encoded, self.targets, self.config.device)
            for p in self.config.patterns:
                out[("pem", p)] = torch.stack([scores[c].spc for c in self.pem if c.target == p])  # (S, N)
        if self.linear is not None:
            for p, s in self.linear.score(encoded).items():
                out[("linear", p)] = s.spc[None]  # (1, N)
        for readout in {r for r, _ in out}:  # the per-image mean over patterns, one summary per readout
            out[(readout, MEAN)] = torch.stack([v for (r, p), v in out.items() if r == readout]).mean(0)
        return out


def _direction(iv: Interval) -> str:
    if iv.lo > 0:
        return "lower"
    if iv.hi < 0:
        return "higher"
    return "unresolved"


def _ablation_rows(scorer: _Scorer, rankings, ks, means: torch.Tensor, config: ChannelConfig) -> list[dict]:
    """One row per (ablation, k, readout, pattern, ranker): top-k SPC vs the random draws' (module doc)."""
    base = scorer(scorer.features)
    rows = []
    channels = scorer.features.shape[1]
    for mode in config.ablations:
        for pct, k in ks:
            draws = [scorer(ablate(scorer.features, d, mode, means)) for d in random_draws(channels, k, config.draws)]
            tops = {name: scorer(ablate(scorer.features, r.top(k), mode, means)) for name, r in rankings.items()}
            for key, intact in base.items():
                rand = torch.stack([d[key] for d in draws])  # (R, S, N)
                per_draw = rand.double().mean((1, 2))  # (R,) each draw's mean SPC
                rand_rows = rand.reshape(-1, rand.shape[-1])  # (R*S, N): (draw, seed) rows
                common = {
                    "ablation": mode,
                    "k_percent": pct,
                    "k": k,
                    "channels": channels,
                    "readout": key[0],
                    "pattern": key[1],
                    "readout_converged": scorer.converged[key],
                    "intact_spc": bootstrap(intact),
                    "random_spc": bootstrap(rand_rows),
                    "random_draw_std": float(per_draw.std(correction=0)),
                    "random_draw_min": float(per_draw.min()),
                    "random_draw_max": float(per_draw.max()),
                }
                for name, top in tops.items():
                    t = top[key]  # (S, N)
                    drop = bootstrap((rand - t[None]).reshape(-1, t.shape[-1]))  # (R, S, N) -> (R*S, N), paired
                    rows.append(
                        {
                            **common,
                            "ranker": name,
                            "top_spc": bootstrap(t),
                            "drop_beyond_random": drop,
                            "verdict": _direction(drop),
                        }
                    )
    return rows


def flat_row(row: dict) -> dict:
    """An ablation row for CSV / JSON: every interval as mean, lo, hi columns."""
    out = {}
    for k, v in row.items():
        if isinstance(v, Interval):
            out[k], out[f"{k}_lo"], out[f"{k}_hi"] = v.mean, v.lo, v.hi
        else:
            out[k] = v
    return out


def run_channels(config: ChannelConfig, progress: bool = True) -> ChannelResult:
    """Rank the level's channels and ablate them (module doc); the library entry point of ``posprobe channels``."""
    backbone = prepare(config)
    level = backbone.levels[0].name
    train_set, test_set = config.image_sets()
    cache = config.feature_cache()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def encode(images, stream=False):
        return encode_images(
            backbone,
            images,
            config.feat_size,
            device=config.device,
            progress=progress,
            cache=cache,
            allow_stream=stream,
        )

    test = encode(test_set)  # small: an unreadable test folder fails before the training pass
    train = encode(train_set)
    if len(train) < 4 or len(test) < 2:
        raise PosprobeError(f"channels needs at least 4 training and 2 test images; given {len(train)} and {len(test)}")
    view = level_views(train, backbone.levels)[0]
    seconds["encode"] = time.perf_counter() - t0
    mean, std = channel_moments(view.data, view.scale)
    rms = (mean.pow(2) + std.pow(2)).sqrt()
    targets = probe_targets(config.patterns, None, config.image_size)

    t1 = time.perf_counter()
    linear = None
    if "linear" in config.readouts:
        linear = LinearProbe(
            backbone,
            config.patterns,
            config.kernel_size,
            config.readout_padding,
            config.feat_size,
            config.image_size,
            seed=config.seed,
            device=config.device,
            progress=progress,
        ).fit(train)
    seconds["linear_probe"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    rankings: dict[str, ChannelRanking] = {}
    border, ratio = border_scores(view.data, view.scale)
    for name in config.rankers:
        if name == "linear":
            weights = {p: r.head[0].weight for p, r in linear.readouts_.items()}
            scores = linear_weight_scores(weights, rms)
        elif name == "pvf":
            groups = [image_group(i) for i in train.ids]
            scores = position_variance_fraction(view.data, view.scale, level, interval=False, groups=groups)
            scores = scores.pvf_channels
        elif name == "flip":
            flipped = [
                level_views(encode(FlippedImages(train_set, a), True), backbone.levels)[0]
                for a in ("horizontal", "vertical")
            ]
            scores = flip_scores(view.data, [f.data for f in flipped], std, view.scale)
        else:
            scores = border
        rankings[name] = ChannelRanking(name, level, np.asarray(scores, dtype=np.float64))
    seconds["rank"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    pem = {}
    if "pem" in config.readouts:
        setting = ReadoutSetting(config.kernel_size, config.depth, config.readout_padding)
        cells = [Cell(setting, p, config.seed + s) for s in range(config.seeds) for p in config.patterns]
        labels = {c: f"{level} {c.target} seed {c.seed}" for c in cells}
        pem = train_cells(
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
    seconds["pem_readouts"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    ks = channel_counts(config.k_percent, backbone.channels)
    scorer = _Scorer(test, pem, linear, targets, config)
    rows = _ablation_rows(scorer, rankings, ks, mean, config)
    seconds["ablation"] = time.perf_counter() - t4
    seconds["total"] = time.perf_counter() - t0
    maps = view.data.double().mean(0) * view.scale  # (C, h, w) mean over images, in std units:
    maps = (maps - mean[:, None, None]) / std.clamp_min(1e-12)[:, None, None]
    data = {
        "train": {"description": train.description, "n": len(train), "skipped": train.skipped},
        "test": {"description": test.description, "n": len(test), "skipped": test.skipped},
        "measured_at": view.resolution(),
    }
    return ChannelResult(
        config=config,
        backbone=backbone,
        level=level,
        ks=ks,
        rankings=rankings,
        border_ratio=ratio,
        moments=(mean.numpy(), std.numpy()),
        mean_maps=maps.numpy(),
        rows=rows,
        convergence={t.label: t.convergence for t in pem.values()},
        linear=linear.summary() if linear is not None else None,
        data=data,
        seconds=seconds,
    )


def _iv_text(iv: Interval) -> str:
    """'.486 [.45, .52]' (no interval: the point value alone)."""
    point = f"{iv.mean:.3f}"
    if math.isnan(iv.lo):
        return point
    return f"{point} [{iv.lo:.2f}, {iv.hi:.2f}]".replace("0.", ".")


def format_channel_table(result: ChannelResult, ablation: str | None = None) -> str:
    """SPC (mean over patterns) per readout and k with 95% intervals: intact, random k (the draws' spread in
    parentheses) and each ranker's top k, marked v where the top k lower SPC more than random (the stated test:
    the drop beyond random's interval above 0), ^ where less."""
    ablation = ablation or result.config.ablations[-1]
    names = list(result.rankings)
    lines = [
        f"{result.backbone.name} {result.level} ({len(result.border_ratio)} channels), {ablation} ablation; "
        f"SPC mean over {','.join(result.config.patterns)} on {result.data['test']['n']} test images [95%]; "
        "v / ^: the top k lower / raise SPC more than random k (the drop beyond random's interval excludes 0)",
        f"{'readout':<8}{'k':>10}  {'intact':<20}{'random k (sd of draws)':<28}" + "".join(f"{n:<21}" for n in names),
    ]
    mark = {"lower": "v", "higher": "^", "unresolved": " "}
    for readout in result.config.readouts:
        for pct, k in result.ks:
            rows = {
                r["ranker"]: r
                for r in result.rows
                if (r["readout"], r["pattern"], r["ablation"], r["k"]) == (readout, MEAN, ablation, k)
            }
            if not rows:
                continue
            any_row = next(iter(rows.values()))
            rand = f"{_iv_text(any_row['random_spc'])} ({any_row['random_draw_std']:.3f})"
            flag = "" if any_row["readout_converged"] else "  (not converged: --steps)"
            lines.append(
                f"{readout:<8}{f'{k} ({pct:g}%)':>10}  {_iv_text(any_row['intact_spc']):<20}{rand:<28}"
                + "".join(f"{_iv_text(rows[n]['top_spc']) + mark[rows[n]['verdict']]:<21}" for n in names)
                + flag
            )
    return "\n".join(lines)


def channel_report(result: ChannelResult) -> str:
    """report.md: what was ranked and ablated, the tables as printed, the stated test, the figures."""
    backbone, cfg, data = result.backbone, result.config, result.data
    unsettled = sorted(k for k, v in result.convergence.items() if not v.finished)
    return markdown_report(
        f"Position channels: {backbone.name} {result.level}",
        [
            f"Backbone: {backbone.name} ({backbone.weights_label}); input: {backbone.input_description}",
            f"Level: {result.level}, {len(result.border_ratio)} channels, measured {data['measured_at']}",
            f"Training images (rankers, readouts): {data['train']['description']} ({data['train']['n']})",
            f"Test images (ablation): {data['test']['description']} ({data['test']['n']})",
            f"Readouts: {', '.join(cfg.readouts)}; PEM seeds {cfg.seeds}; {cfg.draws} random draws per k",
            f"Test: {TEST_DOC}",
            "PEM readouts not converged: " + (", ".join(unsettled) if unsettled else "none"),
        ],
        [format_channel_table(result, mode) for mode in cfg.ablations],
        ["Rankers: " + "; ".join(f"**{k}**: {DEFINITIONS[k]}" for k in result.rankings)],
        ["ablation.png", "top_channels.png"],
    )


def write_channels(result: ChannelResult, out: Path, overwrite: bool = False) -> Path:
    """The run directory, atomically: config.json, rankings.json, channels.csv, ablation.json, ablation.csv,
    report.md, environment.json, ablation.png and top_channels.png."""
    cfg, backbone = result.config, result.backbone
    rows = [flat_row(r) for r in result.rows]
    with atomic_run_dir(out, overwrite) as tmp:
        resolved = {**backbone_record(backbone, cfg.image_size), "level": result.level, "k": result.ks}
        write_json(tmp / "config.json", {**cfg.to_dict(), "resolved": resolved, "data": result.data})
        write_json(
            tmp / "rankings.json",
            {
                "level": result.level,
                "channels": len(result.border_ratio),
                "measured_at": result.data["measured_at"],
                "definitions": {k: DEFINITIONS[k] for k in result.rankings},
                "rankings": {k: r.to_dict() for k, r in result.rankings.items()},
                "agreement": result.agreement(),
                "border_ratio": [_finite(v) for v in result.border_ratio],
            },
        )
        write_csv(tmp / "channels.csv", result.channel_rows())
        write_json(
            tmp / "ablation.json",
            {
                "test": TEST_DOC,
                "ablations": {
                    "zero": "the channels set to 0",
                    "mean": "each channel set to its mean over the training images and locations",
                },
                "pattern_mean": f"pattern '{MEAN}': each image's SPC averaged over the patterns first",
                "pem_convergence": {k: v.to_dict() for k, v in result.convergence.items()},
                "linear_probe": result.linear,
                "rows": rows,
                "seconds": result.seconds,
            },
        )
        write_csv(tmp / "ablation.csv", rows)
        (tmp / "report.md").write_text(channel_report(result), encoding="utf-8")
        write_json(tmp / "environment.json", environment(cfg.device))
        label = f"{backbone.name} ({backbone.weights_label}) {result.level}"
        ablation_plot(tmp / "ablation.png", rows, list(result.rankings), title=f"Channel ablation: {label}")
        top_channels_plot(
            tmp / "top_channels.png",
            result.mean_maps,
            {k: r.order[:8] for k, r in result.rankings.items()},
            title=f"Mean maps (std units) of each ranker's top channels: {label}",
        )
    return out
