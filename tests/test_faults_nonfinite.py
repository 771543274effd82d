"""Non-finite values never become scores: NaN/inf maps score NaN (as scipy), a checkpoint with NaN/inf is refused
at load, non-finite features stop the encoder at the first level, a diverging loss stops training with the update
and the advice to lower --lr, and a non-finite prediction is never scored. All with one line, exit 2 from the CLI.

Measured cost of the feature check (``registry.check_finite_levels``: one sum per level, one host sync per batch)
on 2 busy CPU cores, batches of 16 at 224: 40-50 ms per batch for ResNet-18, VGG16 and ResNet-152, 0.5-4% of the
forward pass (``isfinite().all()`` per level took 200-660 ms). The checkpoint check (``check_finite_state``) costs
35 ms for ResNet-152's 233 MB, against 290 ms for torch.load.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision

from conftest import one_line_error, run_cli, save_image
from posprobe.backbones import create_backbone
from posprobe.data import TensorImages
from posprobe.errors import PosprobeError
from posprobe.features.encode import encode
from posprobe.features.sources import StreamedSet
from posprobe.metrics import mae, spearman
from posprobe.readouts.joint import train_readouts
from posprobe.readouts.probe import PositionProbe
from posprobe.readouts.train import ReadoutJob, TrainConfig
from posprobe.targets import make_target

SIZE, FEAT = 32, 8


def images(n: int = 4, seed: int = 0, name: str = "noise") -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.rand(n, 3, SIZE, SIZE, generator=g), [f"im{i}" for i in range(n)], name)


def resnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


# ---- scores: against scipy -----------------------------------------------------------------------------


def test_spearman_and_mae_are_nan_for_a_map_with_nan_as_scipy():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 8, 8, generator=g)
    pred[1, 2, 3] = math.nan
    pred[3] = math.nan
    target = make_target("G", 8, 8)
    got_spc, got_mae = spearman(pred, target), mae(pred, target)
    for i in range(4):
        p, t = pred[i].flatten().double().numpy(), target.flatten().double().numpy()
        ref = scipy.stats.spearmanr(p, t).statistic
        if math.isnan(ref):  # scipy: NaN for a map with a NaN
            assert math.isnan(got_spc[i]) and math.isnan(got_mae[i]), i
        else:
            assert got_spc[i].item() == pytest.approx(ref, abs=1e-6)
            assert got_mae[i].item() == pytest.approx(np.abs(p - t).mean(), rel=1e-6)
    assert [math.isnan(v) for v in got_spc.tolist()] == [False, True, False, True]


def test_a_nan_target_gives_nan_as_scipy():
    pred = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(1))
    target = make_target("H", 6, 6).clone()
    target[0, 0] = math.nan
    assert math.isnan(scipy.stats.spearmanr(pred[0].flatten().numpy(), target.flatten().numpy()).statistic)
    assert torch.isnan(spearman(pred, target)).all() and torch.isnan(mae(pred, target)).all()


def test_a_map_with_inf_scores_nan_where_scipy_would_give_a_number():
    """scipy ranks an infinity last and returns a plausible SPC; a map that overflowed is no prediction here."""
    pred = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(2))
    pred[0, 1, 1] = math.inf
    target = make_target("V", 6, 6)
    ref = scipy.stats.spearmanr(pred[0].flatten().numpy(), target.flatten().numpy()).statistic
    assert -1 <= ref <= 1  # what would have been reported
    spc, err = spearman(pred, target), mae(pred, target)
    assert math.isnan(spc[0]) and math.isnan(err[0])
    assert spc[1].item() == pytest.approx(
        scipy.stats.spearmanr(pred[1].flatten().numpy(), target.flatten().numpy()).statistic, abs=1e-6
    )


# ---- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor,value", [("layer1.0.conv1.weight", math.nan), ("bn1.running_var", math.inf)])
def test_a_checkpoint_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path, tensor, value):
    state = resnet_state()
    state[tensor].view(-1)[3] = value
    state["layer4.1.conv2.weight"].view(-1)[0] = math.nan  # a later one: the first is named
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(PosprobeError, match=rf"bad\.pth .*'module\.{tensor}'") as err:
        create_backbone("resnet18", weights=str(path))
    assert "\n" not in str(err.value) and "layer4" not in str(err.value)


# ---- features ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """ResNet-18 whose layer2 overflows float32 (two BatchNorm scales of 1e38): layer1 finite, layer2 on NaN."""
    state = resnet_state()
    state["layer2.0.bn1.weight"] *= 1e38
    state["layer2.0.bn2.weight"] *= 1e38
    path = tmp_path_factory.mktemp("ckpt") / "overflow.pth"
    torch.save(state, path)
    return create_backbone("resnet18", weights=path)


def test_non_finite_features_stop_encoding_naming_the_level_and_images(overflowing):
    with pytest.raises(PosprobeError, match=r"resnet18 features are not finite at level 'layer2'") as err:
        encode(overflowing, images(4), FEAT, batch_size=2, progress=False)
    assert "im0, im1 of noise" in str(err.value) and "\n" not in str(err.value)


def test_the_cache_never_sees_a_non_finite_batch(overflowing, tmp_path):
    from posprobe.features.cache import FeatureCache

    cache = FeatureCache(tmp_path, log=lambda m: None)
    with pytest.raises(PosprobeError, match="level 'layer2'.*im0"):
        cache.encode(overflowing, images(4), FEAT, progress=False)
    assert all(not e.complete and e.rows_done == 0 for e in cache.entries())  # not one row written


def test_streamed_features_are_checked_too(overflowing):
    streamed = StreamedSet(overflowing, images(4), FEAT)
    job = ReadoutJob(
        "H",
        PositionProbe(overflowing, ["H"], feat_size=FEAT, image_size=SIZE).new_readout(),
        make_target("H", SIZE, SIZE),
    )
    with pytest.raises(PosprobeError, match="level 'layer2'"):
        train_readouts(streamed, [job], TrainConfig(steps=2, epochs=1, batch_size=2), progress=False)


def test_a_monkeypatched_level_with_inf_is_named(monkeypatch):
    """A backbone whose second level overflows (monkeypatched): the first non-finite level is the one named."""
    backbone = create_backbone("resnet18", weights="random")
    forward = backbone.extractor.forward

    def overflow(x):
        levels = list(forward(x))
        levels[1] = levels[1].clone()
        levels[1][1, 0, 0, 0] = math.inf
        levels[2] = levels[2] * math.nan
        return levels

    monkeypatch.setattr(backbone.extractor, "forward", overflow)
    with pytest.raises(PosprobeError, match=r"level 'layer2' \(inf\) for image\(s\) im1 of noise"):
        encode(backbone, images(2), FEAT, progress=False)


def test_input_images_with_inf_are_named():
    bad = images(3)
    bad.images[2, :, 3, 3] = math.inf
    with pytest.raises(PosprobeError, match=r"input images are not finite \(inf\) for image\(s\) im2 of noise"):
        encode(create_backbone("posenet"), bad, FEAT, progress=False)


# ---- training and prediction --------------------------------------------------------------------------------


def posenet_probe(**config) -> PositionProbe:
    train = TrainConfig(**{"steps": 20, "epochs": 1, "batch_size": 4, **config})
    return PositionProbe(
        create_backbone("posenet"), ["H", "G"], feat_size=FEAT, image_size=SIZE, train_config=train, progress=False
    )


def test_a_diverging_loss_stops_training_with_the_update_and_lower_lr_advice():
    with pytest.raises(PosprobeError) as err:
        posenet_probe(lr=1e30).fit(images(8))
    line = str(err.value)
    assert line.startswith("readout H diverged: its training loss became ") and "\n" not in line
    update = int(line.split(" at update ")[1].split(" of ")[0])
    assert 1 <= update <= 5 and " of 20" in line  # stopped at once, not after 20 updates
    assert "lower the learning rate (--lr, now 1e+30)" in line


def test_a_diverged_readout_is_never_scored():
    probe = posenet_probe().fit(images(8))
    with torch.no_grad():
        probe.readouts_["G"].head[0].weight.fill_(math.nan)
    with pytest.raises(PosprobeError, match=r"readout G predicts non-finite maps for 2 of 2 image\(s\) \(first: im0\)"):
        probe.score(images(2, seed=1))


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        save_image(tmp_path / "train" / f"t{i}.png", rng.integers(0, 256, (40, 40, 3)))
    for i in range(2):
        save_image(tmp_path / "test" / f"s{i}.png", rng.integers(0, 256, (40, 40, 3)))
    return [
        "--train",
        str(tmp_path / "train"),
        "--test",
        str(tmp_path / "test"),
        "--synthetic",
        "none",
        "--image-size",
        str(SIZE),
        "--feat-size",
        str(FEAT),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--quiet",
        "--pattern",
        "H",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]


def test_cli_lr_1e30_exits_2_with_the_update_and_advice(folders, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(
        ["probe", "--backbone", "posenet", "--lr", "1e30", *folders, "--out", str(tmp_path / "o")], capsys, monkeypatch
    )
    line = one_line_error(code, err)
    assert "readout H diverged" in line and "at update" in line and "lower the learning rate (--lr" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lr", ["0", "-1", "nan", "inf"])
def test_cli_lr_must_be_finite_and_positive(folders, tmp_path, capsys, monkeypatch, lr):
    code, _, err = run_cli(
        ["probe", "--backbone", "posenet", "--lr", lr, *folders, "--out", str(tmp_path / "o")], capsys, monkeypatch
    )
    assert f"--lr must be a finite number > 0; given {float(lr)}" in one_line_error(code, err)


def test_cli_refuses_a_nan_checkpoint(folders, tmp_path, capsys, monkeypatch):
    state = resnet_state()
    state["layer3.1.bn2.bias"][5] = math.nan
    torch.save(state, tmp_path / "nan.pth")
    code, _, err = run_cli(
        [
            "probe",
            "--backbone",
            "resnet18",
            "--weights",
            str(tmp_path / "nan.pth"),
            *folders,
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        monkeypatch,
    )
    assert "'layer3.1.bn2.bias'" in one_line_error(code, err)


def test_cli_non_finite_features_exit_2_naming_the_level(folders, overflowing, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(
        ["probe", "--backbone", "resnet18", "--weights", overflowing.weights, *folders, "--out", str(tmp_path / "o")],
        capsys,
        monkeypatch,
    )
    line = one_line_error(code, err)
    assert "features are not finite at level 'layer2'" in line and "s0.png" in line
