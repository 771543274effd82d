"""`posprobe sweep`: a spec's every mistake is one line naming its place; the plan's cells and their ids; a local run
end to end through the CLI, checked against the probe's own numbers and intervals; resuming after a finished, an
extended, a killed and a failed run; the folder's safety; the dry run; `sweep-report`.

One grid runs once for the module (posenet and a random ResNet-18 at 32 px, 10 updates); the resume and failure
tests use PosENet alone, which encodes instantly.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, save_image
from conftest import invoke as posprobe
from posprobe.backbones import create_backbone
from posprobe.data import RolledImages, bundled_test_set, bundled_train_set
from posprobe.errors import PosprobeError
from posprobe.intervals import bootstrap, paired_statistic
from posprobe.readouts.linear import LinearProbe
from posprobe.readouts.probe import PositionProbe
from posprobe.readouts.train import get_profile
from posprobe.studies import sweep_group, sweep_table
from posprobe.studies.sweep_spec import cell_id, parse_spec, plan
from posprobe.studies.sweep_store import CellStore, SweepLock

SIZE, FEAT, STEPS = 32, 8, 10
OUTPUTS = ("results.csv", "results.parquet", "summary.csv", "report.html", "sweep.json", "spec.toml", "events.jsonl")

# posenet (one level, 'image') and a random ResNet-18 (taps relu, layer1..layer4) on 3 test sets; the feature cache is
# off so that the reference probes below see the very same float32 features
GRID = f"""
name = "grid"
patterns = ["H", "G"]
seeds = 2
[data]
test = ["natural", "black", "rolled"]
image_size = {SIZE}
feat_size = {FEAT}
crops_per_photo = 1
rolls = 2
[training]
steps = {STEPS}
[cache]
enabled = false
[[backbones]]
name = "posenet"
[[backbones]]
name = "tv:resnet18"
weights = "random"
layers = ["all", "layer3,layer1", "layer2"]
[[readouts]]
kind = "pem"
kernel_size = [1, 3]
[[readouts]]
kind = "linear"
kernel_size = 1
[[measures]]
kind = "pvf"
"""
R18_LEVELS = ("relu", "layer1", "layer2", "layer3", "layer4")

# PosENet alone: the smallest real sweep (one group, 2 patterns x 2 seeds = 4 cells)
FAST = f"""
name = "fast"
patterns = ["H", "G"]
seeds = 2
[data]
test = ["natural", "black"]
image_size = {SIZE}
feat_size = {FEAT}
crops_per_photo = 1
[training]
steps = 4
batch_size = 8
[[backbones]]
name = "posenet"
[[readouts]]
kind = "pem"
kernel_size = 1
"""


def write_spec(folder: Path, text: str, name: str = "spec.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(encoding="utf-8")))


def number(text: str) -> float:
    return float(text) if text not in ("", "None") else math.nan


def cells(out: Path) -> dict[str, dict]:
    """Every cell file of a sweep folder, by id."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


def events(out: Path, what: str) -> list[dict]:
    return [e for line in (out / "events.jsonl").read_text().splitlines() if (e := json.loads(line))["event"] == what]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def find(results: dict[str, dict], **identity) -> dict:
    """The one cell whose identity has these values."""
    found = [r for r in results.values() if all(r["identity"][k] == v for k, v in identity.items())]
    assert len(found) == 1, (identity, len(found))
    return found[0]


# --- the spec ------------------------------------------------------------------------------------------------------

