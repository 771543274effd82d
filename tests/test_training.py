"""Training readouts: loss, joint == separate training, the lr schedule, profiles, and the paper's control."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from posprobe.backbones import create_backbone
from posprobe.data import TensorImages, synthetic_images
from posprobe.errors import PosprobeError
from posprobe.features.encode import EncodedSet
from posprobe.features.sources import MemorySource
from posprobe.readouts.joint import predict_source, train_readouts
from posprobe.readouts.pem import Readout
from posprobe.readouts.probe import PositionProbe
from posprobe.readouts.train import PROFILES, ReadoutJob, TrainConfig, get_profile, is_official
from posprobe.targets import make_target


def predict(readout, features, batch_size: int = 64, device="cpu", channels=None) -> torch.Tensor:
    """(N, S, S) maps of one eval-mode readout (joint.predict_source, for a single readout)."""
    return predict_source({"map": readout}, features, batch_size, device, {"map": channels})["map"]


FEAT, OUT, CHANNELS = 10, 16, 4


def position_features(n: int = 40, seed: int = 0) -> torch.Tensor:
    """(n, C, FEAT, FEAT) features where two channels carry x and y plus noise: a learnable position signal."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, CHANNELS, FEAT, FEAT, generator=g)
    ramp = torch.linspace(-1, 1, FEAT)
    feats[:, 0] += 2 * ramp[None, None, :]
    feats[:, 1] += 2 * ramp[None, :, None]
    return feats


def seeded_readout(seed: int, kernel: int = 3, depth: int = 1, padding: int = 1) -> Readout:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Readout(CHANNELS, kernel, depth, padding, FEAT, OUT)


def small_config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 4, "batch_size": 8, **kw})  # the lr decays after epoch 3 (2/3 of 4)


def params(readout: Readout) -> list[torch.Tensor]:
    return [p.detach().clone() for p in readout.parameters()]


def train_one(readout: Readout, pattern: str, config: TrainConfig, feats: torch.Tensor) -> ReadoutJob:
    job = ReadoutJob(pattern, readout, make_target(pattern, OUT, OUT))
    train_readouts(feats, [job], config, progress=False)
    return job


# ---- training loop -----------------------------------------------------------------------------------


def test_loss_falls():
    job = train_one(seeded_readout(0), "H", small_config(epochs=6), position_features())
    assert len(job.losses) == 6 * 5  # one loss per update: 40 images in batches of 8
    assert job.losses[-1] < 0.5 * job.losses[0]


def test_loss_is_the_mse_to_the_target():
    """After training, the last update's loss is close to the MSE of the trained readout's maps.

    Not equal: the recorded loss averages over batches while the weights change and BN uses batch stats.
    """
    feats = position_features()
    job = train_one(seeded_readout(0), "V", small_config(epochs=8, decay_at=(0.5,)), feats)
    pred = predict(job.readout, feats)
    mse = float(((pred - make_target("V", OUT, OUT)) ** 2).mean())
    assert mse == pytest.approx(job.losses[-1], rel=0.5)


def test_readouts_end_in_eval_mode():
    job = train_one(seeded_readout(0), "H", small_config(epochs=1), position_features(8))
    assert not job.readout.training


def test_training_is_reproducible_and_shuffle_follows_the_seed():
    feats = position_features()
    a = train_one(seeded_readout(0), "G", small_config(seed=1), feats).readout
    b = train_one(seeded_readout(0), "G", small_config(seed=1), feats).readout
    c = train_one(seeded_readout(0), "G", small_config(seed=2), feats).readout
    # exact on any CPU: a and b are the same computation (same shapes, same kernels) run twice
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    assert not all(torch.equal(x, y) for x, y in zip(params(a), params(c)))


def test_joint_training_equals_training_each_alone():
    feats = position_features()
    config = small_config(seed=3)
    specs = [
        ("H", 11, dict(kernel=3, depth=1, padding=0)),
        ("G", 12, dict(kernel=1, depth=2, padding=0)),
        ("HS", 13, dict(kernel=5, depth=1, padding=2)),
    ]
    initial = [seeded_readout(seed, **kw) for _, seed, kw in specs]
    jobs = [ReadoutJob(p, copy.deepcopy(r), make_target(p, OUT, OUT)) for (p, _, _), r in zip(specs, initial)]
    train_readouts(feats, jobs, config, progress=False)
    for job, (pattern, _, _), r in zip(jobs, specs, initial):
        alone = train_one(copy.deepcopy(r), pattern, config, feats)
        joint_state, alone_state = job.readout.state_dict(), alone.readout.state_dict()
        for k in joint_state:  # exact: three kernel sizes fuse with nothing, so each runs its own shapes alone
            assert torch.equal(joint_state[k], alone_state[k]), (pattern, k)
        assert job.losses == alone.losses


