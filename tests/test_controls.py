"""Controls and selectivity: rolled images, paired intervals, and the acceptance experiment of a stride-1 conv
stack that can only know position through its padding (circular: none; zeros: from the borders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from conftest import assert_one_line_error, run_cli
from posprobe.backbones import create_backbone
from posprobe.backbones.registry import _REGISTRY, BackboneSpec, Level, register_backbone
from posprobe.data import RolledImages, TensorImages
from posprobe.errors import PosprobeError
from posprobe.features.cache import feature_key
from posprobe.intervals import bootstrap, paired_statistic
from posprobe.readouts.engine import Scores, pooled
from posprobe.readouts.train import TrainConfig
from posprobe.studies.controls import parse_controls, same_input, selectivity
from posprobe.studies.probe_run import ProbeRunConfig, execute


def _images(n: int = 3, side: int = 8) -> TensorImages:
    return TensorImages(torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)), list("abc")[:n], "x")


def test_rolled_images_are_numpy_rolls_with_seeded_uniform_shifts_and_their_own_cache_key():
    base = _images()
    rolled = RolledImages(base, rolls=2, seed=5)
    assert len(rolled) == 6 and rolled.ids[2].startswith("b@roll") and rolled.source_of[rolled.ids[3]] == "b"
    for k in range(6):
        dy, dx = rolled.shifts[k // 2][k % 2]
        expected = np.roll(base.images[k // 2].numpy(), (dy, dx), axis=(1, 2))
        np.testing.assert_array_equal(rolled[k].numpy(), expected)
    again, other = RolledImages(base, rolls=2, seed=5), RolledImages(base, rolls=2, seed=6)
    assert again.shifts == rolled.shifts and other.shifts != rolled.shifts
    pixels = create_backbone("posenet")
    keys = {feature_key(pixels, s, 8)[0] for s in (base, rolled, again, other)}
    assert len(keys) == 3  # the same rolls share an entry; other rolls or no rolls do not


def test_random_shifts_cover_the_torus_uniformly():
    rolled = RolledImages(TensorImages(torch.zeros(400, 3, 4, 4), [str(i) for i in range(400)], "z"), rolls=5)
    counts = np.zeros((4, 4))
    for shifts in rolled.shifts:
        for dy, dx in shifts:
            counts[dy, dx] += 1
    assert stats.chisquare(counts.ravel()).pvalue > 1e-3  # 2,000 shifts over 16 cells


def test_an_orbit_holds_every_shift_and_a_bad_step_is_refused():
    orbit = RolledImages(_images(2, 8), orbit_step=2)
    assert len(orbit) == 2 * 16 and sorted(orbit.shifts[0]) == [(a, b) for a in (0, 2, 4, 6) for b in (0, 2, 4, 6)]
    with pytest.raises(PosprobeError, match="orbit step must divide the image size 8; given 3"):
        RolledImages(_images(), orbit_step=3)


def test_paired_statistic_matches_the_bootstrap_of_the_differences_and_a_direct_mean():
    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(3, 20, generator=gen, dtype=torch.float64) for _ in range(3))
    diff = paired_statistic([a, b], lambda m: m[:, 0] - m[:, 1])
    same = bootstrap(a - b)  # the same resamples of the same (seed, image) cells
    assert diff.mean == pytest.approx(float(a.mean() - b.mean()), abs=1e-12)
    assert (diff.lo, diff.hi) == pytest.approx((same.lo, same.hi), abs=1e-9)
    sel = paired_statistic([a, b, c], selectivity)
    assert sel.mean == pytest.approx(float(a.mean() - max(b.mean(), c.mean())), abs=1e-12)
    assert sel.lo < sel.mean < sel.hi
    # a control below chance explains nothing: selectivity is then the SPC itself, never more
    below = paired_statistic([a, -b], selectivity)
    assert below.mean == pytest.approx(float(a.mean()), abs=1e-12) and below.hi <= float(a.max())
    with pytest.raises(ValueError, match="same seeds and images"):
        paired_statistic([a, b[:, :5]], selectivity)


def test_scores_of_rolls_are_averaged_per_source_image():
    rolled = RolledImages(_images(2), rolls=3)
    spc = torch.tensor([0.1, 0.2, 0.6, -0.3, 0.0, 0.3])
    scores = Scores(rolled.ids, spc, spc.abs(), torch.tensor([True, True, True, False, True, False]))
    merged = pooled(scores, rolled.source_of)
    assert merged.ids == ["a", "b"]
    assert merged.spc.tolist() == pytest.approx([0.3, 0.0])
    assert merged.mae.tolist() == pytest.approx([0.3, 0.2])
    assert merged.constant.tolist() == [True, False]


def test_control_names_are_parsed_and_checked():
    assert parse_controls("rolled,pixels") == ("pixels", "rolled")
    assert parse_controls("all") == ("pixels", "random", "rolled", "rolled-train")
    assert parse_controls("none") == ()
    with pytest.raises(PosprobeError, match="unknown control 'pixel'"):
        parse_controls("pixel")
    with pytest.raises(PosprobeError, match="takes 'all', 'none' or a list"):
        parse_controls("pixels,all")


def test_the_random_control_is_fed_what_the_network_is_fed():
    network = create_backbone("efficientnet_lite0")  # --input-norm paper: x (ImageNet std / its own std)
    control = same_input(create_backbone("efficientnet_lite0", "random"), network)
    assert torch.equal(control.mean, network.mean) and torch.equal(control.std, network.std)
    assert control.input_norm == network.input_norm == "paper"
    assert create_backbone("efficientnet_lite0", "random").input_norm == "none"  # what it would get otherwise


# ---- acceptance: a stride-1 conv stack whose only position source is its padding --------------------------------


class _Stack(nn.Module):
    """Five 3x3 convolutions 3 -> 16 -> ... -> 16 at stride 1 with ReLUs, zero padding (the surgery makes it
    circular); taps the last two."""

    def __init__(self):
        super().__init__()
        chans = [3, 16, 16, 16, 16, 16]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            out.append(x)
        return out[-2:]


def _build_stack(weights, seed: int) -> nn.Module:
    return _Stack()  # create_backbone seeds the global generator around build


STACK = BackboneSpec(
    "test-stride1-stack",
    "five stride-1 3x3 convolutions, random weights",
    (Level("conv4", 16, 1), Level("conv5", 16, 1)),
    build=_build_stack,
    weight_names=("random",),
    default_weights="random",
)


@pytest.fixture(scope="module")
def stack_runs():
    register_backbone(STACK, replace=True)
    runs = {}
    try:
        for padding in ("circular", "zeros"):
            config = ProbeRunConfig(
                backbone=STACK.name,
                backbone_padding=padding,
                patterns=("H", "V", "G"),
                synthetic=(),
                image_size=32,
                feat_size=32,
                readout_padding=0,
                crops_per_photo=2,
                train=TrainConfig(steps=300, batch_size=16, lr=0.05),
                controls=("pixels", "rolled", "rolled-train"),
                rolls=8,
            )
            runs[padding] = execute(config, progress=False)
    finally:
        _REGISTRY.pop(STACK.name, None)
    return runs


def _rolled_rows(run, training: str) -> dict[str, dict]:
    """Selectivity rows on the rolled test images of the readouts trained on ``training`` images, by pattern."""
    rows = run.controls.selectivity
    return {r["pattern"]: r for r in rows if (r["training"], r["test_set"]) == (training, "photos-rolled")}


@pytest.mark.parametrize("training", ["natural", "rolled"])
def test_a_circular_stack_has_no_position_beyond_its_controls_on_rolled_images(stack_runs, training):
    # measured (H, V, G): natural training .007 / .003 / -.025, rolled training .016 / .017 / -.002
    for pattern, row in _rolled_rows(stack_runs["circular"], training).items():
        assert row["selectivity"] <= 0.05, (pattern, row)


@pytest.mark.parametrize("training", ["natural", "rolled"])
def test_the_same_stack_with_zero_padding_reads_out_position_on_rolled_images(stack_runs, training):
    # measured: selectivity .52 / .49 / .60 (natural training), .52 / .50 / .62 (rolled), lower bounds >= .41
    circular, zeros = _rolled_rows(stack_runs["circular"], training), _rolled_rows(stack_runs["zeros"], training)
    for pattern in ("H", "V", "G"):
        assert zeros[pattern]["selectivity_lo"] > 0.2, zeros[pattern]
        assert zeros[pattern]["selectivity"] > circular[pattern]["selectivity"] + 0.2


def test_content_cues_give_a_position_free_stack_a_score_on_photos_that_rolling_takes_away(stack_runs):
    """Why the rolled control exists: the circular stack's G readout scores on the upright photos (their
    subjects sit in the centre) but not on the same photos rolled."""
    rows = {r["pattern"]: r for r in stack_runs["circular"].controls.selectivity if r["test_set"] == "photos"}
    assert rows["G"]["content_share_lo"] > 0  # measured .16 [.01, .29]


def test_the_controls_option_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    base = ["probe", "--backbone", "posenet", "--image-size", "32", "--quiet", "--out", str(tmp_path / "r")]
    code, _, err = run_cli([*base, "--controls", "pixel"], capsys, monkeypatch)
    assert_one_line_error(code, err, "unknown control 'pixel'", "rolled-train")
    code, _, err = run_cli([*base, "--controls", "pixels"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--controls pixels cannot run on posenet", "the network is PosENet itself")
    code, _, err = run_cli([*base, "--rolls", "0"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--rolls must be at least 1; given 0")
    assert not (tmp_path / "r").exists()
