"""Readout-free measures, against independent references: numpy formulas, hand-built position patterns, conv
stacks whose equivariance is known by construction (circular padding), and the ``measure`` command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_one_line_error, run_cli
from posprobe.backbones import Backbone, BackboneSpec, Level
from posprobe.data import RolledImages, TensorImages, image_group
from posprobe.errors import PosprobeError
from posprobe.features.encode import EncodedSet
from posprobe.features.levels import level_views
from posprobe.features.parts import Part
from posprobe.measures import (
    blank_maps,
    interior_mask,
    mean_map,
    position_variance_fraction,
    translation_equivariance,
)
from posprobe.measures.position_variance import _one_pass, resampled_pvf

# -- references ---------------------------------------------------------------------------------------------


def numpy_pvf(x: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(unbiased, raw, raw per channel, position energy) straight from the definitions, in float64."""
    x = x.astype(np.float64)
    n, c, h, w = x.shape
    d = x - x.mean((2, 3), keepdims=True)
    v_tot = x.var(axis=(0, 2, 3))  # (C,) over images and locations
    v_raw = (d.mean(0) ** 2).mean((1, 2))  # (C,)
    pooled = (d.sum(0) ** 2).sum((1, 2))
    self_pairs = (d**2).sum((0, 2, 3))
    v_u = (pooled - self_pairs) / (n * (n - 1) * h * w)
    energy = (d.mean(0) ** 2).sum(0) / v_tot.sum()
    return v_u.sum() / v_tot.sum(), v_raw.sum() / v_tot.sum(), v_raw / v_tot, energy


def pattern_plus_noise(n: int, c: int, side: int, amplitude: float, seed: int) -> tuple[np.ndarray, float]:
    """X = P(c, ij) + N(0, 1) noise, P fixed with zero spatial mean; the true PVF var(P) / (var(P) + 1)."""
    rng = np.random.default_rng(seed)
    p = np.random.default_rng(99).normal(size=(c, side, side)) * amplitude
    p -= p.mean((1, 2), keepdims=True)
    vp = (p**2).mean()
    return p[None] + rng.normal(size=(n, c, side, side)), vp / (vp + 1)


# -- the position-variance fraction ----------------------------------------------------------------------------


def test_raw_and_unbiased_pvf_match_the_formulas_per_level_and_channel():
    x, _ = pattern_plus_noise(40, 3, 6, 0.5, seed=0)
    x += np.random.default_rng(1).normal(size=(40, 3, 1, 1)) * 2  # image-to-image offsets: not position
    r = position_variance_fraction(torch.tensor(x), level="f")
    u, raw, raw_channels, energy = numpy_pvf(x)
    assert r.pvf.mean == pytest.approx(u, rel=1e-10) and r.pvf_raw.mean == pytest.approx(raw, rel=1e-10)
    np.testing.assert_allclose(r.pvf_raw_channels, raw_channels, rtol=1e-10)
    np.testing.assert_allclose(r.position_energy, energy, rtol=1e-10)
    assert r.position_energy.mean() == pytest.approx(raw, rel=1e-10)
    assert (r.level, r.n_images, r.channels, r.size, r.dead_channels) == ("f", 40, 3, (6, 6), 0)
    json.dumps(r.to_dict(), allow_nan=False)


def test_unbiased_pvf_finds_the_pattern_and_its_interval_covers_it():
    x, truth = pattern_plus_noise(1000, 4, 8, 0.5, seed=2)
    r = position_variance_fraction(torch.tensor(x), interval=False)
    assert r.pvf.mean == pytest.approx(truth, abs=0.01)  # truth 0.2; std of the estimate ~0.002
    assert r.pvf_raw.mean > r.pvf.mean  # the raw value keeps 1/N of the noise
    small, _ = pattern_plus_noise(100, 4, 8, 0.5, seed=3)
    s = position_variance_fraction(torch.tensor(small))
    assert s.pvf.lo < truth < s.pvf.hi and s.pvf.lo < s.pvf.mean < s.pvf.hi