def test_job_on_a_channel_subset_equals_a_readout_on_sliced_features():
    feats = position_features()
    channels = torch.tensor([0, 2])
    torch.manual_seed(5)
    sub = Readout(2, 3, 1, 1, FEAT, OUT)
    alone = copy.deepcopy(sub)
    job = ReadoutJob("H", sub, make_target("H", OUT, OUT), channels=channels)
    train_readouts(
        feats, [job, ReadoutJob("V", seeded_readout(1), make_target("V", OUT, OUT))], small_config(), progress=False
    )
    ref = train_one(alone, "H", small_config(), feats[:, channels].contiguous())
    for x, y in zip(params(job.readout), params(ref.readout)):  # equal up to float reassociation
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predict(job.readout, feats, channels=channels), predict(ref.readout, feats[:, channels]))


def test_no_training_images_is_refused():
    with pytest.raises(PosprobeError):
        train_one(seeded_readout(0), "H", small_config(), torch.zeros(0, CHANNELS, FEAT, FEAT))


def test_predict_is_the_eval_mode_readout_in_batches():
    feats = position_features(10)
    readout = train_one(seeded_readout(0), "H", small_config(epochs=1), feats).readout
    with torch.no_grad():
        expected = readout.eval().forward_aligned(feats)[:, 0]
    torch.testing.assert_close(predict(readout, feats, batch_size=3), expected)


# ---- learning-rate schedule --------------------------------------------------------------------------
# With lr_gamma=0 the learning rate is 0 from the milestone on, so SGD (momentum and weight decay are
# both scaled by lr) leaves the parameters exactly where they were at the milestone.


def test_lr_drops_at_the_milestone_epoch():
    feats = position_features()
    frozen_after_2 = train_one(seeded_readout(0), "H", small_config(epochs=4, decay_at=(0.5,), lr_gamma=0.0), feats)
    two_epochs = train_one(seeded_readout(0), "H", small_config(epochs=2, decay_at=(5.0,)), feats)
    three_epochs = train_one(seeded_readout(0), "H", small_config(epochs=3, decay_at=(5.0,)), feats)
    a, b, c = (params(j.readout) for j in (frozen_after_2, two_epochs, three_epochs))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_counting_epochs_the_decay_falls_at_an_epoch_boundary_not_a_batch():
    """5 batches per epoch: a decay at half of 2 epochs falls after update 5, never mid-epoch."""
    assert small_config(epochs=2, decay_at=(0.5,)).schedule(40).milestones == (5,)
    assert small_config(epochs=3, decay_at=(0.5,)).schedule(40).milestones == (10,)  # round(1.5) = 2 epochs
    feats = position_features(40)
    late = train_one(seeded_readout(0), "H", small_config(epochs=2, decay_at=(1.0,), lr_gamma=0.0), feats)
    never = train_one(seeded_readout(0), "H", small_config(epochs=2, decay_at=(25.0,)), feats)
    assert all(torch.equal(x, y) for x, y in zip(params(late.readout), params(never.readout)))


def test_lr_gamma_scales_the_step():
    feats = position_features()
    slow = train_one(seeded_readout(0), "H", small_config(epochs=3, decay_at=(1 / 3,), lr_gamma=0.1), feats)
    fast = train_one(seeded_readout(0), "H", small_config(epochs=3, decay_at=(1 / 3,), lr_gamma=1.0), feats)
    assert not all(torch.equal(x, y) for x, y in zip(params(slow.readout), params(fast.readout)))


# ---- profiles and config validation ------------------------------------------------------------------


def test_official_profile_is_the_authors_optimiser_for_the_papers_number_of_updates():
    cfg = get_profile("official")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.lr_gamma) == (0.1, 0.9, 1e-4, 32, 0.1)
    assert cfg.steps == 4950 == 15 * math.ceil(10553 / 32) and cfg.epochs == 15 and cfg.shuffle
    assert cfg == PROFILES["official"]


@pytest.mark.parametrize(
    "images,updates,decay,epochs",
    [
        (10553, 4950, 3300, 15.0),  # DUT-S: exactly the authors' 15 epochs of 330 batches, decay after epoch 10
        (312, 4950, 3300, 4950 / 10),  # the bundled crops: cycled ~495 times
        (20000, 15 * 625, 6250, 15.0),  # larger than DUT-S: never fewer than the authors' 15 epochs
    ],
)
def test_the_official_schedule_counts_updates(images, updates, decay, epochs):
    sched = get_profile("official").schedule(images)
    assert (sched.updates, sched.milestones, sched.images) == (updates, (decay,), images)
    assert sched.epochs == pytest.approx(epochs)
    assert f"{updates:,} SGD updates" in sched.describe() and f"{images:,} distinct" in sched.describe()


