"""Controls: what a readout scores without the network's own position, and the selectivity left over.

A readout's SPC mixes position the network encodes (padding, a position embedding) with position the *content*
of photos gives away (sky at the top, the subject in the centre) and the readout's own capacity (its padding).
Probing answers this with controls (Hewitt & Liang, 2019): the same readout, trained and scored the same way,
on inputs or encoders that lack the thing measured. posprobe's controls:

- ``pixels``: the readout on the raw RGB image (PosENet): what content colour and the readout's own padding
  give, with no encoder.
- ``random``: the same architecture (and surgery, taps, input) with seeded random weights: what the
  architecture gives before any training.
- ``rolled``: every readout also scored on the natural test images circularly rolled by seeded uniform shifts
  (``data.RolledImages``): content then says nothing about absolute position, so a network with no position
  signal of its own scores ~0 there. Per image the scores of its rolls are averaged, so intervals stay over
  images.
- ``rolled-train``: every readout trained again on the training images rolled once each, and scored on every
  test set: a readout that never saw content aligned with position cannot have learnt content cues.

Per training condition, pattern and test set: ``selectivity = SPC - max(0, SPC of the encoder controls)`` (pixels,
random; floored at chance, so it never exceeds the SPC) and each control's plain difference, and per readout
``content share = SPC(natural) - SPC(rolled)``, each with
the paired two-way bootstrap interval over the same test images (``intervals.paired_statistic``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import Dataset

from ..backbones import Backbone, create_backbone
from ..data import RolledImages
from ..errors import PosprobeError, unknown_choice
from ..intervals import Interval, paired_statistic
from ..readouts.engine import Scores, pooled
from ..readouts.probe import PositionProbe
from .study import StudyPreset, StudyResult, Variant

DOC = __doc__.split("\n\n", 1)[1].strip()  # the definitions, as metrics.json records them
CONTROLS = ("pixels", "random", "rolled", "rolled-train")
DEFAULT_CONTROLS = ("pixels", "rolled")
ENCODER_CONTROLS = ("pixels", "random")
COSTS = {
    "pixels": "one readout per pattern on the 3 raw RGB channels: no encoder pass, seconds",
    "random": "the same architecture with seeded random weights: its encoder over every image set and a second "
    "training (about the cost of the run again)",
    "rolled": "every readout scored on --rolls rolled copies of each natural test image: the encoder over rolls x "
    "test images (VGG16 on 2 cores: ~0.2 s each)",
    "rolled-train": "every readout trained again on the training images rolled once each: the encoder over the "
    "training set again and another training per readout",
}


def parse_controls(spec: str) -> tuple[str, ...]:
    """'pixels,rolled' (or 'all' / 'none' / '') -> the validated controls, in CONTROLS order."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if items == ["all"]:
        return CONTROLS
    if items == ["none"] or not items:
        return ()
    if {"all", "none"} & set(items):
        raise PosprobeError(f"--controls takes 'all', 'none' or a list of {', '.join(CONTROLS)}; given '{spec}'")
    for s in items:
        if s not in CONTROLS:
            raise unknown_choice("control", s, (*CONTROLS, "all", "none"))
    return tuple(c for c in CONTROLS if c in items)


@dataclass
class Arm:
    """One readout family: an encoder (the network or a control) trained on natural or rolled images."""

    encoder: str  # "network", "pixels" or "random"
    training: str  # "natural" or "rolled"
    probe: PositionProbe
    scores: dict[str, dict[str, Scores]] = field(default_factory=dict)  # test set -> target -> per-image scores


