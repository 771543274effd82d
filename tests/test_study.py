"""The reproduce engine: preset structure, paper values, report, and a tiny end-to-end run of every preset."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from posprobe.data import TensorImages, synthetic_images
from posprobe.errors import PosprobeError
from posprobe.readouts.convergence import check_convergence
from posprobe.readouts.train import TrainConfig
from posprobe.studies.controls import DEFAULT_CONTROLS, control_presets
from posprobe.studies.paper import paper_cell, paper_values
from posprobe.studies.presets import FIGURES, PRESETS, TABLES, get_preset
from posprobe.studies.report import check_direction
from posprobe.studies.reproduce import run_reproduce
from posprobe.studies.study import (
    Direction,
    StudyPreset,
    StudyResult,
    Variant,
    parse_backbone_map,
    resolve_backbone,
    run_study,
    unsettled_seeds,
)
from posprobe.targets import make_target

PAPER_TABLES = Path(__file__).resolve().parent / "data" / "paper_tables.md"  # the paper's tables as printed


def test_every_paper_table_has_a_preset_and_figures_too():
    assert set(TABLES) == {"table1", "table2a", "table2b", "table3", "table4"}
    assert set(FIGURES) == {"fig-qualitative", "fig-padding", "fig-content-loss"}


def test_table_shapes_match_the_paper():
    t1 = PRESETS["table1"]
    assert [v.backbone for v in t1.variants] == ["posenet", "vgg16", "resnet152"]
    assert t1.patterns == ("H", "V", "G", "HS", "VS") and t1.test_sets == ("natural", "black", "white", "noise")
    assert sorted(v.depth for v in PRESETS["table2a"].variants) == [1, 1, 2, 2, 3, 3]
    assert sorted({v.kernel_size for v in PRESETS["table2b"].variants}) == [1, 3, 5, 7]
    assert [v.levels for v in PRESETS["table3"].variants] == [
        ("relu1_2",),
        ("relu2_2",),
        ("relu3_3",),
        ("relu4_3",),
        ("relu5_3",),
        None,
    ]
    t4 = {v.key: v for v in PRESETS["table4"].variants}
    assert [t4[f"posenet/pad{p}"].padding for p in (0, 1, 2)] == [0, 1, 2]
    assert t4["vgg16_nopad"].backbone == "vgg16_nopad"


def test_paper_values_match_the_printed_tables():
    """Every number in resources/paper_values.json appears in the paper's tables in their printed form."""
    text = PAPER_TABLES.read_text(encoding="utf-8")
    printed = lambda x: ("-" if x < 0 else "") + f"{abs(x):.3f}".lstrip("0")  # noqa: E731  0.742 -> .742
    for (table, row, pattern, test_set), rec in paper_values().items():
        cell = f"{printed(rec['spc'])}/{printed(rec['mae'])}"
        alt = cell.replace(".000/", ".0/")  # the paper prints .0 for constant maps
        assert cell in text or alt in text, (table, row, pattern, test_set, cell)


def test_paper_cells_spot_checks_and_not_printed():
    assert paper_cell("table1", "vgg16", "H", "natural") == {
        **paper_cell("table1", "vgg16", "H", "natural"),
        "spc": 0.742,
        "mae": 0.149,
    }
    assert paper_cell("table1", "resnet152", "G", "noise")["spc"] == 0.971
    assert paper_cell("table4", "vgg16_nopad", "HS", "natural")["spc"] == 0.011
    assert paper_cell("table2b", "vgg16/k5", "H", "natural") is None  # the paper prints no 5x5 row
    assert paper_cell("table3", "vgg16/f3", "HS", "natural") is None  # nor HS in Table 3
    assert paper_cell(None, "vgg16", "H", "natural") is None


def test_every_table_cell_has_a_paper_value_unless_the_paper_prints_none():
    for name in TABLES:
        preset = PRESETS[name]
        for v in preset.variants:
            for p in preset.patterns:
                for t in preset.test_sets:
                    cell = paper_cell(preset.paper_table, v.key, p, t)
                    not_printed = (name == "table2b" and v.key.endswith("/k5")) or (name == "table3" and p == "HS")
                    assert (cell is None) == not_printed, (name, v.key, p, t)