@pytest.mark.parametrize("epochs,milestone", [(3, 2), (15, 10), (30, 20), (1, 1), (6, 4)])
def test_literal_epochs_are_the_authors_code(epochs, milestone):
    """--epochs E: exactly E passes, the decay at the epoch boundary nearest two thirds."""
    cfg = get_profile("official", epochs=epochs)
    assert cfg.steps is None and cfg.epochs == epochs and cfg.lr == 0.1 and cfg.batch_size == 32
    sched = cfg.schedule(100)  # 4 batches per epoch
    assert (sched.updates, sched.milestones) == (4 * epochs, (4 * milestone,))


def test_steps_override_and_exclusive_with_epochs():
    """--steps N runs exactly N updates, also on a set where the profile's 15-epoch floor would be more."""
    assert get_profile("official", steps=120).schedule(64).updates == 120
    assert get_profile("official", steps=500).schedule(10553).updates == 500
    assert get_profile("official").schedule(20000).updates == 15 * 625  # the profile's own floor stays
    with pytest.raises(PosprobeError, match="not both"):
        get_profile("official", steps=100, epochs=3)


def test_a_cycled_set_sees_every_image_once_per_pass_and_stops_at_the_last_update():
    """10 images, batch 4, 7 updates: passes of 3 batches (4, 4, 2 images), the third pass stopped after one."""
    seen = []

    class Recording(MemorySource):
        def batches(self, order, batch_size, device="cpu"):
            for idx, batch in super().batches(order, batch_size, device):
                seen.append(sorted(idx.tolist()))
                yield idx, batch

    job = ReadoutJob("H", seeded_readout(0), make_target("H", OUT, OUT))
    train_readouts(
        Recording(EncodedSet.from_aligned("x", position_features(10), list("abcdefghij"))),
        [job],
        small_config(steps=7, epochs=1, batch_size=4),
        progress=False,
    )
    assert len(job.losses) == 7 == job.schedule.updates
    assert sorted(sum(seen[0:3], [])) == list(range(10)) == sorted(sum(seen[3:6], []))
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2, 4]


def test_none_overrides_are_ignored():
    assert get_profile("official", epochs=None, lr=None) == get_profile("official")


def test_quick_profile_decays_at_the_same_fraction():
    sched = get_profile("quick").schedule(312)
    assert sched.milestones[0] / sched.updates == pytest.approx(2 / 3, abs=0.01)


def test_official_profile_keeps_c_to_c_and_quick_caps_deep_readouts_at_32():
    official, quick = get_profile("official"), get_profile("quick")
    assert official.max_readout_width is None and official.readout_width(1472) is None
    assert quick.readout_width(1472) == 32
    assert quick.readout_width(3) is None  # a cap never widens: PosENet's 3 -> 3 layers stay
    assert quick.readout_width(32) is None
    assert not is_official(TrainConfig(max_readout_width=256))
    assert "C -> C" in official.describe() and "at most 32 channels" in quick.describe()
    with pytest.raises(PosprobeError, match="--readout-width must be >= 1"):
        TrainConfig(max_readout_width=0)


def test_unknown_profile_is_refused():
    with pytest.raises(PosprobeError, match="Did you mean 'official'"):
        get_profile("oficial")


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(epochs=-1),
        dict(batch_size=0),
        dict(lr=0.0),
        dict(steps=0),
        dict(lr=math.nan),
        dict(lr=math.inf),
        dict(weight_decay=math.nan),
        dict(momentum=-1.0),
        dict(decay_at=(0.0,)),
    ],
)
def test_invalid_config_is_refused(bad):
    with pytest.raises(PosprobeError):
        TrainConfig(**bad)


def test_zero_epochs_via_profile_is_refused():
    with pytest.raises(PosprobeError):
        get_profile("official", epochs=0)


# ---- the paper's control: PosENet (Table 1 and Table 4) ----------------------------------------------

SIZE = 64


