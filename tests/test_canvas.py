"""Location tasks on a canvas (measures/canvas.py, studies/canvas_run.py, ``posprobe canvas``).

The padding tests use a tiny random CNN: three stride-1 3x3 convolutions with ReLUs, so its receptive field is
R = 7 px. With a constant canvas a valid network's map is the map of an endless canvas cropped, and a zero-padded
one's is that map plus border artefacts; either GAP then ignores where the content sits once the content is at
least R - 1 = 6 px from every border (content 4 px in 16 px cells of a 48 px canvas: 6 px). Closer to the border
both read the cell: zero padding from its artefacts, valid padding from the border pixels it visits fewer times.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, invoke, save_image
from posprobe.backbones import create_backbone
from posprobe.backbones.registry import BackboneSpec, Level, register_backbone
from posprobe.errors import PosprobeError
from posprobe.features.cache import FeatureCache, encode_images, feature_key
from posprobe.measures.canvas import (
    CanvasImages,
    GapProbe,
    Placement,
    check_geometry,
    cluster_interval,
    compose,
    continuous_placements,
    distance_bins,
    exact_feat_size,
    gap_features,
    grid_placements,
    parse_colours,
    photo_contents,
)

TINY = "test-canvas-stride1"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [3, 16, 16, 16]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return out[1:]


SPEC = BackboneSpec(
    TINY,
    "three stride-1 3x3 convolutions, random weights",
    (Level("conv2", 16, 1), Level("conv3", 16, 1)),
    build=lambda weights, seed: _Tiny(),
    weight_names=("random",),
    default_weights="random",
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Folders of 10 training and 6 test photos of seeded smooth noise (blurred, so crops have structure)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 6)):
        for i in range(n):
            a = rng.random((12, 12, 3))
            img = np.kron(a, np.ones((4, 4, 1))) * 255  # (48, 48, 3): blocky, so a 4 px crop is not flat
            save_image(root / split / f"{split}{i}.png", img)
    return root / "train", root / "test"


@pytest.fixture(scope="module", autouse=True)
def tiny_registered():
    register_backbone(SPEC, replace=True)
    yield


def _accuracy(padding: str, canvas: str, content: int, photos, image_size: int = 48) -> tuple[float, list, list]:
    """Cell accuracy of the ridge probe on the last level's GAP, and the GAP of the first test content's cells."""
    b = create_backbone(TINY, "random", 0, "paper", padding=padding, image_size=image_size)
    shapes = b.level_shapes(image_size)
    sets = {}
    for k, folder in enumerate(photos):
        paths = sorted(folder.glob("*.png"))
        c, ids, _ = photo_contents(paths, content, 3, seed=k)
        sets[k] = CanvasImages(c, ids, image_size, canvas, "grid", 3, seed=k)
    fs = exact_feat_size(shapes)
    feats = [gap_features(encode_images(b, sets[k], fs, progress=False), b.levels, shapes)[-1] for k in (0, 1)]
    assert all(f.exact for f in feats)
    probe = GapProbe("cell", 9, seed=0).fit(feats[0].features, sets[0].cells, sets[0].groups)
    acc = float((probe.predict(feats[1].features) == sets[1].cells).double().mean())
    return acc, feats[1].features[:9], sets[1].borders.tolist()


# ---- placements, canvases, ids ----------------------------------------------------------------------------


def test_grid_placements_and_distances_by_hand():
    ps = grid_placements(30, 6, 3)  # cells of 10 px, content centred: 2 px from each cell edge
    assert [(p.left, p.top) for p in ps[:3]] == [(2, 2), (12, 2), (22, 2)]
    assert [p.cell for p in ps] == list(range(9))
    assert [p.border for p in ps] == [2, 2, 2, 2, 12, 2, 2, 2, 2]
    assert (ps[4].x, ps[4].y) == (15.0, 15.0)
    corner = Placement(0, 24, 6, 30, 6)
    assert (corner.border, corner.x, corner.y) == (0, 3.0, 27.0)
    rng = np.random.default_rng(0)
    jittered = grid_placements(30, 6, 3, jitter=2, rng=rng)
    assert all(abs(j.left - p.left) <= 2 and abs(j.top - p.top) <= 2 for j, p in zip(jittered, ps))
    for p in continuous_placements(30, 6, 50, rng, grid=3):
        assert 0 <= p.left <= 24 and 0 <= p.top <= 24
        assert p.cell == min(int(p.y // 10), 2) * 3 + min(int(p.x // 10), 2)


def test_a_hand_made_canvas():
    content = torch.rand(3, 4, 4)
    p = Placement(left=1, top=5, content=4, image_size=10, cell=0)
    for colour, fill in (("black", 0.0), ("white", 1.0)):
        img = compose(content, p, colour)
        assert img.shape == (3, 10, 10)
        assert torch.equal(img[:, 5:9, 1:5], content)
        outside = img.clone()
        outside[:, 5:9, 1:5] = fill
        assert torch.all(outside == fill)
    mean = compose(content, p, "mean")
    assert torch.allclose(mean[:, 0, 0], content.mean((1, 2)))
    assert p.border == 1  # 1 px from the left and from the bottom (10 - 5 - 4)


def test_dataset_ids_placements_and_cache_key_are_stable(photos):
    paths = sorted(photos[1].glob("*.png"))[:2]
    c1, ids1, _ = photo_contents(paths, 8, 2, seed=3)
    c2, ids2, _ = photo_contents(paths, 8, 2, seed=3)
    assert ids1 == ids2 == ["test0#crop0", "test0#crop1", "test1#crop0", "test1#crop1"]
    assert torch.equal(c1, c2)
    a = CanvasImages(c1, ids1, 32, "mean", "continuous", 3, positions=3, seed=5)
    b = CanvasImages(c2, ids2, 32, "mean", "continuous", 3, positions=3, seed=5)
    assert a.ids == b.ids and len(a) == 12 and a.groups[:3] == ["test0"] * 3
    assert a.cache_identity() == b.cache_identity()
    other = CanvasImages(c1, ids1, 32, "mean", "continuous", 3, positions=3, seed=6)
    assert other.cache_identity() != a.cache_identity()
    grid = CanvasImages(c1, ids1, 32, "black", "grid", 3)
    assert grid.ids[:2] == ["test0#crop0@cell0", "test0#crop0@cell1"]
    assert grid.cells.tolist() == list(range(9)) * 4
    backbone = create_backbone(TINY, "random", 0, image_size=32)
    assert feature_key(backbone, grid, 32)[0] == feature_key(backbone, CanvasImages(c2, ids2, 32), 32)[0]
    assert feature_key(backbone, grid, 32)[0] != feature_key(backbone, CanvasImages(c2, ids2, 32, "white"), 32)[0]


def test_features_come_back_from_the_cache(photos, tmp_path):
    c, ids, _ = photo_contents(sorted(photos[1].glob("*.png"))[:2], 8, 1)
    images = CanvasImages(c, ids, 32, "black")
    b = create_backbone(TINY, "random", 0, image_size=32)
    cache = FeatureCache(tmp_path / "cache")
    first = gap_features(encode_images(b, images, 32, progress=False, cache=cache), b.levels, b.level_shapes(32))
    again = encode_images(b, images, 32, progress=False, cache=cache)
    assert len(cache.entries()) == 1
    second = gap_features(again, b.levels, b.level_shapes(32))
    memory = gap_features(encode_images(b, images, 32, progress=False), b.levels, b.level_shapes(32))
    for x, y, z in zip(first, second, memory):
        assert torch.equal(x.features, y.features)
        assert torch.allclose(x.features, z.features, rtol=2e-3, atol=1e-4)  # the cache stores float16


def test_probe_and_intervals_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]]).repeat(10, 1) + 0.01 * torch.arange(40)[:, None]
    y = torch.tensor([0, 0, 1, 1]).repeat(10)
    groups = [f"p{i // 4}" for i in range(40)]
    probe = GapProbe("cell", 2).fit(x, y, groups)
    assert probe.score(x, y) == 1.0 and probe.alpha_ > 0
    xy = GapProbe("xy").fit(x, torch.cat([x, 2 * x], 1) / 10, groups)
    assert torch.allclose(xy.predict(x).float(), torch.cat([x, 2 * x], 1) / 10, atol=0.05)
    iv, n = cluster_interval(torch.tensor([1.0, 1.0, 0.0, 1.0]), ["a", "a", "b", "b"])
    assert n == 2 and iv.mean == pytest.approx(0.75) and iv.lo <= 0.75 <= iv.hi
    assert distance_bins(torch.tensor([0, 2, 3, 9])) == [(0, 1), (2, 4), (8, 16)]
    assert distance_bins(torch.tensor([5, 12]), [0, 8, 16]) == [(0, 8), (8, 16)]
    assert exact_feat_size([(16, 112, 112), (24, 56, 56), (40, 28, 28)]) == 112  # the rest kept native
    assert exact_feat_size([(16, 28, 28), (16, 26, 26)]) == 40  # 40^2 >= 2 x 28^2: both kept native


# ---- acceptance: what padding lets a network see -----------------------------------------------------------


def test_far_from_the_border_both_paddings_are_blind(photos):
    """Content 6 px (= R - 1) from every border: the GAP of one content is the same in every cell, so the probe
    is at chance, with valid padding and with zero padding alike (module doc)."""
    for padding in ("valid", "zeros"):
        acc, gap, borders = _accuracy(padding, "white", 4, photos)
        assert min(borders) == 6
        assert torch.allclose(gap, gap[:1].expand_as(gap), rtol=1e-4, atol=1e-6), padding
        assert acc < 0.25, (padding, acc)


def test_near_the_border_zero_padding_reads_the_cell(photos):
    """Content 1 px from the border on a white canvas: zero padding clearly above chance (1/9); valid padding too,
    through the border pixels it under-samples (Kayhan & van Gemert, CVPR 2020)."""
    acc_zeros, _, borders = _accuracy("zeros", "white", 14, photos)
    assert min(borders) == 1
    assert acc_zeros > 0.5
    acc_valid, _, _ = _accuracy("valid", "white", 14, photos)
    assert acc_valid > 0.3


# ---- the command ------------------------------------------------------------------------------------------


def test_canvas_command_writes_a_run(photos, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = invoke(
        "canvas", "--backbone", TINY, "--out", out, "--train", photos[0], "--test", photos[1],
        "--backbone-padding", "zeros,valid", "--canvas", "black,mean", "--image-size", "32", "--content", "8",
        "--per-photo", "1", "--quiet", "--no-cache",
    )  # fmt: skip
    assert code == 0, err
    assert "cell accuracy (chance 0.111)" in stdout
    names = {p.name for p in out.iterdir()}
    want = {"config.json", "canvas.json", "canvas.csv", "environment.json", "report.md"}
    assert want | {"location_by_distance.png", "canvas_examples.png"} <= names
    result = json.loads((out / "canvas.json").read_text())
    rows = result["results"]
    assert {(r["padding"], r["canvas"]) for r in rows} == {
        (p, c) for p in ("zeros", "valid") for c in ("black", "mean")
    }
    assert {r["level"] for r in rows} == {"conv2", "conv3", "all"}
    assert all(r["chance_accuracy"] == pytest.approx(1 / 9) for r in rows)
    first = rows[0]
    assert first["bin"] == "all" and first["n_test"] == 6 * 9 and first["n_photos"] == 6
    assert first["accuracy"]["lo"] <= first["accuracy"]["mean"] <= first["accuracy"]["hi"]
    assert first["pooled_from"] == "native 32x32"
    assert {r["pooled_from"] for r in rows if r["padding"] == "valid"} >= {"native 28x28", "native 26x26"}
    csv_lines = (out / "canvas.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows)


def test_continuous_placements_and_a_lone_train_folder(photos, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = invoke(
        "canvas", "--backbone", TINY, "--out", out, "--train", photos[0], "--placement", "continuous",
        "--positions", "4", "--image-size", "32", "--content", "8", "--per-photo", "1", "--quiet", "--no-cache",
        "--distance-bins", "0,4,8,16",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "canvas.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["test"]["n_contents"] == 2  # a seeded quarter of the 10 training photos, rounded
    assert config["data"]["train"]["n_contents"] == 8
    row = result["results"][0]
    assert row["error_px"] is not None and row["chance_error_px"]["mean"] > 0
    assert {r["bin"] for r in result["results"]} <= {"all", "[0,4)", "[4,8)", "[8,16)"}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--content", "40", "--image-size", "32"], ["--content must be between 1 and", "given 40"]),
        (["--content", "16", "--image-size", "32"], ["grid cells", "smaller than the content", "--content <= 10"]),
        (["--canvas", "black,pink"], ["unknown canvas colour 'pink'", "black, white, mean"]),
        (["--placement", "random"], ["unknown placement 'random'", "grid, continuous"]),
        (["--backbone-padding", "zero"], ["unknown backbone padding 'zero'", "Did you mean 'zeros'"]),
        (["--jitter", "9"], ["--jitter must be between 0 and"]),
        (["--distance-bins", "8,4"], ["--distance-bins must be at least two increasing"]),
        (["--per-photo", "0"], ["--per-photo must be at least 1"]),
        (["--grid", "1"], ["--grid must be at least 2"]),
    ],
)
def test_bad_input_is_one_line(photos, tmp_path, args, fragments):
    base = ["canvas", "--backbone", TINY, "--out", tmp_path / "run", "--train", photos[0], "--test", photos[1]]
    code, _, err = invoke(*base, "--image-size", "32", "--content", "8", "--quiet", "--no-cache", *args)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_empty_folder_and_library_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = invoke("canvas", "--backbone", TINY, "--out", tmp_path / "run", "--train", tmp_path / "empty")
    assert_one_line_error(code, err, "no images", "empty")
    with pytest.raises(PosprobeError, match="smaller than the content"):
        check_geometry(224, 80, 3)
    with pytest.raises(PosprobeError, match="unknown canvas colour 'grey'"):
        parse_colours("black,grey")
    with pytest.raises(PosprobeError, match="--canvas needs at least one"):
        parse_colours(" , ")
    from posprobe.studies.canvas_run import CanvasConfig, run_canvas

    with pytest.raises(PosprobeError, match="the string 'zeros'"):
        run_canvas(CanvasConfig(backbone=TINY, paddings="zeros"), progress=False)


def test_circular_padding_is_blind_at_any_distance_from_the_border(photos):
    """Content 1 px from the border, circular padding: every placement on a constant canvas is a circular shift of
    every other, and a stride-1 circular network commutes with it, so each content pools to the same features in
    every cell and the probe is at chance, where zero padding reads the cell (the test above)."""
    acc, gap, borders = _accuracy("circular", "white", 14, photos)
    assert min(borders) == 1
    assert torch.allclose(gap, gap[:1].expand_as(gap), rtol=1e-4, atol=1e-6)
    assert acc < 0.25, acc