def test_backbone_map_parsing_and_errors():
    assert parse_backbone_map(["vgg16=vgg16_hed", "resnet152=resnet18:random"]) == {
        "vgg16": ("vgg16_hed", None),
        "resnet152": ("resnet18", "random"),
    }
    assert parse_backbone_map(["vgg16=vgg16_hed,resnet152=efficientnet_lite0"])["resnet152"] == (
        "efficientnet_lite0",
        None,
    )
    with pytest.raises(PosprobeError, match="PAPER=BACKBONE"):
        parse_backbone_map(["vgg16"])
    with pytest.raises(PosprobeError, match="Did you mean 'vgg16_hed'"):
        parse_backbone_map(["vgg16=vgg16_hd"])
    r = resolve_backbone("vgg16", None, {}, auto=True)  # ImageNet VGG16 is not in the (empty) hub cache
    assert (r.name, r.substituted) == ("vgg16_hed", True)
    assert not resolve_backbone("posenet", None, {}, auto=True).substituted
    # a row that names its own weights (the demo's random VGG16) is not remapped
    r = resolve_backbone("vgg16", "random", parse_backbone_map(["vgg16=vgg16_hed"]))
    assert (r.name, r.weights, r.substituted) == ("vgg16", "random", False)


def test_unknown_preset_suggests():
    with pytest.raises(PosprobeError, match="Did you mean 'table1'"):
        get_preset("tabel1")


def _result_with(grids: dict[str, torch.Tensor]) -> StudyResult:
    """A StudyResult holding only per-image SPC grids (S seeds, N images) of rows of study 's', pattern H."""
    per_image = {("s", row, "H", "natural"): {"spc": g, "mae": 1 - g} for row, g in grids.items()}
    return StudyResult([], {}, {}, {}, {}, per_image=per_image)


def test_direction_verdicts_are_three_way_from_paired_differences():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(1, 12, generator=g)  # what each image gives every readout: cancels in a paired step
    a = content + 0.01 * torch.randn(3, 12, generator=g)
    b = a + 0.2 + 0.01 * torch.randn(3, 12, generator=g)  # a clear rise
    c = b - 0.3 + 0.01 * torch.randn(3, 12, generator=g)  # a clear fall
    d = b + 0.05 * torch.randn(3, 12, generator=g)  # noise around b: no direction
    result = _result_with({"a": a, "b": b, "c": c, "d": d})
    said, detail = check_direction(Direction("rises", ("a", "b"), ("H",)), result, [], "s")
    assert said == "reproduced" and "b 0." in detail and "(up: Δ +0.19" in detail
    assert check_direction(Direction("rises", ("a", "b", "c"), ("H",)), result, [], "s")[0] == "not reproduced"
    assert check_direction(Direction("rises", ("b", "d"), ("H",)), result, [], "s")[0] == "inconclusive"
    assert check_direction(Direction("rises", ("x", "y"), ("H",)), result, [], "s")[0] == "not checked"
    # a step whose readout did not finish training in a seed decides nothing, even a clear fall
    still_falling = check_convergence([0.1 - 0.004 * i for i in range(20)], make_target("H", 8, 8))
    result.convergence[("s", "c", "H")] = [still_falling] * 3
    said, detail = check_direction(Direction("rises", ("a", "b", "c"), ("H",)), result, [], "s")
    assert said == "inconclusive" and "(unconverged: Δ -0.29" in detail


def test_a_paired_step_is_resolved_where_unpaired_spreads_overlap():
    """Image content moves both cells together: the step is clear on the pairs though each cell's own
    interval is wide; the verdict must use the pairs."""
    g = torch.Generator().manual_seed(1)
    content = torch.rand(1, 12, generator=g)
    a = content.expand(2, 12) + 0.001 * torch.randn(2, 12, generator=g)
    b = a + 0.02
    result = _result_with({"a": a, "b": b})
    assert check_direction(Direction("rises", ("a", "b"), ("H",)), result, [], "s")[0] == "reproduced"