def test_pure_noise_reads_zero_unbiased_and_one_over_n_raw():
    n, runs = 20, 30
    u, raw = [], []
    for seed in range(runs):
        x = np.random.default_rng(seed).normal(size=(n, 4, 8, 8))
        r = position_variance_fraction(torch.tensor(x), interval=False)
        u.append(r.pvf.mean)
        raw.append(r.pvf_raw.mean)
    # raw: each location's mean over images keeps the noise's variance (1 - 1/L) / N
    assert np.mean(raw) == pytest.approx((1 - 1 / 64) / n, rel=0.1)
    assert abs(np.mean(u)) < 0.003  # one run's std is ~0.0044; the mean of 30 ~0.0008
    assert min(u) < 0 < max(u)  # slightly negative is reported as is


def test_pure_noise_interval_covers_zero_where_the_plain_plug_in_would_not():
    x = np.random.default_rng(5).normal(size=(64, 8, 16, 16))
    r = position_variance_fraction(torch.tensor(x))
    assert r.pvf.lo < 0 < r.pvf.hi
    # the plug-in that keeps the pairs of an image's copies, by hand: centred on the raw value (~1/N), not on 0
    d = (x - x.mean((2, 3), keepdims=True)).reshape(64, -1)
    g = d @ d.T
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 64, (500, 64))
    plug = [(g[np.ix_(i, i)].sum() - np.trace(g[np.ix_(i, i)])) / (64 * 63) for i in idx]
    assert np.quantile(plug, 0.025) / 256 / x.var() > 0.5 / 64


def test_the_gram_statistics_give_the_direct_values_for_the_sample_itself():
    x, _ = pattern_plus_noise(30, 3, 5, 0.4, seed=4)
    sums = _one_pass(torch.tensor(x), 1.0, 1 << 30, "cpu", gram=True, group=torch.arange(30))
    u, raw = resampled_pvf(sums.gram, sums.within.sum(1), sums.means, 25, torch.ones(1, 30, dtype=torch.float64))
    ref_u, ref_raw, _, _ = numpy_pvf(x)
    assert float(u[0]) == pytest.approx(ref_u, rel=1e-10) and float(raw[0]) == pytest.approx(ref_raw, rel=1e-10)
    # a resample with one image twice and another left out: the pair of the copies is dropped
    k = torch.ones(1, 30, dtype=torch.float64)
    k[0, 0], k[0, 1] = 2.0, 0.0
    u2, _ = resampled_pvf(sums.gram, sums.within.sum(1), sums.means, 25, k)
    rows = [0, 0, *range(2, 30)]
    xs = x[rows]
    d = (xs - xs.mean((2, 3), keepdims=True)).reshape(30, -1)
    g = d @ d.T
    distinct = np.array(rows)[:, None] != np.array(rows)[None, :]
    assert float(u2[0]) == pytest.approx(g[distinct].sum() / (distinct.sum() * 25) / xs.var(axis=(0, 2, 3)).sum())