BASE = f"""
patterns = ["H"]
[data]
image_size = {SIZE}
feat_size = {FEAT}
[[backbones]]
name = "tv:resnet18"
weights = "random"
[[readouts]]
kind = "pem"
kernel_size = 1
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


BAD_SPECS = {
    "invalid TOML": ("x = = 1", ["not valid TOML", "line 1"]),
    "unknown top-level key": (
        'patern = ["H"]\n' + BASE,
        ["unknown key in the spec 'patern'", "Did you mean 'patterns'"],
    ),
    "unknown readout key": (BASE + "kernal = 3\n", ["[[readouts]] 1", "'kernal'", "Did you mean 'kernel_size'"]),
    "unknown backbone": (edit('"tv:resnet18"', '"resnet99"'), ["[[backbones]] 1.name", "unknown backbone 'resnet99'"]),
    "unknown family": (edit('"tv:resnet18"', '"tf:resnet18"'), ["[[backbones]] 1.name", "backbone family 'tf:'"]),
    "unknown layer": (
        edit('weights = "random"', 'weights = "random"\nlayers = ["layer9"]'),
        ["[[backbones]] 1.layers", "'layer9'", "Did you mean 'layer4'"],
    ),
    "a layer twice": (
        edit('weights = "random"', 'weights = "random"\nlayers = ["layer1,layer1"]'),
        ["[[backbones]] 1.layers", "'layer1' twice"],
    ),
    "unknown tap": (edit('weights = "random"', 'weights = "random"\ntaps = "layer9"'), ["[[backbones]] 1.taps"]),
    "unknown padding": (edit('weights = "random"', 'padding = "refelct"'), ["[[backbones]] 1.padding", "'reflect'"]),
    "misspelt weights": (
        edit('weights = "random"', 'weights = "IMAGENET1K_V2"'),
        ["weights of tv:resnet18 in [[backbones]] 1.weights", "'IMAGENET1K_V1'"],
    ),
    "negative weights seed": (edit('weights = "random"', "weights_seed = -1"), ["[[backbones]] 1.weights_seed", "-1"]),
    "unknown pattern": (edit('["H"]', '["H", "Q"]'), ["patterns", "unknown pattern 'Q'"]),
    "unknown test set": (edit("[data]", '[data]\ntest = ["natral"]'), ["[data].test", "'natral'", "'natural'"]),
    "unknown input norm": (edit("[data]", '[data]\ninput_norm = "imagnet"'), ["[data].input_norm", "'imagenet'"]),
    "kernel too large": (edit("kernel_size = 1", "kernel_size = [1, 9]"), ["[[readouts]] 1", "impossible readout"]),
    "deep linear probe": (edit('"pem"', '"linear"') + "depth = 2\n", ["[[readouts]] 1", "depth must be 1"]),
    "kernel as text": (edit("kernel_size = 1", 'kernel_size = "3"'), ["[[readouts]] 1.kernel_size", "'3'"]),
    "negative seeds": ("seeds = -1\n" + BASE, ["seeds must be at least 1", "-1"]),
    "repeated seeds": ("seeds = [0, 0]\n" + BASE, ["seeds must be distinct"]),
    "seeds as text": ('seeds = "3"\n' + BASE, ["seeds expects int", "'3'"]),
    "steps zero": (BASE + "[training]\nsteps = 0\n", ["[training].steps must be at least 1", "0"]),
    "steps and epochs": (BASE + "[training]\nsteps = 5\nepochs = 2\n", ["[training]", "one of them"]),
    "negative lr": (BASE + "[training]\nlr = -0.1\n", ["[training].lr", "-0.1"]),
    "unknown profile": (BASE + '[training]\nprofile = "quik"\n', ["[training]", "'quick'"]),
    "image size as float": (edit(f"image_size = {SIZE}", "image_size = 32.0"), ["[data].image_size", "32.0"]),
    "empty patterns": (edit('["H"]', "[]"), ["patterns is an empty list"]),
    "empty layers": (edit('weights = "random"', "layers = []"), ["[[backbones]] 1.layers is an empty list"]),
    "empty kernel list": (edit("kernel_size = 1", "kernel_size = []"), ["[[readouts]] 1.kernel_size is an empty"]),
    "missing folder": (edit("[data]", '[data]\ntrain = "no/such/folder"'), ["[data].train", "not found", "folder"]),
    "duplicate backbone": (
        BASE + '[[backbones]]\nname = "tv:resnet18"\nweights = "random"\n',
        ["[[backbones]] 2", "tv:resnet18 · random", "first in [[backbones]] 1"],
    ),
    "a pattern matching no model": (edit('"tv:resnet18"', '"timm:no_such_*"'), ["1.name", "matches no timm model"]),
    "a pattern without a family": (edit('"tv:resnet18"', '"resnet*"'), ["1.name", "tv: or timm: family"]),
    "no readout and no measure": (BASE.split("[[readouts]]")[0], ["no readout or measure"]),
    "no backbone": (BASE.replace('[[backbones]]\nname = "tv:resnet18"\nweights = "random"\n', ""), ["no backbone"]),
    "unknown measure": (BASE + '[[measures]]\nkind = "pfv"\n', ["[[measures]] 1", "Did you mean 'pvf'"]),
    "a table as a value": (
        "data = 3\n" + edit(f"[data]\nimage_size = {SIZE}\nfeat_size = {FEAT}\n", ""),
        ["[data] must be a table"],
    ),
}


@pytest.mark.parametrize("text, fragments", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_every_bad_spec_is_one_line_naming_its_place(text, fragments, tmp_path):
    with pytest.raises(PosprobeError) as caught:
        parse_spec(text, tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, (f, message)


def test_a_name_pattern_expands_to_every_matching_model_of_its_family(tmp_path):
    """A zoo in one line: 'timm:convnext_at*' is timm's ConvNeXt-Atto variants, each its own backbone setting."""
    import timm

    spec = parse_spec(edit('"tv:resnet18"', '["timm:convnext_at*", "tv:resnet18"]'), tmp_path)
    expected = [f"timm:{m}" for m in sorted(timm.list_models("convnext_at*"))] + ["tv:resnet18"]
    assert len(expected) > 2 and [s.name for s, _ in spec.backbones] == expected


def test_an_empty_image_folder_is_refused_at_parse(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PosprobeError, match=r"\[data\]\.natural: no images .* found under"):
        parse_spec(edit("[data]", '[data]\nnatural = "empty"'), tmp_path)