def test_seeds_that_disagree_are_flagged_unless_a_flat_or_unfinished_seed_explains_it():
    g = torch.Generator().manual_seed(2)
    content = torch.rand(1, 12, generator=g)
    settled = content + 0.01 * torch.randn(3, 12, generator=g)
    unsettled = content + torch.tensor([[0.0], [0.08], [-0.08]])  # seed means differ: std .065
    result = _result_with({"a": settled, "b": unsettled, "c": unsettled})
    converged = check_convergence([0.05] * 20, make_target("H", 8, 8))
    flat = check_convergence([make_target("H", 8, 8).var().item()] * 20, make_target("H", 8, 8))
    result.convergence.update({("s", r, "H"): [converged] * 3 for r in ("a", "b")})
    result.convergence[("s", "c", "H")] = [converged, flat, converged]
    spread = unsettled_seeds(result)
    assert list(spread) == [("s", "b", "H", "natural")]
    assert spread[("s", "b", "H", "natural")] == pytest.approx(float(unsettled.mean(dim=1).std(correction=0)))


def _tiny_sets(n_train: int = 4, size: int = 64):
    g = torch.Generator().manual_seed(0)
    train = TensorImages(torch.rand(n_train, 3, size, size, generator=g), [f"t{i}" for i in range(n_train)], "tiny")
    natural = TensorImages(torch.rand(3, 3, size, size, generator=g), ["n0", "n1", "n2"], "tiny-test")
    tests = {"natural": natural, **{k: synthetic_images(k, size) for k in ("black", "white", "noise")}}
    return train, tests