def test_images_of_one_group_are_never_paired_and_groups_are_resampled_whole():
    """Four near-copies of each of 12 images (as the bundled set's crops of one photo), no position at all: counted
    as 48 independent images their agreement reads as position; as 12 groups it does not."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(12, 4, 6, 6))
    x = np.repeat(base, 4, axis=0) + 0.1 * rng.normal(size=(48, 4, 6, 6))
    labels = [f"photo{i // 4}#crop{i % 4}" for i in range(48)]
    naive = position_variance_fraction(torch.tensor(x))
    grouped = position_variance_fraction(torch.tensor(x), groups=[image_group(i) for i in labels])
    # by hand: pairs of images from different photos only
    d = (x - x.mean((2, 3), keepdims=True)).reshape(48, -1)
    photo = np.arange(48) // 4
    other = photo[:, None] != photo[None, :]
    by_hand = (d @ d.T)[other].sum() / (other.sum() * 36) / x.var(axis=(0, 2, 3)).sum()
    assert grouped.pvf.mean == pytest.approx(by_hand, rel=1e-9)
    assert naive.pvf.lo > 0.02  # the copies agree with each other: it looks like position
    assert grouped.pvf.lo < 0 < grouped.pvf.hi
    with pytest.raises(PosprobeError, match="at least 2 groups"):
        position_variance_fraction(torch.tensor(x[:4]), groups=["a"] * 4)


def test_chunking_does_not_change_the_result():
    x = torch.tensor(pattern_plus_noise(50, 7, 6, 0.3, seed=6)[0])
    whole = position_variance_fraction(x, max_bytes=1 << 30)
    for max_bytes in (1, 50 * 36 * 8 * 3):  # one channel at a time; three
        part = position_variance_fraction(x, max_bytes=max_bytes)
        for a, b in ((part.pvf, whole.pvf), (part.pvf_raw, whole.pvf_raw)):
            np.testing.assert_allclose([a.mean, a.lo, a.hi], [b.mean, b.lo, b.hi], rtol=1e-10)
        np.testing.assert_allclose(part.pvf_channels, whole.pvf_channels, rtol=1e-10)
        np.testing.assert_allclose(part.mean_map, whole.mean_map, rtol=1e-9, atol=1e-12)


def test_float16_with_a_scale_and_a_dead_channel():
    x, _ = pattern_plus_noise(30, 4, 6, 0.5, seed=7)
    x[:, 2] = 3.0  # a dead channel
    stored = torch.tensor(x / 64).half()  # as the cache stores large values: divided by a power of two
    r = position_variance_fraction(stored, scale=64.0)
    values = stored.double().numpy() * 64
    live = [0, 1, 3]
    u, raw, raw_channels, _ = numpy_pvf(values[:, live])
    assert r.pvf.mean == pytest.approx(u, rel=1e-10) and r.pvf_raw.mean == pytest.approx(raw, rel=1e-10)
    assert r.dead_channels == 1 and math.isnan(r.pvf_channels[2]) and math.isnan(r.pvf_raw_channels[2])
    np.testing.assert_allclose(r.pvf_raw_channels[live], raw_channels, rtol=1e-10)
    assert r.to_dict()["pvf_channels"][2] is None


def test_fewer_than_two_images_is_a_one_line_error():
    with pytest.raises(PosprobeError, match="needs at least 2 images; given 1"):
        position_variance_fraction(torch.zeros(1, 2, 3, 3))


def test_mean_map_standardises_each_channel_and_drops_dead_ones():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(20, 3, 5, 5)) * np.array([1.0, 100.0, 1.0])[None, :, None, None]
    x[:, 2] = 7.0  # dead
    z = (x[:, :2] - x[:, :2].mean((0, 2, 3), keepdims=True)) / x[:, :2].std((0, 2, 3), keepdims=True)
    ref = z.mean((0, 1))
    np.testing.assert_allclose(mean_map(torch.tensor(x)), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(position_variance_fraction(torch.tensor(x)).mean_map, ref, rtol=1e-9, atol=1e-12)


# -- level views of an encoded set ----------------------------------------------------------------------------


def test_level_views_give_each_level_as_stored():
    torch.manual_seed(0)
    levels = [torch.randn(3, 2, 16, 16), torch.randn(3, 4, 8, 8), torch.randn(3, 5, 2, 2)]
    encoded = EncodedSet.from_levels("s", levels, 8, ["a", "b", "c"])
    lv = [Level("a", 2, 1), Level("b", 4, 2), Level("c", 5, 8)]
    views = level_views(encoded, lv)
    assert [v.native for v in views] == [False, False, True]
    aligned = F.interpolate(levels[0], size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(views[0].data, aligned)
    torch.testing.assert_close(views[1].data, levels[1])
    torch.testing.assert_close(views[2].data, levels[2])
    assert views[0].resolution((16, 16)) == "aligned 8x8 (native 16x16)" and views[2].resolution() == "native 2x2"
    half = EncodedSet("s", [Part(0, 6, torch.ones(3, 6, 4, 4).half(), False, 4.0)], 4, ["a", "b", "c"], [])
    assert [(v.data.shape[1], v.scale) for v in level_views(half, [Level("a", 2, 1), Level("b", 4, 1)])] == [
        (2, 4.0),
        (4, 4.0),
    ]
    with pytest.raises(PosprobeError, match="add up to"):
        level_views(encoded, lv[:2])


# -- conv stacks: circular padding is equivariant, zero padding is not -----------------------------------------


class Stack(nn.Module):
    """Three stride-1 3x3 convs (3 -> 8 -> 8 -> 8) with ReLU; every activation is a level."""

    def __init__(self, padding_mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(
            [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, padding_mode=padding_mode) for i in range(3)]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return out


def stack_backbone(padding_mode: str) -> Backbone:
    spec = BackboneSpec(
        f"stack-{padding_mode}",
        "three 3x3 convs",
        tuple(Level(f"conv{i + 1}", 8, 1) for i in range(3)),
        build=lambda w, s: Stack(padding_mode),
        weight_names=("random",),
        default_weights="random",
    )
    return Backbone(spec, Stack(padding_mode), "random")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def orbit_pvf(backbone: Backbone, photos: torch.Tensor) -> list[float]:
    """Raw PVF of every level over every circular shift of the photos (2 x 256 images)."""
    rolled = RolledImages(TensorImages(photos, ["a", "b"], "p"), orbit_step=1)
    x = torch.stack([rolled[i] for i in range(len(rolled))])
    with torch.inference_mode():
        levels = backbone(x)
    return [position_variance_fraction(f, interval=False).pvf_raw.mean for f in levels]


def test_a_circular_stack_has_no_position_variance_over_a_full_orbit_and_a_zero_padded_one_does(photos):
    circular = orbit_pvf(stack_backbone("circular"), photos)
    zeros = orbit_pvf(stack_backbone("zeros"), photos)
    assert max(circular) < 1e-6, circular  # measured 0.0: the same arithmetic at every shift
    assert min(zeros) > 0.1, zeros  # measured 0.188, 0.256, 0.392 at conv1..conv3: the padding at the border


def test_eqt_of_a_circular_stack_is_exact_and_of_a_zero_padded_one_is_not(photos):
    circular = translation_equivariance(stack_backbone("circular"), photos)
    zeros = translation_equivariance(stack_backbone("zeros"), photos)
    assert {(e.level, e.axis, e.shift) for e in circular} == {
        (f"conv{i}", a, s) for i in (1, 2, 3) for a in "xy" for s in (1, 2, 4)
    }
    assert all(e.circular_db.mean > 100 for e in circular)
    assert all(math.isfinite(e.circular_db.mean) and e.circular_db.mean < 30 for e in zeros)  # measured -0.1 to 5.4 dB
    assert all(e.circular_db.lo <= e.circular_db.mean <= e.circular_db.hi for e in zeros)
    # 3x3 convs: conv1 and conv2 see at most 2 cells, the interior's margin m = 2 keeps them clear of the border
    assert all(math.isinf(e.interior_db.mean) for e in zeros if e.level in ("conv1", "conv2"))
    saved = [e.to_dict() for e in circular]
    json.dumps(saved, allow_nan=False)
    assert all(d["circular_db"]["mean"] == "inf" or d["circular_db"]["mean"] > 100 for d in saved)


class Biased(nn.Module):
    """f(x) = x + B for a fixed map B: shifting x does not shift B."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x + self.bias]