@dataclass
class ControlRun:
    """Every arm's scores, the rolled test set's name and what was skipped."""

    names: tuple[str, ...]
    arms: list[Arm]
    natural: str  # the natural test set's name
    rolled: str | None  # the rolled test set's name (None without the rolled controls)
    notes: list[str]  # controls that could not run here, and why
    seconds: float  # training and scoring every control arm

    def arm(self, encoder: str, training: str) -> Arm | None:
        return next((a for a in self.arms if a.encoder == encoder and a.training == training), None)

    @functools.cached_property
    def selectivity(self) -> list[dict]:
        """Per training, pattern and test set: the network's SPC, each encoder control's, the selectivity and
        each difference with paired intervals; and per readout the content share on the natural test set
        (bootstrapped once: the CSV, metrics.json, the figure and stdout all read these rows)."""
        rows = []
        for training in ("natural", "rolled"):
            net = self.arm("network", training)
            if net is None:
                continue
            controls = [a for a in self.arms if a.training == training and a.encoder != "network"]
            for ts, by_target in net.scores.items():
                for target, scores in by_target.items():
                    rows.append(self._selectivity(training, target, ts, scores, controls))
        return rows

    def _selectivity(self, training: str, target: str, test_set: str, scores: Scores, controls: list[Arm]) -> dict:
        others = [a.scores[test_set][target] for a in controls]
        grids = paired_spc([scores, *others])
        row = {"training": training, "pattern": target, "test_set": test_set, "n": int(grids[0].numel())}
        row.update(_interval("spc", paired_statistic(grids[:1], lambda m: m[:, 0])))
        for k, arm in enumerate(controls, start=1):
            row.update(_interval(f"spc_{arm.encoder}", paired_statistic(grids[k : k + 1], lambda m: m[:, 0])))
            row.update(_interval(f"minus_{arm.encoder}", paired_statistic(grids, _difference(k))))
        if controls:
            row.update(_interval("selectivity", paired_statistic(grids, selectivity)))
        net = self.arm("network", training)
        if self.rolled is not None and test_set == self.natural:
            pair = paired_spc([net.scores[self.natural][target], net.scores[self.rolled][target]])
            row.update(_interval("content_share", paired_statistic(pair, _difference(1))))
        # a control that did not finish training or drew a flat map understates what it could read: the
        # selectivity is then an upper bound, and the row says so
        row["training_flags"] = "; ".join(
            f"{a.encoder}: {a.probe.convergence_[target].status}"
            for a in (net, *controls)
            if a.probe.convergence_[target].status != "converged"
        )
        return row


def selectivity(means: torch.Tensor) -> torch.Tensor:
    """(R, k) means, the readout first and its controls after -> (R,) readout minus the best control, floored at
    chance: a control that anti-correlates with the target (SPC < 0) explains nothing, and subtracting its
    negative score would credit the network with more than its own SPC."""
    return means[:, 0] - means[:, 1:].clamp(min=0).max(dim=1).values


