"""One group of a sweep (one backbone setting on one training set) run in one process, wherever an executor put
it: build the backbone, encode the test sets and the training set once, train each seed's PEM readouts together,
solve the linear probes, measure the levels, and hand every cell's result to ``put`` as soon as it exists.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict

from ..backbones import Backbone, create_backbone
from ..data import (
    FolderImages,
    RolledImages,
    bundled_test_set,
    bundled_train_set,
    image_group,
    synthetic_images,
)
from ..errors import PosprobeError, describe_os_error
from ..features.cache import FeatureCache, encode_images
from ..features.encode import EncodedSet
from ..features.levels import select_levels
from ..output.rundir import resolve_device
from ..readouts.convergence import loss_curve
from ..readouts.engine import Cell, ReadoutSetting, Scores, pooled, score_cells, train_cells
from ..readouts.linear import LinearProbe
from ..targets import make_target
from .layer_curve import position_variance_by_level
from .sweep_spec import ALL, BUNDLED, NATURAL, ROLLED, Group, SweepCell, SweepSpec, cell_id
from .sweep_store import CellStore, now


@functools.lru_cache(maxsize=8)
def _image_set(which: str, folder: str, image_size: int, crops: int, rolls: int):
    """An image set by name, built once per process (groups of one sweep share the decoded bundled photos)."""
    if which == "train":
        return bundled_train_set(image_size, crops, 0) if folder == BUNDLED else FolderImages(folder, image_size)
    natural = bundled_test_set(image_size) if folder == BUNDLED else FolderImages(folder, image_size)
    if which == NATURAL:
        return natural
    if which == ROLLED:
        return RolledImages(natural, rolls, 0)
    return synthetic_images(which, image_size, 0)


def _test_sets(spec: SweepSpec) -> dict:
    d = spec.data
    return {t: _image_set(t, d.natural, d.image_size, d.crops_per_photo, d.rolls) for t in d.test}


def _train_set(spec: SweepSpec, train: str):
    d = spec.data
    return _image_set("train", train, d.image_size, d.crops_per_photo, d.rolls)


def build_backbone(spec: SweepSpec, group: Group, weights: str | None = None) -> Backbone:
    """The group's backbone as the spec sets it up (``weights`` instead of its own: the dry run's random ones)."""
    s = group.setting
    backbone = create_backbone(
        s.name,
        weights or s.weights,
        s.weights_seed,
        spec.data.input_norm,
        layers=s.taps,
        padding=s.padding,
        pos_embed=s.pos_embed,
        image_size=spec.data.image_size,
    )
    backbone.level_shapes(spec.data.image_size)  # an input too small for it fails here
    return backbone


def cell_result(spec: SweepSpec, group: Group, cell: SweepCell, status: str, error: str = "", **fields) -> dict:
    """A cell's result file: what it is, how it went ("ok" or "failed" and why), where and when it ran."""
    return {
        "id": cell_id(spec, cell),
        "status": status,
        "error": error,
        "group": group.label,
        "cell": cell.describe(),
        "identity": {
            **asdict(cell.setting),
            "train": cell.train,
            "levels": cell.levels,
            "kind": cell.kind,
            "method": cell.method,
            "pattern": cell.pattern,
            "seed": cell.seed,
        },
        "seconds": {},
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "finished": now(),
        **fields,
    }


def error_line(err: BaseException) -> str:
    """An error in one line for a cell's file and the console: a user's error as it reads, an OS error with its
    path, anything else with its type and the line of code that raised it."""
    if isinstance(err, PosprobeError):
        message = str(err)
    elif isinstance(err, OSError):
        message = describe_os_error(err)
    else:
        tb = traceback.extract_tb(err.__traceback__)
        message = f"{type(err).__name__}: {err}" + (f" (at {tb[-1].line})" if tb else "")
    message = message.replace("pass --weights random", 'use weights = "random"')  # the spec's words, not probe's
    return " ".join(message.split()) or type(err).__name__  # torch's messages span lines


def _unless_routine(message: str) -> None:
    """The feature cache's messages but its routine notes (an entry's size, a hit): warnings still reach stderr."""
    if not message.startswith(("feature cache: ", "feature cache hit: ")):
        print(f"posprobe: {message}", file=sys.stderr)