def test_the_plan_crosses_every_list_and_reads_listed_layers_together_in_network_order(tmp_path):
    text = f"""
patterns = ["H", "G"]
seeds = 3
[data]
image_size = {SIZE}
feat_size = {FEAT}
[[backbones]]
name = ["tv:resnet18", "tv:resnet34"]
weights = ["random", "IMAGENET1K_V1"]
padding = ["model", "zeros"]
layers = ["all", "each", "layer3,layer1", "layer2"]
[[readouts]]
kind = "pem"
kernel_size = [1, 3]
[[readouts]]
kind = "linear"
kernel_size = 1
[[measures]]
kind = "pvf"
"""
    spec = parse_spec(text, tmp_path)
    groups = plan(spec)
    assert len(groups) == 2 * 2 * 2  # names x weights x padding
    # a setting tapping two layers is another setting; 'each' is then each of its taps
    taps = parse_spec(
        text + '[[backbones]]\nname = "tv:resnet18"\nweights = "random"\ntaps = "layer3,layer1"\nlayers = "each"\n',
        tmp_path,
    )
    extra = plan(taps)[-1]
    assert extra.label == "tv:resnet18 · random · taps layer3,layer1" and len(plan(taps)) == 9
    assert list(dict.fromkeys(c.levels for c in extra.cells)) == ["layer1", "layer3", "all"]  # 'all': the PVF pooled
    # levels: all, each of 5 taps, layer1+layer3 ('layer2' is one of 'each'); 3 readouts; 2 patterns; 3 seeds
    readout_cells, measure_cells = (1 + 5 + 1) * 3 * 2 * 3, 5 + 1  # each level's PVF and the levels pooled
    assert [len(g.cells) for g in groups] == [readout_cells + measure_cells] * 8
    levels = list(dict.fromkeys(c.levels for c in groups[0].cells if not c.measure))
    assert levels == ["all", *R18_LEVELS, "layer1+layer3"]
    assert [g.label for g in groups[:3]] == [
        "tv:resnet18 · random",
        "tv:resnet18 · random · padding zeros",
        "tv:resnet18 · IMAGENET1K_V1",
    ]
    ids = [cell_id(spec, c) for g in groups for c in g.cells]
    assert len(set(ids)) == len(ids)
    assert ids == [cell_id(parse_spec(text, tmp_path), c) for g in groups for c in g.cells]  # stable
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def _ids(text: str, base: Path) -> dict:
    """cell (described with its group) -> id."""
    spec = parse_spec(text, base)
    return {(g.label, c.describe()): cell_id(spec, c) for g in plan(spec) for c in g.cells}


def test_a_cell_id_changes_when_its_images_or_checkpoint_change_on_disk(small_sets, tmp_path):
    """A retrained checkpoint at the same path, or an image added to the training folder, is not the sweep that
    finished: its cells run again."""
    train, test = small_sets
    checkpoint = tmp_path / "net.pt"
    checkpoint.write_bytes(b"weights v1")
    text = edit("[data]", f'[data]\ntrain = "{train}"\nnatural = "{test}"')
    text = edit('weights = "random"', f'weights = "{checkpoint}"', text)
    before = _ids(text, tmp_path)
    assert _ids(text, tmp_path) == before
    save_image(train / "new.png", np.zeros((40, 40, 3), np.uint8))
    after_images = _ids(text, tmp_path)
    assert set(after_images.values()).isdisjoint(before.values())
    checkpoint.write_bytes(b"weights v2, retrained")
    assert set(_ids(text, tmp_path).values()).isdisjoint(after_images.values())


def test_ray_client_addresses_are_refused_in_one_line():
    pytest.importorskip("ray")
    from posprobe.studies.sweep_ray import ray_session

    with pytest.raises(PosprobeError, match="Ray Client addresses are not supported"), ray_session("ray://head:10001"):
        pass


def test_a_cell_id_changes_with_what_determines_its_numbers_and_only_that(tmp_path):
    text = BASE.replace('["H"]', '["H", "G"]') + '[[readouts]]\nkind = "linear"\nkernel_size = 1\n'
    text += '[[measures]]\nkind = "pvf"\n'
    before = _ids(text, tmp_path)
    pem = {k: v for k, v in before.items() if k[1].startswith("pem")}
    linear = {k: v for k, v in before.items() if k[1].startswith("linear")}
    pvf = {k: v for k, v in before.items() if k[1].startswith("pvf")}
    assert len(pem) == 2 and len(linear) == 2 and len(pvf) == 6

    def changed(new_text: str) -> set[str]:
        after = _ids(new_text, tmp_path)
        return {k[1].split()[0] for k, v in before.items() if after.get(k) != v}

    assert changed(text) == set()
    assert changed(text + "[training]\nsteps = 7\n") == {"pem"}  # a solved probe and a measure train nothing
    assert changed(edit(f"image_size = {SIZE}", "image_size = 40", text)) == {"pem", "linear", "pvf"}
    assert changed(edit(f"feat_size = {FEAT}", "feat_size = 7", text)) == {"pem", "linear", "pvf"}
    assert changed(edit("[data]", '[data]\ntest = ["natural", "black"]', text)) == {"pem", "linear"}
    assert changed(edit("[data]", "[data]\ncrops_per_photo = 2", text)) == {"pem", "linear", "pvf"}
    assert changed(edit("[data]", "[data]\nrolls = 3", text)) == set()  # no rolled test set
    rolled = edit("[data]", '[data]\ntest = ["natural", "rolled"]', text)
    assert _ids(edit("[data]", "[data]\nrolls = 3", rolled), tmp_path) != _ids(rolled, tmp_path)
    assert changed(text + "[training]\ndevice = 'auto'\n") == {"pem", "linear", "pvf"}
    assert changed(text + "[cache]\nenabled = false\n") == {"pem", "linear", "pvf"}  # float32 features, not float16
    assert changed(text + "[cache]\nmax_gb = 5\n[resources]\nnum_cpus = 2\n") == set()
    # a seed is its own cell; a measure has no seed
    seeds = _ids("seeds = [0, 5]\n" + text, tmp_path)
    assert len(seeds) == 2 * 4 + 6 and set(before.values()) < set(seeds.values())
    # adding a backbone, a pattern or a readout leaves every earlier cell's id as it was
    more = text.replace('["H", "G"]', '["H", "G", "V"]') + '[[backbones]]\nname = "posenet"\n'
    more += '[[readouts]]\nkind = "pem"\nkernel_size = 3\n'
    after = _ids(more, tmp_path)
    assert all(after[k] == v for k, v in before.items())
    # V for pem k1 and linear k1, pem k3 for H, G and V; posenet: 3 readouts x 3 patterns, PVF of its level and pooled
    assert len(after) == len(before) + 2 + 3 + (3 * 3 + 2)
    # a relative checkpoint path is the spec folder's file: a cell's id names one file wherever the run starts
    ckpt = edit('weights = "random"', 'weights = "ckpt.pth"', text)
    other = tmp_path / "other"
    other.mkdir()
    assert _ids(ckpt, tmp_path).values() != _ids(ckpt, other).values()
    assert parse_spec(ckpt, tmp_path).backbones[0][0].weights == str(tmp_path.resolve() / "ckpt.pth")
    assert parse_spec(text + '[cache]\ndir = "cache"\n', tmp_path).cache.dir == str(tmp_path.resolve() / "cache")