def _difference(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda m: m[:, 0] - m[:, k]


def _interval(name: str, iv: Interval) -> dict:
    return {name: iv.mean, f"{name}_lo": iv.lo, f"{name}_hi": iv.hi}


def control_columns(scores: Scores, pixels: Scores | None, rolled: Scores | None) -> dict:
    """One readout's pixel control and rolled score as columns: spc_pixels, selectivity (SPC − max(0, the pixel
    control's)), spc_rolled and content_share, each with its paired interval over the images both scored."""
    row = {}
    if pixels is not None:
        row |= _pixel_columns(*paired_spc([scores, pixels]))
    if rolled is not None:
        row |= _rolled_columns(*paired_spc([scores, rolled]))
    return row


def _pixel_columns(spc: torch.Tensor, pixels: torch.Tensor) -> dict:
    """spc_pixels and selectivity from paired (S, N) or (N,) SPC grids of a readout and its pixel control."""
    return _interval("spc_pixels", paired_statistic([pixels], lambda m: m[:, 0])) | _interval(
        "selectivity", paired_statistic([spc, pixels], selectivity)
    )


def _rolled_columns(spc: torch.Tensor, rolled: torch.Tensor) -> dict:
    """spc_rolled and content_share from paired SPC grids of a readout on the photos and on them rolled."""
    return _interval("spc_rolled", paired_statistic([rolled], lambda m: m[:, 0])) | _interval(
        "content_share", paired_statistic([spc, rolled], _difference(1))
    )


def paired_spc(scores: list[Scores]) -> list[torch.Tensor]:
    """The per-image SPC of several readouts on the images all of them scored, in one order (an image that one
    encoder could not read is dropped from all, so the comparison stays paired)."""
    common = [i for i in scores[0].ids if all(i in s.ids for s in scores[1:])]
    return [s.spc[[s.ids.index(i) for i in common]] for s in scores]


def flag_marks(training_flags: str) -> dict[str, str]:
    """A row's ``training_flags`` ('pixels: flat map; random: still falling') -> {'pixels': '◌', 'random': '⚠'}:
    ◌ a flat map, ⚠ a readout that did not finish training."""
    pairs = (f.partition(": ") for f in training_flags.split("; ") if f)
    return {who: "◌" if status == "flat map" else "⚠" for who, _, status in pairs}


def check_rolls(rolls: int) -> None:
    """--rolls, checked before any work."""
    if rolls < 1:
        raise PosprobeError(f"--rolls must be at least 1; given {rolls}")


def same_input(control: Backbone, network: Backbone) -> Backbone:
    """``control`` fed exactly what ``network`` is fed (a random-weight build would otherwise resolve
    ``--input-norm paper`` to plain [0, 1], while e.g. the HED stand-in gets x 57)."""
    control.mean.copy_(network.mean)
    control.std.copy_(network.std)
    control.input_norm = network.input_norm
    return control


def unavailable(names: tuple[str, ...], network: Backbone) -> dict[str, str]:
    """The asked encoder controls that would only repeat ``network``, and why; raises when nothing is left."""
    why = {}
    if "pixels" in names and network.name == "posenet":
        why["pixels"] = "the network is PosENet itself"
    if "random" in names and network.name == "posenet":
        why["random"] = "PosENet has no weights"
    elif "random" in names and str(network.weights) == "random":
        why["random"] = "the network's weights are random already"
    if names and len(why) == len(names):
        others = [c for c in CONTROLS if c not in why]
        raise PosprobeError(
            f"--controls {','.join(names)} cannot run on {network.name}: "
            + "; ".join(f"{k}: {v}" for k, v in why.items())
            + f"; choose from {', '.join(others)}, or none"
        )
    return why


def run_controls(
    names: tuple[str, ...],
    network: PositionProbe,
    network_scores: dict[str, dict[str, Scores]],
    make_probe: Callable[[Backbone], PositionProbe],
    build: Callable[[str], Backbone],
    train_set: Dataset,
    test_sets: dict[str, Dataset],
    natural: str,
    rolls: int,
    seed: int,
) -> ControlRun:
    """Train and score every control arm; the network's natural arm is ``network`` with its ``network_scores``.

    ``make_probe(backbone)`` gives an unfitted probe with the run's readout settings; ``build(weights)`` the
    network's architecture with other weights."""
    t0 = time.perf_counter()
    skipped = unavailable(names, network.backbone)
    encoders: list[tuple[str, PositionProbe]] = [("network", network)]
    for kind in ENCODER_CONTROLS:
        if kind in names and kind not in skipped:
            encoder = create_backbone("posenet") if kind == "pixels" else same_input(build("random"), network.backbone)
            encoders.append((kind, make_probe(encoder)))
    tests = dict(test_sets)
    rolled = None
    if "rolled" in names or "rolled-train" in names:
        rolled = RolledImages(test_sets[natural], rolls, seed)
        tests[rolled.name] = rolled
    arms = [Arm("network", "natural", network, dict(network_scores))]
    for kind, probe in encoders[1:]:
        arms.append(Arm(kind, "natural", probe.fit(train_set)))
    if "rolled-train" in names:
        rolled_train = RolledImages(train_set, 1, seed + 1)
        # a fresh probe per encoder: the natural arm's fitted readouts stay as they are
        arms += [Arm(kind, "rolled", make_probe(probe.backbone).fit(rolled_train)) for kind, probe in encoders]
    for arm in arms:
        for name, images in tests.items():
            if name not in arm.scores:
                scores = arm.probe.score(arm.probe.encode(images, allow_stream=False))
                arm.scores[name] = (
                    {t: pooled(s, images.source_of) for t, s in scores.items()} if images is rolled else scores
                )
    notes = [f"{k}: not run, {v}" for k, v in skipped.items()]
    return ControlRun(names, arms, natural, rolled.name if rolled else None, notes, time.perf_counter() - t0)


# ---- the same controls on a study's table rows ------------------------------------------------------------------

ROLLED_TEST_SET = "natural-rolled"  # a study's natural test images, rolled (data.RolledImages)
CONTROL_STUDY = "controls/"  # prefix of the hidden presets that hold a study's control cells
STUDY_CONTROLS = ("pixels", "rolled")  # what a study's rows get (random weights and rolled training: probe)
GUIDE = (
    "**Controls.** selectivity = SPC − max(0, the SPC of PosENet): PosENet is the same readout on the raw pixels, "
    "trained and scored the same way, so selectivity is the position the network adds beyond what colour and the "
    "readout itself give (floored at chance: a control below 0 explains nothing). The rolled photos are the test "
    "photos circularly rolled by seeded uniform shifts (several per photo, averaged per photo), so their content "
    "says nothing about absolute position: a network with no position of its own scores about 0 there. Content "
    "share = SPC on the photos − SPC on them rolled: how much the score depends on the photos being upright and "
    "in place, which is their layout (sky up, subject central) helping the readout, but also moved content and "
    "the roll's seam misleading it (`probe --controls rolled-train` separates the two: a readout trained on "
    "rolled images cannot have learnt the layout). ◌ after a score: its readout drew a flat map in some seed; ⚠: it "
    "did not finish training. A PosENet control so marked may understate what its input holds, so the selectivity "
    "is then an upper bound."
)


def study_controls(names: Sequence[str]) -> tuple[str, ...]:
    """The controls a study's rows can have, checked: ``pixels`` and ``rolled`` (the costly ones are probe's)."""
    for kind in names:
        if kind not in STUDY_CONTROLS:
            raise PosprobeError(
                f"--controls {kind} runs only in posprobe probe; reproduce, demo and layer-curve run "
                f"{', '.join(STUDY_CONTROLS)} or none"
            )
    return tuple(names)


def control_presets(presets: Sequence[StudyPreset], controls: Sequence[str]) -> list[StudyPreset]:
    """Per table, a hidden preset with each network row again (the same readout cells: no extra training) and
    a PosENet row with the same readout (pixels), scored on the natural and, with ``rolled``, the rolled test
    images. Rows that tables already hold are trained once (the engine shares equal cells). No controls: none."""
    if not controls:
        return []
    out = []
    for preset in presets:
        rows = [v for v in preset.variants if v.backbone != "posenet"]
        if preset.figure is not None or not rows or "natural" not in preset.test_sets:
            continue
        variants = []
        for v in rows:
            variants.append(v)
            if "pixels" in controls:
                pixels = Variant(
                    f"{v.key}/pixels", f"PosENet, the readout of {v.label}", "posenet", None, v.kernel_size, v.depth
                )
                variants.append(replace(pixels, padding=v.padding))
        tests = ("natural", ROLLED_TEST_SET) if "rolled" in controls else ("natural",)
        out.append(StudyPreset(CONTROL_STUDY + preset.name, f"controls of {preset.name}", tuple(variants),
                               preset.patterns, tests))  # fmt: skip
    return out


def study_selectivity(result: StudyResult, presets: Sequence[StudyPreset]) -> list[dict]:
    """Per table row and pattern: SPC, the pixel control's SPC with the same readout, the selectivity, the SPC
    on the rolled photos and the content share, each with its paired interval over images and seeds, and the
    training flags of the row's readout and its control (a flat or unfinished control: an upper bound)."""
    rows = []
    for preset in control_presets(presets, ("pixels", "rolled")):
        for v in preset.variants:
            if v.backbone == "posenet":
                continue
            for pattern in preset.patterns:
                net = result.per_image.get((preset.name, v.key, pattern, "natural"))
                if net is not None:
                    rows.append(_study_row(result, preset.name, v, pattern, net["spc"]))
    return rows


def _study_row(result: StudyResult, study: str, v: Variant, pattern: str, spc: torch.Tensor) -> dict:
    """One row of study_selectivity: the network row ``v`` of the hidden preset ``study``, its (S, N) ``spc``."""
    ran = result.backbones.get(v.backbone_key, {})
    row = {"study": study[len(CONTROL_STUDY) :], "row": v.key, "label": v.label, "pattern": pattern}
    row |= {"ran_as": ran.get("ran_as", v.backbone), "substituted": bool(ran.get("substituted"))}
    row.update(_interval("spc", paired_statistic([spc], lambda m: m[:, 0])))
    pixels = result.per_image.get((study, f"{v.key}/pixels", pattern, "natural"))
    if pixels is not None:
        row |= _pixel_columns(spc, pixels["spc"])
    rolled = result.per_image.get((study, v.key, pattern, ROLLED_TEST_SET))
    if rolled is not None:
        row |= _rolled_columns(spc, rolled["spc"])
    flags = []
    for who, key in (("network", v.key), ("pixels", f"{v.key}/pixels")):
        verdicts = result.convergence.get((study, key, pattern), [])
        flags += [f"{who}: {status}" for status in sorted({c.status for c in verdicts} - {"converged"})]
    row["training_flags"] = "; ".join(flags)
    return row