@pytest.fixture(scope="module")
def content_free_train_set() -> TensorImages:
    """64 images of one random colour each: nothing in them says where a pixel is."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 1, 1, generator=g).expand(64, 3, SIZE, SIZE).contiguous()
    return TensorImages(images, [f"colour{i}" for i in range(64)], "colours")


def fit_posenet(train_set: TensorImages, padding: int) -> PositionProbe:
    probe = PositionProbe(
        create_backbone("posenet"),
        patterns=["H"],
        padding=padding,
        feat_size=28,
        image_size=SIZE,
        train_config=get_profile("official", epochs=15),
        progress=False,
    )
    return probe.fit(train_set)


def synthetic_scores(probe: PositionProbe) -> dict:
    return {k: probe.score(synthetic_images(k, SIZE, seed=1))["H"] for k in ("black", "white", "noise")}


@pytest.fixture(scope="module")
def posenet_scores(content_free_train_set):
    return {pad: synthetic_scores(fit_posenet(content_free_train_set, pad)) for pad in (0, 2)}


def test_posenet_without_padding_cannot_read_position(posenet_scores):
    s = posenet_scores[0]
    for kind in ("black", "white"):
        assert bool(s[kind].constant[0]), kind
        assert float(s[kind].spc[0]) == 0.0, kind
        assert s[kind].summary()["n_constant"] == 1
    assert not bool(s["noise"].constant[0])
    assert abs(float(s["noise"].spc[0])) < 0.15


def test_posenet_with_readout_padding_reads_position(posenet_scores):
    """Table 4: zero padding in the readout alone gives PosENet position (paper: H .397 with padding 2)."""
    s = posenet_scores[2]
    assert float(s["white"].spc[0]) > 0.3
    assert float(s["noise"].spc[0]) > 0.2
    assert bool(s["black"].constant[0])  # all-zero input and zero padding are indistinguishable


def test_posenet_mae_of_a_constant_prediction_is_about_a_quarter(posenet_scores):
    """Table 1: PosENet H MAE .251 on black/white, i.e. a constant near the target's mean 0.5."""
    assert float(posenet_scores[0]["white"].mae[0]) == pytest.approx(0.251, abs=0.02)


# ---- the probe object --------------------------------------------------------------------------------


def test_unfitted_probe_refuses_to_predict():
    probe = PositionProbe(create_backbone("posenet"), patterns=["H"], feat_size=8, image_size=16, progress=False)
    with pytest.raises(PosprobeError, match="fit"):
        probe.predict(synthetic_images("noise", 16))


def test_probe_refuses_impossible_readout():
    with pytest.raises(PosprobeError, match="impossible readout"):
        PositionProbe(create_backbone("posenet"), feat_size=4, depth=3, progress=False)


def test_probe_trains_a_user_target_under_its_name(content_free_train_set):
    drawn = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    probe = PositionProbe(
        create_backbone("posenet"),
        patterns=["H"],
        feat_size=8,
        image_size=SIZE,
        train_config=get_profile("official", epochs=1),
        extra_targets={"mine": drawn},
        progress=False,
    ).fit(content_free_train_set)
    assert set(probe.readouts_) == {"H", "mine"}
    assert torch.equal(probe.targets["mine"], drawn)


def test_probe_refuses_a_user_target_of_the_wrong_size():
    with pytest.raises(PosprobeError, match="mine"):
        PositionProbe(create_backbone("posenet"), image_size=32, extra_targets={"mine": torch.rand(16, 16)})


def test_probe_refuses_no_targets():
    with pytest.raises(PosprobeError, match="no target"):
        PositionProbe(create_backbone("posenet"), patterns=[])


def test_probe_starts_every_target_from_the_same_seeded_readout():
    probe = PositionProbe(create_backbone("posenet"), patterns=["H", "V"], seed=4, progress=False)
    a, b = probe.new_readout(), probe.new_readout()
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))


def test_probe_score_agrees_with_metrics_on_its_predictions(content_free_train_set):
    probe = PositionProbe(
        create_backbone("posenet"),
        patterns=["H", "G"],
        padding=1,
        feat_size=12,
        image_size=SIZE,
        train_config=get_profile("official", epochs=2),
        progress=False,
    )
    probe.fit(content_free_train_set)
    test = synthetic_images("noise", SIZE, seed=5)
    preds, scores = probe.predict(test), probe.score(test)
    assert set(preds) == set(scores) == {"H", "G"}
    from scipy.stats import spearmanr

    for name in ("H", "G"):
        target = make_target(name, SIZE, SIZE)
        assert preds[name].shape == (1, SIZE, SIZE)
        expected = spearmanr(preds[name][0].flatten().double(), target.flatten().double()).statistic
        assert float(scores[name].spc[0]) == pytest.approx(expected, abs=1e-5)
        assert float(scores[name].mae[0]) == pytest.approx(float((preds[name][0] - target).abs().mean()), abs=1e-6)


def test_the_demo_profile_is_quick_with_half_its_updates():
    quick, demo = get_profile("quick"), get_profile("demo")
    assert (quick.steps, demo.steps) == (1000, 500)
    assert replace(demo, steps=quick.steps) == quick  # the same optimiser and widths, fewer updates