# --- a local run, end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[Path, Path, tuple[int, str, str]]:
    """(spec file, sweep folder, the run's (code, stdout, stderr)): GRID run once through the CLI."""
    root = tmp_path_factory.mktemp("grid")
    spec = write_spec(root, GRID)
    return spec, root / "out", posprobe("sweep", spec, "--out", root / "out", "--quiet")


def grid_cells() -> int:
    posenet = 3 * 1 * 2 * 2 + (1 + 1)  # 3 readouts x 'all' x 2 patterns x 2 seeds, and PVF of 'image' and pooled
    resnet = 3 * 3 * 2 * 2 + (5 + 1)  # 3 readouts x (all, layer1+layer3, layer2) x 2 x 2, and PVF of 5 taps + pooled
    return posenet + resnet


def test_a_local_run_writes_every_output_and_tidy_tables(grid):
    _, out, (code, stdout, err) = grid
    assert code == 0, err
    assert "Traceback" not in err
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    n = grid_cells()
    assert f"{n} cells in 2 groups; 0 done before, {n} to run" in stdout
    assert f"{n} cells run in" in stdout and "0 failed" in stdout
    files = cells(out)
    assert len(files) == n and all(r["status"] == "ok" and r["error"] == "" for r in files.values())
    assert set(files) == set(json.loads((out / "sweep.json").read_text())["cells"])
    assert (out / "spec.toml").read_text() == GRID

    rows = read_csv(out / "results.csv")
    readouts = [r for r in files.values() if r["identity"]["kind"] != "measure"]
    assert len(rows) == 3 * len(readouts) + (n - len(readouts))  # a row per test set; a measure's one row
    assert {r["test_set"] for r in rows} == {"natural", "black", "rolled", "train"}
    for r in rows:
        value, lo, hi = number(r["value"]), number(r["lo"]), number(r["hi"])
        assert -1 <= value <= 1 if r["metric"] == "spc" else 0 <= value <= 1, r
        if not math.isnan(lo):
            assert lo <= value <= hi, r
    assert {r["n"] for r in rows if r["test_set"] == "natural"} == {"12"}  # the bundled photos
    assert {r["n"] for r in rows if r["test_set"] == "rolled"} == {"12"}  # 2 rolls of each, averaged per photo
    assert {r["lo"] for r in rows if r["test_set"] == "black"} == {"nan"}  # one image, one seed: no interval
    assert {r["layers"] for r in rows if r["backbone"] == "tv:resnet18" and r["kind"] != "measure"} == {
        "all",
        "layer1+layer3",
        "layer2",
    }
    layer2 = next(r for r in rows if r["layers"] == "layer2")
    assert (layer2["level_index"], float(layer2["depth"])) == ("2", 0.5)

    import pyarrow.parquet as pq

    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == len(rows) and table.column_names == list(rows[0])

    summary = read_csv(out / "summary.csv")
    assert len(summary) == len(rows) - 3 * len(readouts) // 2  # two seeds per readout row
    spc = [r for r in summary if r["metric"] == "spc"]
    assert {r["seeds"] for r in spc} == {"2"} and {r["failed_seeds"] for r in summary} == {"0"}
    assert all(number(r["seed_sd"]) >= 0 for r in spc)
    assert {r["seeds"] for r in summary if r["metric"] == "pvf"} == {"1"}
    # two seeds of one image: an interval over the seeds
    assert all(number(r["lo"]) <= number(r["value"]) <= number(r["hi"]) for r in spc)
    # selectivity: SPC - max(0, PosENet's with the same readout, pattern and test set); none for PosENet itself
    pixels = {
        (r["readout"], r["pattern"], r["test_set"]): number(r["value"]) for r in spc if r["backbone"] == "posenet"
    }
    for r in spc:
        if r["backbone"] == "posenet":
            assert r["selectivity"] == ""
        else:
            base = pixels[(r["readout"], r["pattern"], r["test_set"])]
            assert number(r["selectivity"]) == pytest.approx(number(r["value"]) - max(0.0, base), abs=1e-12)
    # a random ResNet-18 reads position (its zero padding), the raw pixels do not
    r18_h = next(
        r
        for r in spc
        if (r["backbone"], r["layers"], r["readout"], r["pattern"], r["test_set"])
        == ("tv:resnet18", "all", "pem k3", "H", "natural")
    )
    assert number(r18_h["value"]) > 0.5 and number(r18_h["selectivity"]) > 0.3

    # its interval: the paired two-way bootstrap over the same seeds and images as PosENet's, from the cell files
    def grid(name: str) -> torch.Tensor:
        mine = sorted(
            (c for c in cells(out).values() if c["identity"]["name"] == name and c["identity"]["levels"] == "all"),
            key=lambda c: c["identity"]["seed"],
        )
        mine = [c for c in mine if c["identity"]["method"] == "pem k3" and c["identity"]["pattern"] == "H"]
        return torch.tensor([c["per_image"]["natural"]["spc"] for c in mine], dtype=torch.float64)

    floor_at_chance = lambda m: m[:, 0] - m[:, 1:].clamp(min=0).max(dim=1).values  # noqa: E731
    reference = paired_statistic([grid("tv:resnet18"), grid("posenet")], floor_at_chance)
    assert number(r18_h["selectivity_lo"]) == pytest.approx(reference.lo, abs=1e-9)
    assert number(r18_h["selectivity_hi"]) == pytest.approx(reference.hi, abs=1e-9)
    bounded = [r for r in spc if r["selectivity_lo"] not in ("", "nan")]
    assert bounded and all(
        number(r["selectivity_lo"]) <= number(r["selectivity"]) <= number(r["selectivity_hi"]) for r in bounded
    )
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "posprobe sweep: grid" in html and "tv:resnet18 · random" in html
    assert len(events(out, "cell ok")) == n and len(events(out, "group started")) == 2


