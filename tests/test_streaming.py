"""Streaming: features recomputed from the images on every pass, in memory that does not grow with N."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from conftest import save_image
from posprobe.backbones import Backbone, BackboneSpec, Level, create_backbone
from posprobe.data import FolderImages, TensorImages
from posprobe.errors import PosprobeError
from posprobe.features.cache import FeatureCache
from posprobe.features.encode import encode
from posprobe.features.sources import StreamedSet
from posprobe.readouts.joint import predict_source, train_readouts
from posprobe.readouts.pem import Readout
from posprobe.readouts.probe import PositionProbe
from posprobe.readouts.train import ReadoutJob, TrainConfig
from posprobe.studies.bench import reset_peak_rss
from posprobe.targets import make_target

SIZE, FEAT = 32, 12


def noise_set(n: int, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.rand(n, 3, SIZE, SIZE, generator=g), [f"im{i}" for i in range(n)], "noise")


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("resnet18", "random", seed=0)


def test_streamed_training_and_scoring_equal_the_in_memory_ones(resnet, tmp_path):
    images = noise_set(12)
    enc = encode(resnet, images, FEAT, progress=False)
    stream = StreamedSet(resnet, images, FEAT, num_workers=0)
    assert len(stream) == 12 and stream.ids == enc.ids and stream.channels == enc.channels
    assert [p.plan() for p in stream.encoded(3).parts] == [p.plan() for p in enc.parts]
    cfg = TrainConfig(epochs=2, batch_size=5, decay_at=(0.5,))
    torch.manual_seed(0)
    initial = Readout(resnet.channels, 3, 1, 0, FEAT, SIZE)
    in_memory = [ReadoutJob(p, copy.deepcopy(initial), make_target(p, SIZE, SIZE)) for p in ("H", "G")]
    streamed = [ReadoutJob(p, copy.deepcopy(initial), make_target(p, SIZE, SIZE)) for p in ("H", "G")]
    train_readouts(enc, in_memory, cfg, progress=False)
    train_readouts(stream, streamed, cfg, progress=False)
    for a, b in zip(in_memory, streamed):
        assert a.losses == pytest.approx(b.losses, rel=1e-4)
        for x, y in zip(a.readout.parameters(), b.readout.parameters()):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
    readouts = {j.key: j.readout for j in in_memory}
    torch.testing.assert_close(
        predict_source(readouts, stream, batch_size=5)["G"], predict_source(readouts, enc)["G"], rtol=1e-4, atol=1e-5
    )
    # the probe streams when the cache refuses the set, and scores the same way
    probe = PositionProbe(
        resnet,
        ["H"],
        feat_size=FEAT,
        image_size=SIZE,
        train_config=cfg,
        progress=False,
        cache=FeatureCache(tmp_path, max_gb=0, log=None),
    )
    assert isinstance(probe.encode(images), StreamedSet)
    scores = probe.fit(images).score(images)["H"]
    ref = PositionProbe(resnet, ["H"], feat_size=FEAT, image_size=SIZE, train_config=cfg, progress=False)
    torch.testing.assert_close(scores.spc, ref.fit(enc).score(enc)["H"].spc, rtol=1e-3, atol=1e-3)


def test_streaming_finds_unreadable_files_once(tmp_path, rng, resnet):
    for i in range(5):
        save_image(tmp_path / f"{i}.png", rng.integers(0, 256, (20, 20, 3)))
    (tmp_path / "3.png").write_bytes(b"broken")
    stream = StreamedSet(resnet, FolderImages(tmp_path, SIZE), FEAT, num_workers=0)
    assert stream.skipped == ["3.png"] and stream.ids == ["0.png", "1.png", "2.png", "4.png"]
    assert sum(len(b) for _, b in stream.batches(torch.arange(4), 3)) == 4
    with pytest.raises(PosprobeError, match="strict"):
        StreamedSet(resnet, FolderImages(tmp_path, SIZE), FEAT, strict=True, num_workers=0)


class _LazyNoise(Dataset):
    """n noise images made on demand: the image set itself holds no memory."""

    def __init__(self, n: int):
        self.n, self.name, self.ids = n, "lazy", [str(i) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(i))


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 256, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.conv(x))]


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def test_streaming_memory_does_not_grow_with_the_number_of_images():
    """512 images of 256 x 28 x 28 float32 features would take 411 MB; streaming them takes a batch's worth."""
    if not reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    spec = BackboneSpec(
        "wide-test",
        "one 3x3 conv to 256 channels",
        (Level("conv", 256, 1),),
        build=lambda w, s: _Wide(),
        weight_names=("random",),
        default_weights="random",
    )
    torch.manual_seed(0)
    backbone = Backbone(spec, _Wide(), "random")
    cfg = TrainConfig(epochs=1, batch_size=16)
    growth, base = {}, None
    for n in (16, 512, 32):  # a first run takes the one-time allocations (kernels, allocator pools)
        stream = StreamedSet(backbone, _LazyNoise(n), 28, num_workers=0)
        job = ReadoutJob("H", Readout(256, 3, 1, 0, 28, 28), make_target("H", 28, 28))
        reset_peak_rss()
        # one baseline for the measured runs, taken after the warm-up: memory the allocator keeps from one run
        # to the next then counts for every n alike, instead of hiding in the later run's own baseline
        base = _rss_kb("VmRSS") if base is None or n == 512 else base
        train_readouts(stream, [job], cfg, progress=False)
        growth[n] = (_rss_kb("VmHWM") - base) / 1024  # MB
    assert growth[512] < 100, growth  # the features alone would be 411 MB
    assert growth[512] < growth[32] + 25, growth