@pytest.mark.slow
def test_every_cell_of_every_preset_is_produced_and_reported(tmp_path):
    """One tiny end-to-end run of all presets: every (row, pattern, test set) cell has a number and a figure."""
    train, tests = _tiny_sets()
    mapping = parse_backbone_map(["vgg16=vgg16:random", "vgg16_nopad=vgg16:random", "resnet152=resnet18:random"])
    presets = list(PRESETS.values())
    report, result = run_reproduce(
        presets,
        tmp_path / "out",
        TrainConfig(epochs=1, batch_size=2),
        "quick",
        train,
        tests,
        backbone_map=mapping,
        progress=False,
        image_size=64,
        feat_size=12,
        data_label="tiny",
    )
    produced = {(r["study"], r["row"], r["pattern"], r["test_set"]) for r in result.records}
    ran = [*presets, *control_presets(presets, DEFAULT_CONTROLS)]  # every table row's controls too
    expected = {(p.name, v.key, pat, t) for p in ran for v in p.variants for pat in p.patterns for t in p.test_sets}
    assert produced == expected
    out = tmp_path / "out"
    assert "## Controls: selectivity and content share" in report
    assert "| table1 | H | VGG16 → `vgg16` (stand-in) |" in report  # a substituted row says so here too
    selectivity = list(csv.DictReader((out / "selectivity.csv").open()))
    table1_vgg_h = next(r for r in selectivity if (r["study"], r["row"], r["pattern"]) == ("table1", "vgg16", "H"))
    table1_posenet_h = next(
        r for r in result.records if (r["study"], r["row"], r["pattern"]) == ("table1", "posenet", "H")
    )
    # the control is Table 1's own PosENet row (the same readout, trained once): selectivity is their difference
    assert float(table1_vgg_h["spc_pixels"]) == pytest.approx(table1_posenet_h["spc_mean"], abs=1e-6)
    assert float(table1_vgg_h["selectivity"]) == pytest.approx(
        float(table1_vgg_h["spc"]) - float(table1_vgg_h["spc_pixels"]), abs=1e-9
    )
    assert float(table1_vgg_h["content_share"]) == pytest.approx(
        float(table1_vgg_h["spc"]) - float(table1_vgg_h["spc_rolled"]), abs=1e-9
    )
    for name in (
        "selectivity.csv",
        "report.md",
        "results.csv",
        "results.json",
        "fig-padding.png",
        "fig-content-loss.png",
        "fig-qualitative_H.png",
        "fig-qualitative_G.png",
        "fig-qualitative_HS.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    rows = saved["rows"]
    first = saved["per_image"][0]
    assert len(first["spc"]) == 1 and len(first["spc"][0]) == len(tests[first["test_set"]])  # (seeds, images)
    assert (out / "loss_curves.png").is_file() and saved["schedules"] and saved["convergence"]
    vgg_h = next(
        r for r in rows if (r["study"], r["row"], r["pattern"], r["test_set"]) == ("table1", "vgg16", "H", "natural")
    )
    assert vgg_h["paper_spc"] == 0.742 and vgg_h["diff_spc"] == pytest.approx(vgg_h["spc"] - 0.742)
    assert "stand-in" in report and "n/p" in report
    for preset in presets:
        for d in preset.directions:
            assert d.claim in report
    assert re.search(r"reproduced|not reproduced", report)
    # rows that ask for the same readout share it: Table 1's VGG16 H equals Table 4's VGG16 H exactly
    t4_h = next(
        r for r in rows if (r["study"], r["row"], r["pattern"], r["test_set"]) == ("table4", "vgg16", "H", "natural")
    )
    assert t4_h["spc"] == vgg_h["spc"]


def test_no_controls_means_no_control_rows_and_no_controls_section(tmp_path):
    train, tests = _tiny_sets()
    preset = get_preset("table4")
    mapping = parse_backbone_map(["vgg16=vgg16:random", "vgg16_nopad=vgg16:random"])
    args = dict(backbone_map=mapping, progress=False, image_size=64, feat_size=12, data_label="tiny")
    config = TrainConfig(epochs=1, batch_size=2)
    report, result = run_reproduce([preset], tmp_path / "none", config, "quick", train, tests, controls=(), **args)
    assert "Controls" not in report and not (tmp_path / "none" / "selectivity.csv").exists()
    assert {r["study"] for r in result.records} == {"table4"}
    _, result = run_reproduce([preset], tmp_path / "on", config, "quick", train, tests, **args)
    assert any(r["study"].startswith("controls/") for r in result.records)  # they ran...
    saved = list(csv.DictReader((tmp_path / "on" / "results.csv").open()))
    assert {r["study"] for r in saved} == {"table4"}  # ...and stay in selectivity.csv, out of results.csv


def test_seeds_report_spread_and_a_missing_weight_says_how_to_substitute(tmp_path):
    train, tests = _tiny_sets()
    preset = StudyPreset(
        "mini",
        "mini",
        (Variant("posenet/pad1", "PosENet pad 1", "posenet", padding=1),),
        ("H",),
        ("natural",),
        paper_table="table4",
    )
    result = run_study(
        [preset], train, tests, TrainConfig(epochs=1, batch_size=2), seeds=2, image_size=64, progress=False
    )
    assert sorted(r["seed"] for r in result.records) == [0, 1]
    vgg = StudyPreset("v", "v", (Variant("vgg16", "VGG16", "vgg16"),), ("H",))
    with pytest.raises(PosprobeError, match="--backbone-map auto"):
        run_study([vgg], train, tests, TrainConfig(epochs=1), image_size=64, progress=False)


def test_a_study_through_the_feature_cache_encodes_once_and_repeats_exactly(tmp_path):
    """The second study on the same backbone and images reads every set from the cache, with equal numbers."""
    from posprobe.features.cache import FeatureCache

    train, tests = _tiny_sets()
    preset = StudyPreset(
        "mini",
        "mini",
        (
            Variant("posenet/pad1", "PosENet pad 1", "posenet", padding=1),
            Variant("posenet/depth2", "PosENet 2 layers", "posenet", depth=2),
        ),
        ("H", "G"),
        ("natural", "black"),
    )
    logs: list[str] = []
    cache = FeatureCache(tmp_path / "cache", log=logs.append)
    first = run_study(
        [preset], train, tests, TrainConfig(epochs=1, batch_size=2), image_size=64, progress=False, cache=cache
    )
    assert not any("cache hit" in m for m in logs) and len(cache.entries()) == 3  # train, natural, black
    logs.clear()
    second = run_study(
        [preset], train, tests, TrainConfig(epochs=1, batch_size=2), image_size=64, progress=False, cache=cache
    )
    assert sum("cache hit" in m for m in logs) == 3
    assert [r["spc_mean"] for r in second.records] == [r["spc_mean"] for r in first.records]


def test_the_demo_covers_tables_1_2b_and_4_and_every_figure_with_three_seeds():
    from posprobe.studies.demo import DEMO_PRESETS, DEMO_SEEDS

    names = {p.name for p in DEMO_PRESETS}
    assert {"table1", "table2b", "table4"} <= names
    assert {"fig-qualitative", "fig-padding", "fig-content-loss"} <= names
    kernels = {v.kernel_size for p in DEMO_PRESETS if p.name == "table2b" for v in p.variants}
    assert kernels == {1, 3, 7} and DEMO_SEEDS == 3