def test_eqt_of_a_fixed_additive_map_matches_the_hand_computed_error():
    side, shift = 16, 2
    bias = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    spec = BackboneSpec("biased", "x + B", (Level("f", 3, 1),), lambda w, s: Biased(bias), ("random",), "random")
    backbone = Backbone(spec, Biased(bias), "random")
    x = torch.rand(5, 3, side, side, generator=torch.Generator().manual_seed(2))
    result = {(e.axis, e.shift): e for e in translation_equivariance(backbone, x, shifts=[shift])}
    f = (x + bias).double().numpy()
    v = f.var(axis=(0, 2, 3)).mean()
    b = bias.double().numpy()[0]
    for axis, dim in (("x", -1), ("y", -2)):
        err = ((b - np.roll(b, shift, axis=dim)) ** 2).sum(0)  # (h, w): the same for every image
        mask = np.zeros((side, side), bool)
        mask[2:14, 2:14] = True  # m = 2: two rows and columns off every border
        band = [(shift - 2 + q) % side for q in range(4)]  # the seam band: cells 0..3
        if axis == "x":
            mask[:, band] = False
        else:
            mask[band, :] = False
        e = result[(axis, shift)]
        assert e.circular_db.mean == pytest.approx(10 * np.log10(v / (err.sum() / (3 * side * side))), rel=1e-6)
        assert e.interior_locations == mask.sum() == 120
        assert e.interior_db.mean == pytest.approx(10 * np.log10(v / (err[mask].sum() / (3 * 120))), rel=1e-6)
        assert torch.equal(interior_mask(side, side, shift, axis), torch.from_numpy(mask))