class GroupRun:
    """One group's work in one process: its backbone, encoded sets, and the results it hands to ``put``."""

    def __init__(self, spec: SweepSpec, group: Group, put: Callable[[dict], object], progress: bool, fail_fast: bool):
        self.spec, self.group, self.put, self.progress, self.fail_fast = spec, group, put, progress, fail_fast
        self.device = "cpu"
        self.seconds: dict[str, float] = {}
        self.facts: dict = {}  # what the backbone ran as, once built

    def fail(self, cells: Sequence[SweepCell], err: BaseException) -> None:
        """Record ``cells`` as failed with ``err`` in one line; re-raise under --fail-fast."""
        message = error_line(err)
        for cell in cells:
            self.put(self._result(cell, "failed", error=message))
        if self.fail_fast:
            raise PosprobeError(f"{self.group.label}: {cells[0].describe()} failed: {message} (--fail-fast)")

    def _result(self, cell: SweepCell, status: str, error: str = "", **fields) -> dict:
        """A cell's result; where the backbone was built, with its level's place (a failed seed's too, so that the
        summary sees the same cell in every seed)."""
        where = self._level_facts(cell.levels) if self.facts else {}
        return cell_result(
            self.spec,
            self.group,
            cell,
            status,
            error,
            backbone=self.facts,
            seconds=dict(self.seconds),
            **where,
            **fields,
        )

    def run(self, cells: Sequence[SweepCell]) -> None:
        started = time.perf_counter()
        try:
            self.device = resolve_device(self.spec.device)  # on this node: 'auto' takes its GPU if it has one
            self.backbone = build_backbone(self.spec, self.group)
            self._note_backbone()
            self.tests, self.train = self._encode()
        except Exception as err:  # every cell of the group needs the backbone and features
            self.fail(cells, err)
            return
        self.seconds["encode"] = time.perf_counter() - started
        pem = [c for c in cells if c.kind == "pem"]
        for seed in dict.fromkeys(c.seed for c in pem):
            self._guarded([c for c in pem if c.seed == seed], self._train_pem)
        linear: dict[tuple, list[SweepCell]] = {}
        for c in cells:
            if c.kind == "linear":
                linear.setdefault((c.readout, c.levels, c.seed), []).append(c)
        for group in linear.values():
            self._guarded(group, self._fit_linear)
        measures = [c for c in cells if c.kind == "measure"]
        if measures:
            self._guarded(measures, self._measure)

    def _guarded(self, cells: list[SweepCell], work: Callable[[list[SweepCell]], None]) -> None:
        """Run ``work`` on cells that succeed or fail together (one joint training, one linear fit)."""
        try:
            work(cells)
        except Exception as err:
            self.fail(cells, err)

    def _note_backbone(self) -> None:
        b, size = self.backbone, self.spec.data.image_size
        self.shapes = b.level_shapes(size)
        self.facts = {
            "weights": b.weights_label,
            "stand_in": "stand-in" in str(b.weights_label),
            "input": b.input_description,
            "levels": [lv.name for lv in b.levels],
            "level_shapes": [list(s) for s in self.shapes],
            "padding": b.padding_report.to_dict() if b.padding_report else None,
            "pos_embed": b.pos_embed_note,
        }

    def _encode(self) -> tuple[dict[str, EncodedSet], object]:
        """Test sets first (small: an unreadable one fails before the training set's long pass), then training."""
        spec = self.spec
        cache = None
        if spec.cache.enabled:  # --quiet keeps the cache's warnings, not its notes
            quiet = {} if self.progress else {"log": _unless_routine}
            cache = FeatureCache(spec.cache.dir, spec.cache.max_gb, **quiet)
        common = dict(device=self.device, progress=self.progress, cache=cache)
        tests = {
            name: encode_images(self.backbone, images, spec.data.feat_size, allow_stream=False, **common)
            for name, images in _test_sets(spec).items()
        }
        train = encode_images(self.backbone, _train_set(spec, self.group.train), spec.data.feat_size, **common)
        self.data = {
            "train": {"description": train.description, "n": len(train), "skipped": len(train.skipped)},
            **{n: {"description": t.description, "n": len(t), "skipped": len(t.skipped)} for n, t in tests.items()},
        }
        return tests, train

    def _levels(self, cell: SweepCell) -> tuple[str, ...] | None:
        return None if cell.levels == ALL else tuple(cell.levels.split("+"))

    def _level_facts(self, levels: str) -> dict:
        """Where a cell's level sits: index and relative depth (0 first tap .. 1 last); none for 'all'."""
        names = self.facts["levels"]
        if levels not in names:
            return {"level_index": None, "depth": None}
        i = names.index(levels)
        return {"level_index": i, "depth": i / (len(names) - 1) if len(names) > 1 else 0.0}

    def _scored(self, cell: SweepCell, scores: dict[str, Scores], **fields) -> dict:
        """An ok result from each test set's per-image scores (pooled over a rolled set's copies)."""
        rows, per_image = [], {}
        for name, sc in scores.items():
            if name == ROLLED:
                sc = pooled(sc, _test_sets(self.spec)[ROLLED].source_of)
            s = sc.summary()
            rows.append(
                {
                    "test_set": name,
                    "metric": "spc",
                    "value": s["spc_mean"],
                    "lo": s["spc_lo"],
                    "hi": s["spc_hi"],
                    "mae": s["mae_mean"],
                    "mae_lo": s["mae_lo"],
                    "mae_hi": s["mae_hi"],
                    "n": s["n"],
                    "n_constant": s["n_constant"],
                }
            )
            per_image[name] = {"ids": list(sc.ids), "spc": sc.spc.tolist(), "mae": sc.mae.tolist()}
        return self._result(cell, "ok", rows=rows, per_image=per_image, data=self.data, **fields)

    def _train_pem(self, cells: list[SweepCell]) -> None:
        """One seed's PEM readouts, trained together in the same passes, scored on every test set."""
        spec, started = self.spec, time.perf_counter()
        size, fs = spec.data.image_size, spec.data.feat_size
        engine = {
            c: Cell(
                ReadoutSetting(c.readout.kernel_size, c.readout.depth, c.readout.padding, self._levels(c)),
                c.pattern,
                c.seed,
            )
            for c in cells
        }
        targets = {p: make_target(p, size, size) for p in dict.fromkeys(c.pattern for c in cells)}
        labels = {e: f"{self.group.label} / {c.describe()}" for c, e in engine.items()}
        trained = train_cells(
            self.train,
            list(engine.values()),
            targets,
            self.backbone,
            spec.train,
            fs,
            size,
            self.device,
            self.progress,
            labels,
        )
        scores = {name: score_cells(trained, t, targets, self.device) for name, t in self.tests.items()}
        self.seconds["train"] = (time.perf_counter() - started) / len(cells)
        for c, e in engine.items():
            done = trained[e]
            training = {
                "updates": done.schedule.updates,
                "images": done.schedule.images,
                "schedule": done.schedule.describe(),
                "convergence": done.convergence.status,
                "verdict": done.convergence.to_dict(),
                "loss_curve": loss_curve(done.losses),
            }
            self.put(self._scored(c, {n: s[e] for n, s in scores.items()}, training=training))

    def _fit_linear(self, cells: list[SweepCell]) -> None:
        """The exact linear probe of one kernel on one level choice, every pattern of ``cells`` in one fit."""
        spec, started, c0 = self.spec, time.perf_counter(), cells[0]
        names = self._levels(c0)
        view = (lambda s: s) if names is None else (lambda s: select_levels(s, self.backbone.levels, names))
        if names is not None and not isinstance(self.train, EncodedSet):
            raise PosprobeError("the linear probe of single levels needs the training features cached; raise max_gb")
        probe = LinearProbe(
            None,
            [c.pattern for c in cells],
            c0.readout.kernel_size,
            c0.readout.padding,
            spec.data.feat_size,
            spec.data.image_size,
            seed=c0.seed,
            device=self.device,
            progress=self.progress,
        ).fit(view(self.train))
        scores = {name: probe.score(view(t)) for name, t in self.tests.items()}
        self.seconds["train"] = (time.perf_counter() - started) / len(cells)
        for c in cells:
            training = {"alpha": probe.alpha_[c.pattern], "solver": probe.solver_, "convergence": "exact"}
            self.put(self._scored(c, {n: s[c.pattern] for n, s in scores.items()}, training=training))

    def _measure(self, cells: list[SweepCell]) -> None:
        """The position-variance fraction of every level of the training features (one pass), and pooled."""
        started = time.perf_counter()
        if not isinstance(self.train, EncodedSet):
            raise PosprobeError("the position-variance fraction needs the training features cached; raise max_gb")
        pvf = position_variance_by_level(self.backbone, self.train, self.shapes, self.device)
        self.seconds["train"] = (time.perf_counter() - started) / len(cells)
        groups = len({image_group(i) for i in self.train.ids})
        for c in cells:
            p = pvf[c.levels]
            row = {
                "test_set": "train",
                "metric": "pvf",
                "value": p["pvf"],
                "lo": p["pvf_lo"],
                "hi": p["pvf_hi"],
                "n": len(self.train),
                "groups": groups,
                "measured_at": p["pvf_measured_at"],
            }
            self.put(self._result(c, "ok", rows=[row], data=self.data))


