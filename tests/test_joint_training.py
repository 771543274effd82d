"""The joint training engine: fused readouts, native-size levels and the small-map loss are exact rewrites.

test_training.py covers joint == alone for readouts of different shapes; here every readout of a Table 1
column shares one fused convolution, and the features carry upsampled levels kept at native size.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from posprobe.features.encode import EncodedSet
from posprobe.features.parts import FeatureBatch, Part, PartPlan, align
from posprobe.features.sources import as_source
from posprobe.readouts.joint import MapLoss, conv_parts, predict_source, train_readouts
from posprobe.readouts.pem import Readout
from posprobe.readouts.train import ReadoutJob, TrainConfig
from posprobe.targets import PATTERNS, make_target

FEAT, OUT = 10, 20
LEVELS = ((4, 16, 16), (3, 10, 10), (5, 4, 4), (6, 2, 2))  # down-, same-, up- and far-upsampled


def leveled_features(n: int = 24, seed: int = 0) -> EncodedSet:
    """Features made the way encode() makes them, from levels with a position signal."""
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(n, c, h, w, generator=g) for c, h, w in LEVELS]
    ramp = torch.linspace(-1, 1, 16)
    levels[0][:, 0] += 2 * ramp[None, None, :]
    levels[0][:, 1] += 2 * ramp[None, :, None]
    return EncodedSet.from_levels("x", levels, FEAT, [str(i) for i in range(n)])


def test_the_parts_are_the_aligned_features():
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(3, c, h, w, generator=g) for c, h, w in LEVELS]
    enc = EncodedSet.from_levels("x", levels, FEAT, ["a", "b", "c"])
    assert [p.plan() for p in enc.parts] == [PartPlan(0, 7, None), PartPlan(7, 12, (4, 4)), PartPlan(12, 18, (2, 2))]
    torch.testing.assert_close(enc.features, align(levels, FEAT), rtol=1e-6, atol=1e-6)


CHANNELS = sum(c for c, _, _ in LEVELS)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 8, **kw})  # the lr decays after epoch 2


def seeded(seed: int, kernel: int = 3, padding: int = 0, in_channels: int = CHANNELS) -> Readout:
    torch.manual_seed(seed)
    return Readout(in_channels, kernel, 1, padding, FEAT, OUT)


def reference_train(
    features: torch.Tensor, readout: Readout, target: torch.Tensor, cfg: TrainConfig, channels=None
) -> list[float]:
    """The authors' loop, written out: full-resolution upsampling and F.mse_loss, one readout at a time, the
    lr decayed once per epoch at the epoch the config names; returns the loss of every update."""
    opt = torch.optim.SGD(readout.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    decay_epochs = [round(f * cfg.epochs) for f in cfg.decay_at]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, decay_epochs, cfg.lr_gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    readout.train()
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(len(features), generator=gen)
        for start in range(0, len(features), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = features[idx].float()
            pred = readout.forward_aligned(x if channels is None else x[:, channels])[:, 0]
            loss = F.mse_loss(pred, target.expand_as(pred))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
    return losses


def test_small_map_loss_is_the_full_resolution_mse():
    g = torch.Generator().manual_seed(0)
    for s, big in ((8, 20), (26, 224), (5, 5)):
        m = torch.rand(3, s, s, generator=g, dtype=torch.float64)
        target = torch.rand(big, big, generator=g, dtype=torch.float64)
        up = F.interpolate(m[:, None], size=(big, big), mode="bilinear", align_corners=False)[:, 0]
        expected = ((up - target) ** 2).mean((1, 2))
        torch.testing.assert_close(MapLoss(target, (s, s)).per_image(m), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("outputs", [4, 20])  # the 1x1 form on every part; F.conv2d on aligned parts above 16
@pytest.mark.parametrize("kernel,padding", [(3, 0), (1, 0), (3, 1), (5, 2)])
def test_native_size_convolution_equals_the_convolution_of_aligned_features(kernel, padding, outputs):
    enc = leveled_features(6)
    _, batch = next(as_source(enc).batches(torch.arange(6), 6))
    assert [p.native for p in batch.parts] == [False, True, True]  # levels 1-2 merged, 3 and 4 native
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(outputs, CHANNELS, kernel, kernel, generator=g), torch.randn(outputs, generator=g)
    expected = F.conv2d(enc.features.float(), w, b, padding=padding)
    torch.testing.assert_close(conv_parts(batch, w, b, padding), expected, rtol=1e-4, atol=1e-4)


def test_the_convolution_reads_stored_float16_parts_with_their_scale():
    enc = leveled_features(4)
    scales = [2.0**-3, 2.0**5, 1.0]
    stored = FeatureBatch([Part(p.lo, p.hi, (p.data / s).half(), p.native, s) for p, s in zip(enc.parts, scales)], FEAT)
    w = torch.randn(5, CHANNELS, 3, 3, generator=torch.Generator().manual_seed(2))
    expected = F.conv2d(stored.aligned(), w)
    torch.testing.assert_close(conv_parts(stored, w, None, 0), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(expected, F.conv2d(enc.features, w), rtol=1e-2, atol=2e-2)  # float16 rounding only


def _perturbed(enc: EncodedSet, seed: int) -> EncodedSet:
    """The same features with every value moved by a few float32 roundings (relative 4 x 2^-24)."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        Part(p.lo, p.hi, p.data * (1 + 4 * 2.0**-24 * torch.randn(p.data.shape, generator=g)), p.native)
        for p in enc.parts
    ]
    return EncodedSet(enc.name, parts, enc.feat_size, enc.ids, enc.skipped)