def test_a_network_without_padding_is_exactly_equivariant_on_the_cells_that_read_no_wrapped_input():
    """Valid convolutions and a stride-2 pool: each map is a crop, and on a rolled input its cells j >= t read
    exactly the windows cells j - t read before, so the interior mode is an exact match and the circular mode,
    which needs a torus, is skipped with the reason."""

    class Valid(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            f1 = torch.relu(self.a(x))  # (14, 14) of 16
            return [f1, torch.relu(self.b(F.max_pool2d(f1, 2)))]  # (5, 5), stride 2

    torch.manual_seed(0)
    net = Valid()
    levels = (Level("a", 4, 1), Level("b", 4, 2))
    spec = BackboneSpec("valid-test", "", levels, lambda w, s: net, ("random",), "random", exact_strides=False)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = {(e.level, e.axis, e.shift): e for e in translation_equivariance(Backbone(spec, net, "random"), x, [2, 4])}
    for (level, axis, shift), e in out.items():
        assert e.interior_db.mean == math.inf, (level, axis, shift)
        assert e.circular_db is None and "not a torus" in e.circular_skipped
    b = out[("b", "x", 4)]  # 5x5 map moved by 2 cells: columns 2..4 are compared
    assert b.cells == 2 and b.interior_locations == 5 * 3
    assert torch.equal(interior_mask(5, 5, 2, "x", cropped=True)[0], torch.tensor([False, False, True, True, True]))


def test_levels_whose_stride_does_not_divide_the_shift_are_skipped_with_the_reason():
    class Two(nn.Module):
        def forward(self, x):
            return [x, F.avg_pool2d(x, 4)]

    spec = BackboneSpec("two", "", (Level("a", 3, 1), Level("b", 3, 4)), lambda w, s: Two(), ("random",), "random")
    out = translation_equivariance(Backbone(spec, Two(), "random"), torch.rand(2, 3, 16, 16), shifts=[2, 4])
    skipped = {(e.level, e.shift): e.skipped for e in out}
    assert skipped[("b", 2)] == "stride 4 does not divide the shift 2" and skipped[("b", 4)] == ""
    assert skipped[("a", 2)] == ""
    tiny = {(e.level, e.shift): e for e in out}[("b", 4)]  # a 4x4 map: m = 1, shift 1 cell
    assert tiny.interior_locations == 2 * 2 - 2  # rows 1..2 x columns 1..2, minus the band {0, 1}
    with pytest.raises(PosprobeError, match="between 1 and 15"):
        translation_equivariance(Backbone(spec, Two(), "random"), torch.rand(2, 3, 16, 16), shifts=[16])


def test_blank_maps_show_zero_padding_at_the_border_and_nothing_for_circular_padding():
    zeros = {(m.level, m.value): m for m in blank_maps(stack_backbone("zeros"), 16)}
    deep = zeros[("conv3", 1.0)].map
    assert deep.max() > 0
    ring = np.ones((16, 16), bool)
    ring[2:14, 2:14] = False
    # the artefact sits at the border: three 3x3 convs reach 3 cells in, and inside that the map is flat (it is
    # the interior's offset from the spatial mean); measured: ring mean 0.015, interior 0.0041
    assert np.ptp(deep[3:13, 3:13]) < 1e-9 * deep.max() and np.ptp(deep) > 0.2 * deep.max()
    assert deep[ring].mean() > 3 * deep[5:11, 5:11].mean()
    circular = blank_maps(stack_backbone("circular"), 16, reference_std={"conv3": 0.5})
    assert all(m.map.max() < 1e-6 for m in circular)
    ref = {m.level: m for m in circular if m.value == 1.0}
    assert ref["conv3"].units == "natural std" and ref["conv3"].blank_position_ratio < 1e-10
    scaled = blank_maps(stack_backbone("zeros"), 16, values=(1.0,), reference_std={"conv3": 0.5})
    m3 = next(m for m in scaled if m.level == "conv3")
    np.testing.assert_allclose(m3.map, deep / 0.5, rtol=1e-5)  # a batch of one: float32 rounding differs
    assert m3.blank_position_ratio == pytest.approx((m3.map**2).mean(), rel=1e-10)  # the map in units of 0.5
    aligned = next(m for m in blank_maps(stack_backbone("zeros"), 16, (1.0,), feat_size=8) if m.level == "conv3")
    with torch.inference_mode():
        f = stack_backbone("zeros")(torch.ones(1, 3, 16, 16))[2].double()
    f = F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=True)  # as the feature cache stores it
    ref = (f - f.mean((2, 3), keepdim=True)).pow(2).mean(1)[0].sqrt().numpy()
    assert aligned.resolution == "aligned 8x8 (native 16x16)"
    np.testing.assert_allclose(aligned.map, ref, rtol=1e-5, atol=1e-9)
    with pytest.raises(PosprobeError, match=r"in \[0, 1\]"):
        blank_maps(stack_backbone("zeros"), 16, values=(2.0,))