def test_a_cell_equals_the_probe_on_the_same_features_and_its_interval_the_bootstrap(grid):
    _, out, (code, _, err) = grid
    assert code == 0, err
    files = cells(out)
    train, test = bundled_train_set(SIZE, 1, 0), bundled_test_set(SIZE)
    config = get_profile("quick", steps=STEPS)

    def probe(layers, seed: int) -> PositionProbe:
        backbone = create_backbone("tv:resnet18", "random", 0, "paper", layers=layers, image_size=SIZE)
        return PositionProbe(
            backbone, ["H", "G"], 3, feat_size=FEAT, image_size=SIZE, train_config=config, seed=seed, progress=False
        ).fit(train)

    def same(cell: dict, scores, test_set: str = "natural") -> None:
        mine = cell["per_image"][test_set]
        theirs = dict(zip(scores.ids, scores.spc.tolist()))
        assert mine["ids"] == list(theirs)
        assert mine["spc"] == pytest.approx([theirs[i] for i in mine["ids"]], abs=1e-3)  # float rounding, not bits
        assert float(torch.tensor(mine["spc"]).mean()) == pytest.approx(float(scores.spc.mean()), abs=3e-4)

    # every level together, seed 1; trained alone here, beside 11 other readouts in the sweep
    everything = probe(None, 1)
    for pattern, scores in everything.score(test).items():
        same(find(files, name="tv:resnet18", levels="all", method="pem k3", pattern=pattern, seed=1), scores)
    # the rolled photos: every copy scored, then averaged per photo
    rolled = everything.score(RolledImages(test, 2, 0))["G"]
    per_photo: dict[str, list[float]] = {}
    for item, value in zip(rolled.ids, rolled.spc.tolist()):
        per_photo.setdefault(item.split("@roll")[0], []).append(value)
    cell = find(files, name="tv:resnet18", levels="all", method="pem k3", pattern="G", seed=1)
    assert cell["per_image"]["rolled"]["ids"] == list(per_photo)
    assert cell["per_image"]["rolled"]["spc"] == pytest.approx([sum(v) / 2 for v in per_photo.values()], abs=1e-3)
    # one level read alone: the same as a backbone that taps only that level
    alone = probe("layer2", 0).score(test)
    same(find(files, name="tv:resnet18", levels="layer2", method="pem k3", pattern="H", seed=0), alone["H"])
    # the exact linear probe of two levels read together
    two = create_backbone("tv:resnet18", "random", 0, "paper", layers="layer1,layer3", image_size=SIZE)
    linear = LinearProbe(two, ["H", "G"], 1, 0, FEAT, SIZE, seed=0, progress=False).fit(train).score(test)
    same(find(files, name="tv:resnet18", levels="layer1+layer3", method="linear k1", pattern="G", seed=0), linear["G"])

    # summary: the two-way bootstrap over the (seeds, images) grid of the cell files; results: over images
    summary = read_csv(out / "summary.csv")
    results = read_csv(out / "results.csv")
    for pattern, test_set in (("H", "natural"), ("G", "rolled"), ("H", "black")):
        key = dict(name="tv:resnet18", levels="all", method="pem k3", pattern=pattern)
        seeds = [find(files, **key, seed=s) for s in (0, 1)]
        grid_ = torch.tensor([c["per_image"][test_set]["spc"] for c in seeds], dtype=torch.float64)
        expected = bootstrap(grid_)
        row = next(
            r
            for r in summary
            if (r["backbone"], r["layers"], r["readout"], r["pattern"], r["test_set"])
            == ("tv:resnet18", "all", "pem k3", pattern, test_set)
        )
        assert (number(row["value"]), number(row["lo"]), number(row["hi"])) == pytest.approx(
            (expected.mean, expected.lo, expected.hi), rel=1e-9
        )
        assert number(row["seed_sd"]) == pytest.approx(float(grid_.mean(1).std(correction=0)), rel=1e-9)
        assert row["n"] == str(grid_.shape[1])
        single = bootstrap(grid_[1])
        one = next(r for r in results if r["cell_id"] == seeds[1]["id"] and r["test_set"] == test_set)
        assert number(one["value"]) == pytest.approx(single.mean, rel=1e-9)
        if test_set != "black":
            assert (number(one["lo"]), number(one["hi"])) == pytest.approx((single.lo, single.hi), rel=1e-9)


