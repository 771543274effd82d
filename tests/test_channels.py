"""Position channels (measures/channels.py, studies/channel_run.py, ``posprobe channels``): the rankers against
hand-computed values, and the acceptance on a model whose position channels are known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, invoke, save_image
from posprobe.backbones.registry import _REGISTRY, BackboneSpec, Level, register_backbone
from posprobe.data import FlippedImages, TensorImages
from posprobe.errors import PosprobeError
from posprobe.features.cache import dataset_identity
from posprobe.measures.channels import (
    ABLATIONS,
    ChannelRanking,
    ablate,
    border_scores,
    channel_moments,
    flip_scores,
    linear_weight_scores,
    random_draws,
)
from posprobe.readouts.train import TrainConfig
from posprobe.studies.channel_run import ChannelConfig, channel_counts, parse_k_percent, run_channels

# ---- the rankers by hand ----------------------------------------------------------------------------------------


def test_ranking_order_puts_nan_last_and_breaks_ties_by_index():
    r = ChannelRanking("pvf", "x", np.array([0.5, math.nan, 2.0, 0.5, math.inf]))
    assert r.order.tolist() == [4, 2, 0, 3, 1]
    assert r.top(2).tolist() == [4, 2]
    d = r.to_dict()
    assert d["scores"][1] is None and d["order"] == [4, 2, 0, 3, 1]


def test_linear_weight_scores_are_the_weight_norm_times_the_channel_rms_root_sum_square_over_patterns():
    w_h = torch.zeros(1, 3, 3, 3)
    w_h[0, 0] = 1.0  # ||w|| = 3 on channel 0
    w_h[0, 2, 1, 1] = 2.0  # ||w|| = 2 on channel 2
    w_v = torch.zeros(1, 3, 3, 3)
    w_v[0, 2, 0, 0] = 1.0
    rms = torch.tensor([1.0, 5.0, 0.5])
    got = linear_weight_scores({"H": w_h, "V": w_v}, rms)
    expected = [3.0 * 1.0, 0.0, math.sqrt((2 * 0.5) ** 2 + (1 * 0.5) ** 2)]
    assert np.allclose(got, expected)
    # rescaling a channel and its weight inversely leaves its score alone
    w2 = w_h.clone()
    w2[0, 0] /= 10
    assert np.allclose(linear_weight_scores({"H": w2}, rms * torch.tensor([10.0, 1, 1]))[0], 3.0)


def test_flip_scores_see_content_weighted_by_position_and_not_symmetric_maps():
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(6, 1, 8, 8, generator=gen)  # (N, 1, h, w)
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8)
    border = torch.ones(8, 8)
    border[1:-1, 1:-1] = 0
    plain = torch.cat([content * ramp, content * border, content], 1)  # (N, 3, h, w)
    mirrored = torch.cat([content.flip(-1) * ramp, content.flip(-1) * border, content.flip(-1)], 1)
    _, std = channel_moments(plain)
    got = flip_scores(plain, [mirrored], std)
    gap = lambda t: t.double().mean((2, 3))  # noqa: E731
    by_hand = (gap(plain) - gap(mirrored)).abs().mean(0) / std
    assert np.allclose(got, by_hand.numpy())
    assert got[0] > 0.01 and got[1] < 1e-9 and got[2] < 1e-9  # a symmetric map and plain content pool alike


def test_border_scores_by_hand():
    x = torch.ones(2, 3, 6, 6)
    x[:, 0, 1:-1, 1:-1] = 0.25  # border 1, interior .25: ratio 4
    x[:, 1] = 0  # silent: NaN
    x[:, 2, 0, :] = 0  # top row silent: border mean (20 - 6) / 20
    score, ratio = border_scores(x)
    assert ratio[0] == pytest.approx(4.0) and score[0] == pytest.approx(math.log(4))
    assert math.isnan(ratio[1])
    assert ratio[2] == pytest.approx(14 / 20) and score[2] == pytest.approx(abs(math.log(0.7)))
    with pytest.raises(PosprobeError, match="no interior"):
        border_scores(torch.ones(1, 1, 2, 2))


def test_ablate_zero_and_mean_touch_only_the_chosen_channels():
    x = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)
    means = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    z = ablate(x, [1, 3], "zero", means)
    m = ablate(x, np.array([1]), "mean", means)
    assert torch.equal(z[:, [0, 2]], x[:, [0, 2]]) and (z[:, [1, 3]] == 0).all()
    assert (m[:, 1] == 20).all() and torch.equal(m[:, [0, 2, 3]], x[:, [0, 2, 3]])
    assert torch.equal(ablate(x, [], "zero", means), x)
    with pytest.raises(PosprobeError, match="unknown ablation"):
        ablate(x, [0], "noise", means)


def test_random_draws_are_seeded_distinct_and_shared_by_k():
    a, b = random_draws(50, 7, 3, seed=1), random_draws(50, 7, 3, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(len(set(d.tolist())) == 7 for d in a)
    assert not np.array_equal(a[0], a[1])


def test_channel_counts_and_k_percent_parsing():
    assert channel_counts((1, 5, 10, 100), 320) == [(1, 3), (5, 16), (10, 32), (100, 320)]
    assert channel_counts((0.1, 1, 2), 16) == [(0.1, 1)]  # all round to one channel: kept once
    assert parse_k_percent("1, 5,10") == (1.0, 5.0, 10.0)
    for bad in ("0", "a,b", "150", ""):
        with pytest.raises(PosprobeError, match="--k"):
            parse_k_percent(bad)


def test_flipped_images_mirror_and_have_their_own_cache_identity():
    gen = torch.Generator().manual_seed(0)
    base = TensorImages(torch.rand(3, 3, 8, 8, generator=gen), ["a", "b#crop1", "c"], "set")
    h, v = FlippedImages(base, "horizontal"), FlippedImages(base, "vertical")
    assert torch.equal(h[1], base[1].flip(-1)) and torch.equal(v[2], base[2].flip(-2))
    assert h.ids == ["a@hflip", "b#crop1@hflip", "c@hflip"]
    assert dataset_identity(h) != dataset_identity(v) != dataset_identity(base)
    with pytest.raises(PosprobeError, match="unknown flip axis"):
        FlippedImages(base, "diagonal")


# ---- acceptance: a model with four position channels among sixteen ----------------------------------------------

POSITION = {2: "x ramp", 9: "y ramp", 7: "border", 14: "interior"}  # channel -> what it carries


def _symmetric(conv: nn.Conv2d) -> nn.Conv2d:
    """Average the kernel over both mirror flips: the conv then commutes with flips (no orientation preference)."""
    with torch.no_grad():
        w = conv.weight
        conv.weight.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    return conv


class _PositionChannels(nn.Module):
    """12 content channels (flip-symmetric circular convolutions: no position, equivariant to flips) and 4
    channels that are the local content times a position map: x and y ramps, a border map and its complement."""

    def __init__(self):
        super().__init__()
        self.content = _symmetric(nn.Conv2d(3, 12, 3, padding=1, padding_mode="circular"))
        self.modulation = _symmetric(nn.Conv2d(3, 1, 3, padding=1, padding_mode="circular"))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = x.shape[-1]
        content = torch.relu(self.content(x))  # (B, 12, S, S)
        m = 1 + 0.5 * torch.tanh(self.modulation(x))  # (B, 1, S, S)
        r = torch.linspace(0, 1, s)
        idx = torch.arange(s)
        edge = torch.minimum(idx, s - 1 - idx).float()
        dist = torch.minimum(edge[:, None], edge[None, :])  # (S, S) cells to the nearest border
        border = torch.exp(-dist / 2)
        maps = {2: r.view(1, s).expand(s, s), 9: r.view(s, 1).expand(s, s), 7: border, 14: 1 - border}
        channels, k = [], 0
        for c in range(16):
            if c in maps:
                channels.append(m[:, 0] * maps[c])
            else:
                channels.append(content[:, k])
                k += 1
        return [torch.stack(channels, 1)]


SPEC = BackboneSpec(
    "test-position-channels",
    "16 channels, 4 of them content x position maps",
    (Level("mixed", 16, 1),),
    build=lambda weights, seed: _PositionChannels(),
    weight_names=("random",),
    default_weights="random",
)


@pytest.fixture(scope="module")
def noise_sets(tmp_path_factory):
    """Training and test folders of seeded noise images: no position in the content itself."""
    root = tmp_path_factory.mktemp("channels")
    rng = np.random.default_rng(0)
    for i in range(24):
        save_image(root / "train" / f"t{i:02d}.png", rng.integers(0, 256, (32, 32, 3)))
    for i in range(8):
        save_image(root / "test" / f"s{i}.png", rng.integers(0, 256, (32, 32, 3)))
    return root / "train", root / "test"


@pytest.fixture(scope="module")
def registered():
    register_backbone(SPEC, replace=True)
    yield SPEC.name
    _REGISTRY.pop(SPEC.name, None)


def _config(train, test, **kw) -> ChannelConfig:
    settings = dict(
        backbone=SPEC.name,
        image_size=32,
        feat_size=16,
        train_dir=str(train),
        test_dir=str(test),
        k_percent=(6.25, 25.0),  # 1 and 4 of 16 channels
        draws=5,
        train=TrainConfig(steps=300, batch_size=8, lr=0.05),
    )
    return ChannelConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def result(registered, noise_sets):
    return run_channels(_config(*noise_sets), progress=False)


def test_the_rankers_find_the_channels_built_to_carry_position(result):
    top = {name: set(r.top(4).tolist()) for name, r in result.rankings.items()}
    assert top["linear"] == set(POSITION), result.rankings["linear"].scores
    assert top["pvf"] == set(POSITION), result.rankings["pvf"].scores
    assert set(result.rankings["flip"].top(2).tolist()) == {2, 9}  # the ramps: a mirror moves content along them
    assert set(result.rankings["border"].top(2).tolist()) == {7, 14}  # the border map and its complement


def test_ablating_the_top_channels_drops_spc_far_more_than_random_channels(result):
    for ranker in ("linear", "pvf"):
        for readout in ("pem", "linear"):
            row = next(
                r
                for r in result.rows
                if (r["ranker"], r["readout"], r["pattern"], r["k"], r["ablation"])
                == (ranker, readout, "mean", 4, "mean")
            )
            assert row["intact_spc"].mean > 0.7, row
            assert row["top_spc"].mean < row["random_spc"].mean - 0.3, row
            assert row["verdict"] == "lower", row
            assert row["drop_beyond_random"].lo > 0
    assert all(c.status == "converged" for c in result.convergence.values()), result.convergence


def test_random_rows_are_shared_by_every_ranker(result):
    rows = [r for r in result.rows if (r["readout"], r["pattern"], r["k"], r["ablation"]) == ("pem", "H", 4, "mean")]
    assert len(rows) == 4 and len({(r["random_spc"].mean, r["random_draw_std"]) for r in rows}) == 1


def test_channels_command_writes_its_run_directory(registered, noise_sets, tmp_path):
    train, test = noise_sets
    out = tmp_path / "run"
    code, stdout, err = invoke(
        "channels", "--backbone", SPEC.name, "--out", out, "--image-size", "32", "--feat-size", "16",
        "--train", train, "--test", test, "--k", "25", "--draws", "2", "--steps", "60", "--batch-size", "8",
        "--rankers", "pvf,border", "--ablation", "mean", "--pattern", "H", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "pvf" in stdout and "wrote" in stdout
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json", "rankings.json", "channels.csv", "ablation.json", "ablation.csv", "report.md",
        "environment.json", "ablation.png", "top_channels.png",
    }  # fmt: skip
    rankings = json.loads((out / "rankings.json").read_text())
    assert set(rankings["rankings"]) == {"pvf", "border"} and rankings["channels"] == 16
    assert len((out / "channels.csv").read_text().splitlines()) == 17
    ablation = json.loads((out / "ablation.json").read_text())
    assert {r["readout"] for r in ablation["rows"]} == {"pem", "linear"} and "bootstrap" in ablation["test"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--rankers", "linear,weights"], ["unknown ranker 'weights'", "linear"]),
        (["--ablation", "noise"], ["unknown ablation 'noise'"]),
        (["--k", "0,5"], ["--k percentages"]),
        (["--readouts", "pem", "--rankers", "linear"], ["add linear to --readouts"]),
        (["--level", "nowhere"], ["nowhere"]),
        (["--level", "all"], ["one layer"]),
        (["--draws", "0"], ["--draws"]),
    ],
)
def test_channels_command_refuses_bad_input_in_one_line(registered, noise_sets, tmp_path, args, fragments):
    train, test = noise_sets
    code, _, err = invoke(
        "channels", "--backbone", SPEC.name, "--out", tmp_path / "bad", "--image-size", "32",
        "--train", train, "--test", test, "--quiet", *args,
    )  # fmt: skip
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "bad").exists()


def test_a_config_built_in_python_trains_its_profile_and_is_checked_like_the_command(registered, noise_sets):
    assert ChannelConfig(profile="quick").train.steps == 1000  # the profile's schedule, not the official one
    train, test = noise_sets
    for bad, fragment in (
        (dict(k_percent=(0,)), "k_percent"),
        (dict(k_percent="5"), "k_percent"),
        (dict(rankers="pvf"), "the string 'pvf'"),
        (dict(level="all"), "one layer"),
        (dict(level="mixed,mixed"), "one layer"),
    ):
        with pytest.raises(PosprobeError, match=fragment):
            run_channels(_config(train, test, **bad), progress=False)


def test_zero_and_mean_ablation_rank_alike_for_a_one_layer_unpadded_readout_but_not_a_padded_one():
    """A constant channel shifts a one-layer unpadded linear readout's map by a constant (the upsampling is linear):
    SPC cannot tell the two ablations apart (a PEM readout's sigmoid before the upsampling bends that only slightly).
    With readout padding the border cells see the constant differently, so they differ (README: Channels)."""
    from posprobe.metrics import spearman
    from posprobe.readouts.linear import LinearReadout
    from posprobe.targets import make_target

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 16, 16, generator=gen) + torch.linspace(0, 1, 16)  # position along x in every channel
    target = make_target("H", 64, 64)
    means = torch.full((6,), 3.0, dtype=torch.float64)
    spc = {}
    for padding in (0, 1):
        torch.manual_seed(0)
        readout = LinearReadout(6, 3, padding, 16, 64)
        with torch.no_grad():
            spc[padding] = [spearman(readout(ablate(x, [0, 1], mode, means))[:, 0], target) for mode in ABLATIONS]
    assert torch.allclose(spc[0][0], spc[0][1], atol=1e-5)
    assert not torch.allclose(spc[1][0], spc[1][1], atol=1e-3)
