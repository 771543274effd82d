"""One probe run, as the ``probe`` command does it: resolve and validate the settings, encode each image
set once, train a readout per target, score every test set and write one run directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..backbones import Backbone, create_backbone
from ..data import SYNTHETIC, synthetic_images, train_and_test_images
from ..errors import PosprobeError
from ..features.cache import FeatureCache, default_cache_dir
from ..features.encode import EncodedSet
from ..intervals import Interval
from ..output.plots import controls_plot, loss_curves_plot, prediction_grid
from ..output.rundir import atomic_run_dir, environment, write_csv, write_json, write_torch
from ..readouts.convergence import RULE, constant_map_loss, loss_curve
from ..readouts.engine import Scores
from ..readouts.linear import LinearProbe
from ..readouts.pem import check_readout_config
from ..readouts.probe import PositionProbe
from ..readouts.train import TrainConfig, get_profile
from ..targets import PATTERNS, load_target_image
from .controls import COSTS, DEFAULT_CONTROLS, Arm, ControlRun, check_rolls, flag_marks, run_controls, unavailable
from .controls import DOC as CONTROL_DOC

METRIC_FIELDS = (
    "spc_mean",
    "spc_lo",
    "spc_hi",
    "spc_std",
    "mae_mean",
    "mae_lo",
    "mae_hi",
    "mae_std",
    "n",
    "n_constant",
)


@dataclass(frozen=True)
class ReadoutSettings:
    """What every probing command shares: weights, data, readout, training, device and feature cache."""

    weights: str | None = None  # None: the backbone's default weights
    input_norm: str = "paper"  # [0, 1] as the authors' code; a stand-in gets the same mismatch (backbones.INPUT_NORMS)
    layers: tuple[str, ...] | None = None  # None: the backbone's default taps
    patterns: tuple[str, ...] = PATTERNS
    kernel_size: int = 3
    depth: int = 1
    readout_padding: int = 0
    feat_size: int = 28
    image_size: int = 224
    profile: str = "official"
    train: TrainConfig | None = None  # None: the named profile's schedule (readouts.train.get_profile)
    seed: int = 0
    device: str = "cpu"
    train_dir: str | None = None  # None: the bundled training photos
    test_dir: str | None = None  # None: the bundled test photos
    crops_per_photo: int = 8
    cache: bool = False  # encode through the feature cache (the commands turn it on)
    cache_dir: str | None = None  # None: $POSPROBE_CACHE or ~/.cache/posprobe
    cache_max_gb: float = 32.0  # a set whose features exceed this is streamed, not cached

    def __post_init__(self) -> None:
        if self.train is None:  # the profile's schedule, so that profile="quick" alone trains the quick one
            object.__setattr__(self, "train", get_profile(self.profile))

    def to_dict(self) -> dict:
        """The settings as recorded in a run's config.json; the cache folder as resolved ($POSPROBE_CACHE or
        the default), so the record says where the features are."""
        out = asdict(self)
        if self.cache and self.cache_dir is None:
            out["cache_dir"] = str(default_cache_dir())
        return out

    def feature_cache(self) -> FeatureCache | None:
        """The feature cache these settings ask for, or None (features in memory)."""
        return FeatureCache(self.cache_dir, self.cache_max_gb) if self.cache else None

    def image_sets(self) -> tuple[Dataset, Dataset]:
        """The training set and the natural test set (the user's folders, else the bundled photos)."""
        return train_and_test_images(self.train_dir, self.test_dir, self.image_size, self.crops_per_photo, self.seed)


@dataclass(frozen=True)
class ProbeRunConfig(ReadoutSettings):
    """Everything that determines a probe run's numbers; saved as config.json."""

    backbone: str = "vgg16"
    target_images: tuple[str, ...] = ()
    synthetic: tuple[str, ...] = SYNTHETIC
    strict: bool = False
    n_preview: int = 4
    backbone_padding: str | None = None  # None: the model's own padding (see backbones.padding)
    pos_embed: str = "keep"  # keep, zero or shuffle a ViT's position embedding
    readout: str = "pem"  # pem, or linear: the exact linear probe reported beside the PEM readout
    controls: tuple[str, ...] = DEFAULT_CONTROLS  # studies.controls.CONTROLS
    rolls: int = 4  # rolled copies of each natural test image (the rolled controls)


@dataclass
class ProbeRun:
    """What a run produced, before it is written."""

    config: ProbeRunConfig
    backbone: Backbone
    probe: PositionProbe
    train: EncodedSet
    tests: dict[str, EncodedSet]
    scores: dict[str, dict[str, Scores]]  # test set -> target -> scores
    previews: dict[str, tuple[list[str], torch.Tensor]]  # test set -> (ids, images (n, 3, S, S))
    seconds: dict[str, float]
    linear: LinearProbe | None = None  # when --readout linear
    linear_scores: dict[str, dict[str, Scores]] = field(default_factory=dict)
    controls: ControlRun | None = None  # when --controls names any

    def arms(self) -> list[Arm]:
        """The network's readouts and, with controls, every control arm (the network's first)."""
        return self.controls.arms if self.controls else [Arm("network", "natural", self.probe, self.scores)]

    def metric_rows(self) -> list[dict]:
        """One row per readout, pattern and test set; the readout, encoder and training columns appear only
        when they vary (with --readout linear, with --controls)."""
        rows = [
            {
                "readout": "pem",
                "encoder": a.encoder,
                "training": a.training,
                "pattern": t,
                "test_set": ts,
                **by_target[t].summary(),
                "status": a.probe.convergence_[t].status,
            }
            for a in self.arms()
            for t in a.probe.targets
            for ts, by_target in a.scores.items()
        ]
        if self.linear is not None:
            rows += [
                {
                    "readout": "linear",
                    "encoder": "network",
                    "training": "natural",
                    "pattern": t,
                    "test_set": ts,
                    **by_target[t].summary(),
                    "status": "closed form",
                }
                for t in self.linear.targets
                for ts, by_target in self.linear_scores.items()
            ]
        constant = [k for k in ("readout", "encoder", "training") if len({r[k] for r in rows}) == 1]
        return [{k: v for k, v in r.items() if k not in constant} for r in rows]


def prepare(config: ProbeRunConfig, progress: bool = True) -> tuple[Backbone, PositionProbe, object, dict[str, object]]:
    """Validate every setting and build the backbone, probe and image sets, before any heavy work."""
    check_readout_config(config.feat_size, config.kernel_size, config.depth, config.readout_padding)
    if config.image_size < 8:
        raise PosprobeError(f"--image-size must be at least 8; given {config.image_size}")
    if config.readout not in ("pem", "linear"):
        raise PosprobeError(f"--readout must be pem or linear; given '{config.readout}'")
    backbone = build_backbone(config, config.weights)
    backbone.level_shapes(config.image_size)  # a too-small input fails here, clearly
    extra = {Path(p).stem: load_target_image(p, config.image_size, config.image_size) for p in config.target_images}
    probe = new_probe(config, backbone, extra, progress)
    unavailable(config.controls, backbone)  # a control that would only repeat the network stops here
    check_rolls(config.rolls)
    train_set, natural = config.image_sets()
    tests: dict[str, object] = {natural.name: natural}
    for kind in config.synthetic:
        tests[kind] = synthetic_images(kind, config.image_size, config.seed)
    return backbone, probe, train_set, tests


def build_backbone(config: ProbeRunConfig, weights: str | None) -> Backbone:
    """The run's backbone (taps, padding surgery, position embedding, input) with ``weights``."""
    return create_backbone(
        config.backbone,
        weights,
        config.seed,
        config.input_norm,
        layers=config.layers,
        padding=config.backbone_padding,
        pos_embed=config.pos_embed,
        image_size=config.image_size,
    )


def new_probe(
    config: ProbeRunConfig, backbone: Backbone, extra_targets: dict[str, torch.Tensor], progress: bool = True
) -> PositionProbe:
    """An unfitted probe with the run's readout, training, device and feature cache on ``backbone``."""
    probe = PositionProbe(
        backbone,
        config.patterns,
        config.kernel_size,
        config.depth,
        config.readout_padding,
        config.feat_size,
        config.image_size,
        config.train,
        config.seed,
        config.device,
        extra_targets=extra_targets,
        strict=config.strict,
        progress=progress,
    )
    probe.cache = config.feature_cache()
    return probe


def execute(config: ProbeRunConfig, progress: bool = True) -> ProbeRun:
    backbone, probe, train_set, test_sets = prepare(config, progress)
    t0 = time.perf_counter()
    # Test sets first: they are small, and an unreadable one then fails before the costly training pass.
    tests = {}
    for name, images in test_sets.items():
        tests[name] = probe.encode(images, allow_stream=False)
    t1 = time.perf_counter()
    train = probe.encode(train_set)
    t2 = time.perf_counter()
    probe.fit(train)
    t3 = time.perf_counter()
    scores, previews = {}, {}
    for name, encoded in tests.items():
        images = test_sets[name]
        scores[name] = probe.score(encoded)
        shown = encoded.ids[: config.n_preview]  # the first decodable images, features rows 0..n-1
        previews[name] = (shown, torch.stack([images[images.ids.index(i)] for i in shown]))
    t4 = time.perf_counter()
    seconds = {"encode_tests": t1 - t0, "encode_train": t2 - t1, "train_readouts": t3 - t2, "score_tests": t4 - t3}
    run = ProbeRun(config, backbone, probe, train, tests, scores, previews, seconds)
    if config.controls:
        extra = {k: v for k, v in probe.targets.items() if k not in config.patterns}
        run.controls = run_controls(
            config.controls,
            probe,
            scores,
            lambda b: new_probe(config, b, extra, progress),
            lambda weights: build_backbone(config, weights),
            train_set,
            test_sets,
            next(iter(test_sets)),
            config.rolls,
            config.seed,
        )
        seconds["controls"] = run.controls.seconds
        t4 = time.perf_counter()
    if config.readout == "linear":
        linear = LinearProbe(
            backbone,
            config.patterns,
            config.kernel_size,
            config.readout_padding,
            config.feat_size,
            config.image_size,
            seed=config.seed,
            device=config.device,
            extra_targets={k: v for k, v in probe.targets.items() if k not in config.patterns},
            progress=progress,
        ).fit(train)
        run.linear, run.linear_scores = linear, {name: linear.score(enc) for name, enc in tests.items()}
        seconds["linear_probe"] = time.perf_counter() - t4
    return run


def format_table(rows: list[dict]) -> str:
    """Compact text table: one line per readout, pattern and test set, SPC and MAE with their 95% intervals
    over test images; a readout that did not converge or draws a flat map says so."""
    lines = [f"{'readout':<22}{'test set':<16}{'SPC [95% interval]':<25}{'MAE [95% interval]':<25}{'n':>5}{'const':>7}"]
    for r in rows:
        who = [r["pattern"], "lin" if r.get("readout") == "linear" else ""]
        who += [r.get("encoder", "network"), "rolled-train" if r.get("training") == "rolled" else ""]
        label = " ".join(w for w in who if w and w != "network")
        status = r["status"]
        lines.append(
            f"{label[:21]:<22}{r['test_set'][:15]:<16}{str(Interval(r['spc_mean'], r['spc_lo'], r['spc_hi'])):<25}"
            f"{str(Interval(r['mae_mean'], r['mae_lo'], r['mae_hi'])):<25}{r['n']:>5}{r['n_constant']:>7}"
            + ("" if status in ("converged", "closed form") else f"  {status}")
        )
    return "\n".join(lines)


def _flag_text(training_flags: str) -> str:
    """'pixels: flat map; random: still falling' -> '  ◌pixels ⚠random'."""
    marks = [mark + who for who, mark in flag_marks(training_flags).items()]
    return "  " + " ".join(marks) if marks else ""


def format_selectivity(rows: list[dict]) -> str:
    """Selectivity table: the network's SPC, each control's, the selectivity and the content share."""
    if not rows:
        return ""
    controls = [k[4:] for k in rows[0] if k.startswith("spc_") and not k.endswith(("_lo", "_hi"))]
    head = f"{'pattern':<10}{'test set':<16}{'SPC':>7}" + "".join(f"{c:>9}" for c in controls)
    lines = [head + f"{'selectivity [95% interval]':>30}{'content share':>28}  (◌ flat map, ⚠ unfinished)"]
    if any(r["training"] == "rolled" for r in rows):
        lines.insert(0, "rt: the readouts trained on rolled images")
    for r in rows:
        sel = str(Interval(r["selectivity"], r["selectivity_lo"], r["selectivity_hi"])) if "selectivity" in r else ""
        share = (
            str(Interval(r["content_share"], r["content_share_lo"], r["content_share_hi"]))
            if "content_share" in r
            else ""
        )
        label = r["pattern"] + (" rt" if r["training"] == "rolled" else "")
        lines.append(
            f"{label:<10}{r['test_set'][:15]:<16}{r['spc']:>7.3f}"
            + "".join(f"{r[f'spc_{c}']:>9.3f}" for c in controls)
            + f"{sel:>30}{share:>28}"
            + _flag_text(r.get("training_flags", ""))
        )
    return "\n".join(lines)


def write(run: ProbeRun, out: Path, overwrite: bool = False) -> Path:
    """Write the run directory atomically: config.json, metrics.csv/json, per_image.csv, environment.json,
    readouts.pt, loss_curves.png and the prediction figures."""
    cfg, probe = run.config, run.probe
    with atomic_run_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", {**cfg.to_dict(), "resolved": _resolved(run)})
        rows = run.metric_rows()
        write_csv(tmp / "metrics.csv", rows)
        write_csv(tmp / "per_image.csv", _per_image_rows(run))
        curves = {k: loss_curve(v) for k, v in probe.losses_.items()}
        write_json(
            tmp / "metrics.json",
            {
                "metrics": rows,
                "schedule": probe.schedule_.to_dict(),
                "convergence": {k: c.to_dict() for k, c in probe.convergence_.items()},
                "convergence_rule": RULE,
                "train_loss_curve": curves,
                "seconds": run.seconds,
                **({"controls": _controls_record(run.controls)} if run.controls is not None else {}),
                **({"linear_probe": run.linear.summary()} if run.linear is not None else {}),
            },
        )
        if run.controls is not None:
            selectivity = run.controls.selectivity
            write_csv(tmp / "selectivity.csv", selectivity)
            controls_plot(tmp / "controls.png", selectivity, f"{run.backbone.name} ({run.backbone.weights_label})")
        write_json(tmp / "environment.json", environment(cfg.device))
        extra = (
            {"linear_readouts": {k: r.state_dict() for k, r in run.linear.readouts_.items()}}
            if run.linear is not None
            else {}
        )
        readouts = {k: r.state_dict() for k, r in probe.readouts_.items()}
        if run.controls is not None:
            extra["control_readouts"] = {
                f"{a.encoder}/{a.training}": {k: r.state_dict() for k, r in a.probe.readouts_.items()}
                for a in run.controls.arms[1:]
            }
        write_torch(
            tmp / "readouts.pt",
            {"config": cfg.to_dict(), "in_channels": run.backbone.channels, "readouts": readouts, **extra},
        )
        panels, flags = {}, {}
        for arm in run.arms():  # the network's readouts, then every control's
            who = run.backbone.name if arm.encoder == "network" else f"{arm.encoder} control"
            panel = who + (", trained on rolled images" if arm.training == "rolled" else "")
            panel += f", k={cfg.kernel_size} depth={cfg.depth}"
            panels[panel] = {k: [loss_curve(v)] for k, v in arm.probe.losses_.items()}
            flags |= {(panel, k): c.status for k, c in arm.probe.convergence_.items() if c.status != "converged"}
        loss_curves_plot(
            tmp / "loss_curves.png",
            panels,
            {k: constant_map_loss(t) for k, t in probe.targets.items()},
            flags,
            [m for m in probe.schedule_.milestones if m < probe.schedule_.updates],
        )
        _prediction_figures(run, tmp / "predictions")
    return out


def _controls_record(controls: ControlRun) -> dict:
    """metrics.json's controls: which ran, what each costs, what was skipped, selectivity, every arm's training."""
    return {
        "names": list(controls.names),
        "costs": {k: COSTS[k] for k in controls.names},
        "definitions": CONTROL_DOC,
        "not_run": controls.notes,
        "rolled_test_set": controls.rolled,
        "selectivity": controls.selectivity,
        "arms": {
            f"{a.encoder}/{a.training}": {
                "backbone": a.probe.backbone.name,
                "weights": a.probe.backbone.weights_label,
                "convergence": {k: c.to_dict() for k, c in a.probe.convergence_.items()},
                "train_loss_curve": {k: loss_curve(v) for k, v in a.probe.losses_.items()},
            }
            for a in controls.arms
        },
    }


def backbone_record(backbone: Backbone, image_size: int) -> dict:
    """What a backbone resolved to, as config.json records it: weights, input, levels and their sizes, surgery."""
    return {
        "backbone_weights": backbone.weights_label,
        "input_norm": backbone.input_norm,
        "input": backbone.input_description,
        "levels": [asdict(level) for level in backbone.levels],
        "level_shapes": backbone.level_shapes(image_size),
        "channels": backbone.channels,
        "interpolation": backbone.interpolation,
        "backbone_padding": backbone.padding_report.to_dict() if backbone.padding_report else None,
        "pos_embed": backbone.pos_embed_note,
    }


def _resolved(run: ProbeRun) -> dict:
    """What the settings resolved to: the backbone, the schedule that ran, the image sets."""
    return {
        **backbone_record(run.backbone, run.config.image_size),
        "schedule": run.probe.schedule_.to_dict(),
        "train_set": {"description": run.train.description, "n": len(run.train), "skipped": run.train.skipped},
        "test_sets": {
            k: {"description": v.description, "n": len(v), "skipped": v.skipped} for k, v in run.tests.items()
        },
    }


def _per_image_rows(run: ProbeRun) -> list[dict]:
    """per_image.csv: every test image's SPC, MAE and constant flag, per readout, pattern and test set (a rolled
    test set: per source image, the mean over its rolls)."""
    arms = run.arms()
    rows = [
        {
            "encoder": a.encoder,
            "training": a.training,
            "pattern": t,
            "test_set": ts,
            "image": i,
            "spc": float(s.spc[k]),
            "mae": float(s.mae[k]),
            "constant": bool(s.constant[k]),
        }
        for a in arms
        for ts, by_target in a.scores.items()
        for t, s in by_target.items()
        for k, i in enumerate(s.ids)
    ]
    if len(arms) == 1:
        rows = [{k: v for k, v in r.items() if k not in ("encoder", "training")} for r in rows]
    return rows


def _prediction_figures(run: ProbeRun, folder: Path) -> None:
    """predictions/<test set>.png: the first images of each test set beside each target's prediction."""
    folder.mkdir()
    for name, (ids, images) in run.previews.items():
        preds = run.probe.predict(run.tests[name].head(len(ids)))
        spc = {t: run.scores[name][t].spc[: len(ids)] for t in preds}
        prediction_grid(
            folder / f"{name}.png",
            run.probe.targets,
            list(zip(ids, images)),
            preds,
            spc,
            title=f"{run.backbone.name} ({run.backbone.weights_label}) on {name}",
        )