def test_a_second_run_skips_every_cell_and_writes_the_same_tables(grid, tmp_path):
    spec, first, (code, _, err) = grid
    assert code == 0, err
    out = tmp_path / "again"
    shutil.copytree(first, out)
    before = snapshot(out / "cells")
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 0, err
    n = grid_cells()
    assert f"{n} done before, 0 to run" in stdout and re.search(rf"0 cells run in \d+ s, {n} done before", stdout)
    assert snapshot(out / "cells") == before
    assert len(events(out, "cell ok")) == n and len(events(out, "group started")) == 2  # only the first run's
    for name in ("results.csv", "summary.csv"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["done_before"], r["failed"]) for r in runs] == [(0, 0), (n, 0)]
    # the dry run agrees: nothing to run, and the images it counts are those the run encoded
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--dry-run")
    assert code == 0, err
    data = next(iter(cells(out).values()))["data"]
    encoded = sum(d["n"] for d in data.values())  # 39 crops, 12 photos, 1 black image, 24 rolled photos
    assert encoded == 39 + 12 + 1 + 24
    for label, count in (("posenet", 14), ("tv:resnet18 · random", 42)):
        assert re.search(rf"^{re.escape(label)}\s+{count}\s+0\s+{encoded}\s", stdout, re.M), stdout
    assert f"total: {n} cells, 0 to run" in stdout
    assert snapshot(out / "cells") == before