# -- the command ---------------------------------------------------------------------------------------------


FAST = ["--backbone", "tv:resnet18", "--layers", "relu,layer1", "--weights", "random", "--image-size", "32"]


def test_measure_writes_its_run_directory(small_sets, tmp_path, capsys, monkeypatch):
    train, test = small_sets
    out = tmp_path / "run"
    args = ["measure", *FAST, "--feat-size", "16", "--train", str(train), "--test", str(test), "--rolled"]
    code, stdout, err = run_cli([*args, "--shifts", "4,8", "--quiet", "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "measures.json",
        "measures.csv",
        "environment.json",
        "position_maps.png",
        "layer_measures.png",
    }
    assert f"wrote {out}" in stdout and "PVF natural" in stdout
    rows = list(csv.DictReader((out / "measures.csv").open()))
    assert [(r["condition"], r["level"]) for r in rows] == [
        ("natural", "relu"),
        ("natural", "layer1"),
        ("rolled", "relu"),
        ("rolled", "layer1"),
    ]
    assert rows[0]["measured_at"] == "aligned 16x16" and rows[1]["measured_at"] == "native 8x8"  # 8x8 < 16x16 / 2
    assert rows[0]["n_images"] == "6" and float(rows[0]["pvf_lo"]) <= float(rows[0]["pvf"]) <= float(rows[0]["pvf_hi"])
    assert rows[0]["eqt_interior_db_x4"] != "" and rows[2]["eqt_interior_db_x4"] == ""
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["shifts"] == [4, 8] and config["rolled"] and "kernel_size" not in config
    assert config["resolved"]["measured_at"]["layer1"] == "native 8x8"
    measures = json.loads((out / "measures.json").read_text())
    assert len(measures["equivariance"]) == 2 * 2 * 2 and measures["equivariance"][0]["n_images"] == 3
    assert len(measures["position_variance"]["rolled"][0]["pvf_channels"]) == 64
    quick = tmp_path / "quick"
    code, _, err = run_cli([*args, "--no-interval", "--quiet", "--out", str(quick)], capsys, monkeypatch)
    assert code == 0, err
    row = next(csv.DictReader((quick / "measures.csv").open()))
    assert row["pvf"] == rows[0]["pvf"] and math.isnan(float(row["pvf_lo"]))  # the same value, no Gram matrix


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--backbone", "nope"], ["unknown backbone 'nope'"]),
        (["--shifts", "a,b"], ["--shifts must be a comma list"]),
        (["--shifts", "32"], ["--shifts must be between 1 and 31"]),
        (["--image-size", "4"], ["--image-size must be at least 8"]),
        (["--cache-max-gb", "0.00001"], ["6 images would take 0.0 GB, over --cache-max-gb 1e-05", "smaller --train"]),
    ],
)
def test_bad_measure_settings_are_one_line_errors_and_write_nothing(
    extra, fragments, small_sets, tmp_path, capsys, monkeypatch
):
    train, test = small_sets
    out = tmp_path / "run"
    args = ["measure", *FAST, "--train", str(train), "--test", str(test), "--out", str(out), *extra]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_missing_folders_and_an_existing_out_are_refused(small_sets, tmp_path, capsys, monkeypatch):
    train, test = small_sets
    code, _, err = run_cli(
        ["measure", *FAST, "--train", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "image folder not found")
    (tmp_path / "exists").mkdir()
    code, _, err = run_cli(
        ["measure", *FAST, "--train", str(train), "--test", str(test), "--out", str(tmp_path / "exists")],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "exists")