def todo(spec: SweepSpec, groups: Sequence[Group], store: CellStore) -> list[Group]:
    """The groups with cells still to do, each with only those cells."""
    out = []
    for g in groups:
        done = store.finished(cell_id(spec, c) for c in g.cells)
        left = tuple(c for c in g.cells if cell_id(spec, c) not in done)
        if left:
            out.append(Group(g.setting, g.train, left))
    return out


def run_group(
    spec: SweepSpec, group: Group, put: Callable[[dict], object], progress: bool = False, fail_fast: bool = False
) -> list[dict]:
    """Every cell of ``group``; each result is handed to ``put`` as soon as it exists, and all are returned."""
    results: list[dict] = []

    def keep(result: dict) -> None:
        if put(result) is not False:  # False: the store already holds the cell as finished
            results.append(result)

    GroupRun(spec, group, keep, progress, fail_fast).run(group.cells)
    return results


def plural(n: int, noun: str) -> str:
    """'1 cell', '3 cells'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def group_line(i: int, n: int, group: Group, results: Sequence[dict], seconds: float) -> str:
    """'[2/5] tv:resnet18 · random: 24 cells done (31 s)', or how many failed and the first error."""
    failed = [r for r in results if r["status"] != "ok"]
    outcome = f"{len(failed)} failed: {failed[0]['error']}" if failed else "done"
    took = f" ({seconds:.0f} s)" if math.isfinite(seconds) else ""
    return f"[{i}/{n}] {group.label}: {plural(len(group.cells), 'cell')} {outcome}{took}"