def test_sweep_report_rewrites_the_tables_from_the_cell_files(grid, tmp_path):
    _, first, (code, _, err) = grid
    assert code == 0, err
    out = tmp_path / "copy"
    shutil.copytree(first, out)
    for name in ("results.csv", "results.parquet", "summary.csv", "report.html"):
        (out / name).unlink()
    code, stdout, err = posprobe("sweep-report", out)
    assert code == 0, err
    assert f"({grid_cells()} cells)" in stdout
    for name in ("results.csv", "summary.csv"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    assert (out / "results.parquet").is_file() and (out / "report.html").is_file()
    # a cell file gone: the tables say so and keep the rest
    gone = next((out / "cells").glob("*.json"))
    gone.unlink()
    code, _, err = posprobe("sweep-report", out)
    assert code == 0 and f"1 of {grid_cells()} cells have no result yet" in err
    assert gone.stem not in {r["cell_id"] for r in read_csv(out / "results.csv")}
    # not a sweep folder, or none at all
    (tmp_path / "empty").mkdir()
    code, _, err = posprobe("sweep-report", tmp_path / "empty")
    assert_one_line_error(code, err, "holds no sweep")
    code, _, err = posprobe("sweep-report", tmp_path / "nowhere")
    assert_one_line_error(code, err, "sweep folder not found")


# --- resuming -------------------------------------------------------------------------------------------------------


def test_an_extended_spec_runs_only_its_new_cells(tmp_path):
    out = tmp_path / "out"
    code, stdout, err = posprobe("sweep", write_spec(tmp_path, FAST), "--out", out, "--quiet")
    assert code == 0, err
    assert "4 cells in 1 groups; 0 done before, 4 to run" in stdout
    first = snapshot(out / "cells")
    more = FAST.replace('["H", "G"]', '["H", "G", "V"]')
    more += '[[backbones]]\nname = "tv:resnet18"\nweights = "random"\n'
    code, stdout, err = posprobe("sweep", write_spec(tmp_path, more, "more.toml"), "--out", out, "--quiet")
    assert code == 0, err
    assert "12 cells in 2 groups; 4 done before, 8 to run" in stdout  # V for PosENet, all 6 for the ResNet
    assert {k: v for k, v in snapshot(out / "cells").items() if k in first} == first
    assert len(events(out, "cell ok")) == 12
    assert len(read_csv(out / "results.csv")) == 12 * 2
    assert (out / "spec.toml").read_text() == more
    # back to the first spec: its cells only, in the tables; the other files stay for a later spec
    code, stdout, _ = posprobe("sweep", tmp_path / "spec.toml", "--out", out, "--quiet")
    assert code == 0 and "4 done before, 0 to run" in stdout
    assert len(read_csv(out / "results.csv")) == 4 * 2 and len(cells(out)) == 12


def test_a_killed_run_keeps_its_finished_cells_and_the_next_runs_only_the_others(tmp_path, monkeypatch):
    spec, out = write_spec(tmp_path, FAST), tmp_path / "out"
    put, written = CellStore.put, []

    def put_then_interrupt(self, result):
        done = put(self, result)
        written.append(result["id"])
        if len(written) == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the CLI's handler raises KeyboardInterrupt
        return done

    monkeypatch.setattr(CellStore, "put", put_then_interrupt)
    code, _, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 130, err
    assert (
        err.strip().splitlines()[-1]
        == f"posprobe: interrupted: {out} keeps the 3 cells written so far; the same command resumes "
        "(sweep-report: tables)"
    )
    assert sorted(cells(out)) == sorted(written) and not (out / "results.csv").exists()
    monkeypatch.setattr(CellStore, "put", put)
    kept = snapshot(out / "cells")
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 0, err
    assert "3 done before, 1 to run" in stdout
    assert {k: v for k, v in snapshot(out / "cells").items() if k in kept} == kept
    assert len(events(out, "cell ok")) == 4 and len(read_csv(out / "summary.csv")) == 2 * 2
    # cell files deleted by hand are run again, and only they
    for path in sorted((out / "cells").glob("*.json"))[:2]:
        path.unlink()
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 0 and "2 done before, 2 to run" in stdout, err


MISSING = """
[[backbones]]
name = "tv:resnet18"
weights = "missing.pth"
"""
FAILING = FAST + MISSING


def test_a_failed_group_is_recorded_the_others_finish_and_a_rerun_retries_it(tmp_path):
    out = tmp_path / "out"
    spec = write_spec(tmp_path, FAILING)
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 1, err
    assert "Traceback" not in err
    assert "4 failed" in stdout and "[1/2] posenet: 4 cells done" in stdout
    assert "posprobe: 4 cells failed" in err
    files = cells(out)
    failed = [r for r in files.values() if r["status"] == "failed"]
    assert len(files) == 8 and len(failed) == 4
    assert all(r["identity"]["name"] == "tv:resnet18" for r in failed)
    for r in failed:
        assert "unknown weights" in r["error"] and str(tmp_path / "missing.pth") in r["error"]
        assert "\n" not in r["error"]
    rows = read_csv(out / "results.csv")
    assert len(rows) == 8 * 2
    assert {r["status"] for r in rows if r["backbone"] == "tv:resnet18"} == {"failed"}
    assert all(math.isnan(number(r["value"])) for r in rows if r["status"] == "failed")
    summary = [r for r in read_csv(out / "summary.csv") if r["backbone"] == "tv:resnet18"]
    assert len(summary) == 2 * 2 and {(r["status"], r["seeds"], r["failed_seeds"]) for r in summary} == {
        ("failed", "0", "2")
    }
    assert "unknown weights" in summary[0]["error"]
    assert "unknown weights" in (out / "report.html").read_text(encoding="utf-8")
    # a re-run retries exactly the failed cells
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 1 and "4 done before, 4 to run" in stdout, err
    assert len(events(out, "cell failed")) == 8 and len(events(out, "cell ok")) == 4


def test_a_cell_that_fails_once_is_run_again_and_the_summary_keeps_one_row_per_cell(tmp_path, monkeypatch):
    """One seed's training fails (the other's succeeds): the summary joins both seeds in one row, and the next
    run retries the failed seed alone."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path, FAST.replace('"H", "G"', '"H"').replace('"posenet"', '"posenet"\nlayers = "image"'))
    train_pem = sweep_group.GroupRun._train_pem

    def fail_seed_1(self, group):
        if group[0].seed == 1:
            raise RuntimeError("out of memory\non two lines")
        return train_pem(self, group)

    monkeypatch.setattr(sweep_group.GroupRun, "_train_pem", fail_seed_1)
    code, _, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 1, err
    failed = [r for r in cells(out).values() if r["status"] == "failed"]
    assert [r["identity"]["seed"] for r in failed] == [1]
    assert failed[0]["error"].startswith("RuntimeError: out of memory on two lines (at ")
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 2  # natural and black, each over seed 0 (seed 1 failed)
    assert {(r["status"], r["seeds"], r["failed_seeds"], r["layers"]) for r in summary} == {("ok", "1", "1", "image")}
    assert {r["level_index"] for r in summary} == {"0"}
    assert all(r["error"].startswith("RuntimeError: out of memory") for r in summary)
    monkeypatch.setattr(sweep_group.GroupRun, "_train_pem", train_pem)
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 0 and "1 done before, 1 to run" in stdout, err
    assert {(r["status"], r["seeds"], r["failed_seeds"]) for r in read_csv(out / "summary.csv")} == {("ok", "2", "0")}


def test_fail_fast_stops_at_the_first_failure_with_one_line_and_exit_2(tmp_path):
    """--fail-fast: the failing group's cells are recorded, no later group runs, the tables show it, exit 2."""
    text = FAST.replace("[[backbones]]", MISSING + "[[backbones]]")  # the failing group first
    out = tmp_path / "out"
    code, _, err = posprobe("sweep", write_spec(tmp_path, text), "--out", out, "--quiet", "--fail-fast")
    assert_one_line_error(code, err, "tv:resnet18 · ", "missing.pth", "unknown weights", "(--fail-fast)")
    files = cells(out)
    assert files and all(r["status"] == "failed" and r["identity"]["name"] == "tv:resnet18" for r in files.values())
    assert {r["status"] for r in read_csv(out / "results.csv")} == {"failed"}  # the tables are written all the same
    assert not events(out, "cell ok")


def test_an_unreadable_test_image_is_skipped_and_folders_are_the_spec_folder_s(small_sets, tmp_path):
    train, test = small_sets
    (test / "broken.jpg").write_bytes(b"not a jpeg")
    save_image(test / "sub" / "s9.png", torch.randint(0, 256, (20, 20, 3)).numpy())
    text = FAST.replace("[data]", f'[data]\ntrain = ["bundled", "{train.name}"]\nnatural = "{test.name}"')
    text = text.replace('["natural", "black"]', '["natural", "rolled"]')
    out = tmp_path / "out"
    code, stdout, err = posprobe("sweep", write_spec(tmp_path, text), "--out", out, "--quiet")
    assert code == 0, err
    assert "broken.jpg" in err
    assert "8 cells in 2 groups" in stdout and f"posenet · train {train.resolve()}" in stdout
    rows = read_csv(out / "results.csv")
    assert {r["n"] for r in rows} == {"4"}  # 5 files, 4 images
    assert {r["train_set"] for r in rows} == {"bundled", str(train.resolve())}
    data = next(iter(cells(out).values()))["data"]
    assert (data["natural"]["n"], data["natural"]["skipped"]) == (4, 1)


def _seed_result(seed: int, ids: list[str], spc: list[float], status: str = "ok") -> dict:
    """A readout cell's file as GroupRun writes it, for one seed on the natural photos."""
    identity = dict(name="tv:resnet18", weights="random", weights_seed=0, padding=None, pos_embed="keep", taps=None)
    identity |= dict(train="bundled", levels="layer2", kind="pem", method="pem k3", pattern="H", seed=seed)
    result = {"id": f"c{seed}", "status": status, "error": "" if status == "ok" else "boom", "group": "g"}
    result |= {"cell": "c", "identity": identity, "seconds": {}, "worker": {"host": "h", "pid": 1}}
    if status == "ok":  # a seed that failed before its backbone was built has no level place and no weights label
        mae = [1 - v for v in spc]
        result |= {"backbone": {"weights": "random (seed 0)"}, "level_index": 2, "depth": 0.5}
        result["per_image"] = {"natural": {"ids": ids, "spc": spc, "mae": mae}}
        result["rows"] = [{"test_set": "natural", "metric": "spc", "value": sum(spc) / len(spc), "lo": 0, "hi": 1}]
        result["training"] = {"convergence": "converged"}
    return result


def test_the_summary_joins_a_cell_s_seeds_on_the_images_each_scored():
    """Seeds scored on different image lists (a folder that changed between runs, an image one node could not
    read) are compared on the images all of them scored, in one order; a seed that failed joins the same row."""
    results = [
        _seed_result(0, ["a", "b", "c"], [0.1, 0.2, 0.3]),
        _seed_result(1, ["c", "a", "b"], [0.6, 0.4, 0.5]),
        _seed_result(2, ["b", "a"], [0.8, 0.7]),
        _seed_result(3, [], [], status="failed"),
    ]
    [row] = sweep_table.summary_rows(results, ["natural"])
    expected = bootstrap(torch.tensor([[0.1, 0.2], [0.4, 0.5], [0.7, 0.8]], dtype=torch.float64))
    assert (row["value"], row["lo"], row["hi"]) == pytest.approx((expected.mean, expected.lo, expected.hi))
    assert (row["n"], row["seeds"], row["failed_seeds"], row["status"], row["error"]) == (2, 3, 1, "ok", "boom")
    assert (row["weights"], row["level_index"], row["layers"]) == ("random (seed 0)", 2, "layer2")
    assert row["seed_sd"] == pytest.approx(float(torch.tensor([0.15, 0.45, 0.75]).std(correction=0)))
    assert row["flags"] == "±"  # the seeds disagree by far more than the limit
    # a seed with a non-finite score: no number, no interval, no crash
    results[0]["per_image"]["natural"]["spc"][1] = math.nan
    [row] = sweep_table.summary_rows(results, ["natural"])
    assert math.isnan(row["value"]) and math.isnan(row["lo"])
    # every seed failed: one failed row per test set
    [row] = sweep_table.summary_rows([results[3]], ["natural"])
    assert (row["status"], row["seeds"], row["failed_seeds"], row["test_set"]) == ("failed", 0, 1, "natural")


# --- the folder and the command line ---------------------------------------------------------------------------------


def test_an_out_that_is_not_a_sweep_folder_is_refused_and_left_as_it_was(tmp_path):
    spec = write_spec(tmp_path, FAST)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = posprobe("sweep", spec, "--out", mine)
    assert_one_line_error(code, err, f"--out {mine} exists and holds no sweep")
    assert snapshot(mine) == {"notes.txt": b"mine"} and list(mine.iterdir()) == [mine / "notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = posprobe("sweep", spec, "--out", afile)
    assert_one_line_error(code, err, "is a file")
    assert afile.read_text() == "x"


def test_a_second_sweep_into_the_same_folder_is_refused_by_the_lock(tmp_path):
    spec, out = write_spec(tmp_path, FAST), tmp_path / "out"
    out.mkdir()
    with SweepLock(out):  # another process's run, as far as flock can tell
        code, _, err = posprobe("sweep", spec, "--out", out)
    assert_one_line_error(code, err, "another sweep is running into", str(out))
    assert not (out / "cells").exists() and not (out / "sweep.json").exists()


def test_a_run_stopped_before_its_record_leaves_a_folder_the_next_run_accepts(tmp_path):
    spec, out = write_spec(tmp_path, FAST), tmp_path / "out"
    (out / "cells").mkdir(parents=True)
    (out / ".lock").write_text("")
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--quiet")
    assert code == 0 and "4 to run" in stdout, err


def test_the_dry_run_lists_every_group_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path, FAILING)
    out = tmp_path / "out"
    code, stdout, err = posprobe("sweep", spec, "--out", out, "--dry-run")
    assert code == 0, err
    assert not out.exists()
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["group", "cells", "to", "run", "images", "GFLOP/img", "readout", "TFLOP", "cache", "MB"]
    assert re.match(r"posenet\s+4\s+4\s+52\s+\d", lines[1]), lines[1]  # 39 crops + 12 photos + 1 black image
    assert re.match(r"tv:resnet18 · \S*missing\.pth\s+4\s+4\s+52\s+\d", lines[2]), lines[2]
    assert re.match(r"total: 8 cells, 8 to run; .* estimated [\d.]+ (s|min|h) ", lines[-1]), lines[-1]


def test_an_unknown_executor_and_a_missing_spec_are_one_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    code, _, err = posprobe("sweep", write_spec(tmp_path, FAST), "--out", out, "--executor", "slurm")
    assert_one_line_error(code, err, "unknown --executor 'slurm'", "local, ray")
    code, _, err = posprobe("sweep", tmp_path / "no.toml", "--out", out)
    assert_one_line_error(code, err, "sweep spec not found", "no.toml")
    assert not out.exists()


def test_a_bad_spec_at_the_command_line_is_one_line_naming_its_place(tmp_path):
    out = tmp_path / "out"
    code, _, err = posprobe(
        "sweep", write_spec(tmp_path, edit("kernel_size = 1", "kernel_size = [1, 9]", FAST)), "--out", out
    )
    assert_one_line_error(code, err, "[[readouts]] 1", "impossible readout")
    assert not out.exists()