def test_a_fused_table1_column_equals_each_readout_trained_alone_up_to_rounding():
    """Fusing five readouts' first convolutions into one sums in another order (and, by CPU, with another
    oneDNN kernel), so the result equals training alone only up to float rounding. The tolerance is measured,
    not guessed: how far the same training moves when its inputs change by a few roundings."""
    enc = leveled_features()
    initial = {p: seeded(i) for i, p in enumerate(PATTERNS)}
    joint = [ReadoutJob(p, copy.deepcopy(r), make_target(p, OUT, OUT)) for p, r in initial.items()]
    train_readouts(enc, joint, config(), progress=False)
    for job in joint:
        alone, nudged = (
            ReadoutJob(job.key, copy.deepcopy(initial[job.key]), make_target(job.key, OUT, OUT)) for _ in range(2)
        )
        train_readouts(enc, [alone], config(), progress=False)
        train_readouts(_perturbed(enc, 1), [nudged], config(), progress=False)
        for k, v in job.readout.state_dict().items():
            ref = alone.readout.state_dict()[k]
            if not v.is_floating_point():
                assert torch.equal(v, ref), (job.key, k)  # batch counts
                continue
            rounding = (nudged.readout.state_dict()[k] - ref).abs().max().item()
            assert (v - ref).abs().max().item() <= 10 * rounding + 1e-6 * ref.abs().max().item(), (job.key, k)
        assert job.losses == pytest.approx(alone.losses, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kernel,padding", [(3, 0), (3, 2)])
def test_the_engine_matches_the_authors_loop(kernel, padding):
    """Fusion, native-size levels and the small-map loss change rounding only."""
    enc = leveled_features()
    r = seeded(3, kernel, padding)
    ref = copy.deepcopy(r)
    job = ReadoutJob("G", r, make_target("G", OUT, OUT))
    train_readouts(
        enc, [job, ReadoutJob("H", seeded(4, kernel, padding), make_target("H", OUT, OUT))], config(), progress=False
    )
    losses = reference_train(enc.features, ref, make_target("G", OUT, OUT), config())
    assert job.losses == pytest.approx(losses, rel=1e-4)
    for a, b in zip(job.readout.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_a_level_subset_on_native_levels_matches_the_authors_loop():
    """Table 3's one-level readouts: the job reads channels of an upsampled level only."""
    enc = leveled_features()
    channels = torch.arange(7, 12)  # the third level (5 channels, native 4x4)
    r = seeded(5, in_channels=5)
    ref = copy.deepcopy(r)
    job = ReadoutJob("V", r, make_target("V", OUT, OUT), channels=channels)
    train_readouts(enc, [job, ReadoutJob("V", seeded(6), make_target("V", OUT, OUT))], config(), progress=False)
    losses = reference_train(enc.features, ref, make_target("V", OUT, OUT), config(), channels=channels)
    assert job.losses == pytest.approx(losses, rel=1e-4)
    for a, b in zip(job.readout.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_float16_features_train_like_their_float32_values():
    enc = leveled_features()
    scales = [1.0, 4.0, 0.5]  # stored values x scale, as the cache keeps float16 parts
    half = EncodedSet(
        "h", [Part(p.lo, p.hi, (p.data / s).half(), p.native, s) for p, s in zip(enc.parts, scales)], FEAT, enc.ids, []
    )
    rounded = EncodedSet(
        "r",
        [
            Part(p.lo, p.hi, ((p.data / s).half().float() * s).contiguous(memory_format=torch.channels_last), p.native)
            for p, s in zip(enc.parts, scales)
        ],
        FEAT,
        enc.ids,
        [],
    )
    a, b = seeded(7), seeded(7)
    job_a, job_b = ReadoutJob("H", a, make_target("H", OUT, OUT)), ReadoutJob("H", b, make_target("H", OUT, OUT))
    train_readouts(half, [job_a], config(), progress=False)
    train_readouts(rounded, [job_b], config(), progress=False)
    # exact on any CPU: both runs feed the same float32 values through the same shapes, hence the same kernels
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_prediction_of_fused_readouts_equals_each_readouts_own_forward():
    """predict_source runs a Table 1 column's first convolutions as one, at native size; each map must be the
    readout's own forward_aligned on the aligned features (BatchNorm in eval mode with trained statistics)."""
    enc = leveled_features(7)
    readouts = {p: seeded(i, padding=1) for i, p in enumerate(PATTERNS)}
    for r in readouts.values():
        r.head[1].running_mean.fill_(0.3)
        r.head[1].running_var.fill_(2.0)
    readouts["subset"] = seeded(9, in_channels=5)
    got = predict_source(readouts, enc, batch_size=3, channels={"subset": torch.arange(7, 12)})
    x = enc.features
    for key, r in readouts.items():
        inputs = x[:, 7:12] if key == "subset" else x
        torch.testing.assert_close(got[key], r.eval().forward_aligned(inputs)[:, 0], rtol=1e-4, atol=1e-5)
