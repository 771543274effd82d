"""The CUDA path gives the CPU's numbers: encoding, the feature cache, joint training and scoring.

Skipped where no GPU is present (CI); run on a GPU machine with ``pytest tests/test_cuda.py``. Tolerances
allow for TF32 convolutions and a different reduction order, not for a different computation.
"""

from __future__ import annotations

import pytest
import torch

from posprobe.backbones import create_backbone
from posprobe.data import TensorImages, synthetic_images
from posprobe.features.cache import FeatureCache
from posprobe.features.encode import encode
from posprobe.metrics import spearman
from posprobe.readouts.joint import predict_source, train_readouts
from posprobe.readouts.pem import Readout
from posprobe.readouts.probe import PositionProbe
from posprobe.readouts.train import ReadoutJob, TrainConfig
from posprobe.targets import make_target


def predict(readout, features, batch_size: int = 64, device="cpu", channels=None) -> torch.Tensor:
    """(N, S, S) maps of one eval-mode readout (joint.predict_source, for a single readout)."""
    return predict_source({"map": readout}, features, batch_size, device, {"map": channels})["map"]


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIZE, FEAT = 64, 12


def _images(n: int, seed: int) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.rand(n, 3, SIZE, SIZE, generator=g), [f"i{i}" for i in range(n)], f"rand{seed}")


@pytest.mark.parametrize("name", ["vgg16", "tv:resnet18"])
def test_encoding_on_cuda_matches_cpu(name):
    backbone = create_backbone(name, "random", seed=0)
    images = _images(4, 0)
    cpu = encode(backbone, images, FEAT, device="cpu", progress=False).features
    gpu = encode(backbone, images, FEAT, device="cuda", progress=False).features
    assert gpu.device.type == "cpu"  # encoded sets live in host memory whatever the device
    scale = cpu.abs().amax()
    torch.testing.assert_close(gpu.float(), cpu.float(), rtol=0, atol=2e-3 * float(scale))


def test_cache_entry_made_on_cuda_equals_one_made_on_cpu(tmp_path):
    backbone = create_backbone("vgg16", "random", seed=0)
    images = _images(5, 1)
    cpu = FeatureCache(tmp_path / "cpu", log=None).encode(backbone, images, FEAT, device="cpu", progress=False)
    gpu = FeatureCache(tmp_path / "gpu", log=None).encode(backbone, images, FEAT, device="cuda", progress=False)
    assert gpu.ids == cpu.ids and gpu.features.dtype == cpu.features.dtype
    scale = cpu.features.float().abs().amax()
    torch.testing.assert_close(gpu.features.float(), cpu.features.float(), rtol=0, atol=2e-3 * float(scale))


@pytest.mark.parametrize("depth,padding", [(1, 0), (1, 2), (2, 1)])
def test_joint_training_on_cuda_follows_the_cpu_run(depth, padding):
    """Same seeds, same batches: the readouts end where the CPU's end, and predict the same maps."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(24, 6, FEAT, FEAT, generator=g)
    feats[:, 0] += torch.linspace(-2, 2, FEAT)  # a learnable horizontal signal
    config = TrainConfig(epochs=3, batch_size=8)
    runs = {}
    for device in ("cpu", "cuda"):
        jobs = []
        for p in ("H", "G"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                readout = Readout(6, 3, depth, padding, FEAT, SIZE, width=4 if depth > 1 else None)
            jobs.append(ReadoutJob(p, readout, make_target(p, SIZE, SIZE)))
        train_readouts(feats, jobs, config, device=device, progress=False)
        runs[device] = jobs
    for cpu_job, gpu_job in zip(runs["cpu"], runs["cuda"]):
        assert gpu_job.losses == pytest.approx(cpu_job.losses, rel=1e-3, abs=1e-5)
        for a, b in zip(cpu_job.readout.parameters(), gpu_job.readout.parameters()):
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-3, atol=1e-4)
        cpu_pred = predict(cpu_job.readout, feats, device="cpu")
        gpu_pred = predict(gpu_job.readout, feats, device="cuda")
        torch.testing.assert_close(gpu_pred, cpu_pred, rtol=1e-3, atol=1e-4)


def test_posenet_probe_scores_on_cuda_match_cpu():
    """The paper's control end to end: PosENet with readout padding 1 reads position from content-free inputs."""
    train = _images(16, 2)
    scores = {}
    for device in ("cpu", "cuda"):
        probe = PositionProbe(
            create_backbone("posenet"),
            ["H", "G"],
            padding=1,
            feat_size=FEAT,
            image_size=SIZE,
            train_config=TrainConfig(epochs=3, batch_size=8),
            device=device,
            progress=False,
        ).fit(train)
        scores[device] = probe.score(synthetic_images("noise", SIZE))
    for p in ("H", "G"):
        assert float(scores["cuda"][p].spc.mean()) == pytest.approx(float(scores["cpu"][p].spc.mean()), abs=0.02)


def test_spearman_on_cuda_tensors_matches_cpu():
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(3, SIZE, SIZE, generator=g)
    target = make_target("G", SIZE, SIZE)
    torch.testing.assert_close(spearman(pred.cuda(), target).cpu(), spearman(pred, target), rtol=1e-5, atol=1e-6)


def test_a_cached_training_set_that_fits_is_resident_on_the_gpu_and_trains_as_on_the_cpu(tmp_path):
    """The resident path: the cache entry's float32 working copy is made once in GPU memory, batches are gathered
    there, and the readouts end where the CPU's end."""
    from posprobe.features.sources import MemorySource

    backbone = create_backbone("vgg16", "random", seed=0)
    entry = FeatureCache(tmp_path, log=None).encode(backbone, _images(12, 4), FEAT, device="cpu", progress=False)
    source = MemorySource(entry)
    whole = source._whole_parts(torch.device("cuda"))
    assert whole is not None and all(p.data.device.type == "cuda" for p in whole)
    runs = {}
    for device in ("cpu", "cuda"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            readout = Readout(backbone.channels, 3, 1, 0, FEAT, SIZE)
        job = ReadoutJob("H", readout, make_target("H", SIZE, SIZE))
        train_readouts(MemorySource(entry), [job], TrainConfig(steps=6, epochs=1, batch_size=4), device, False)
        runs[device] = job
    assert runs["cuda"].losses == pytest.approx(runs["cpu"].losses, rel=2e-3, abs=1e-5)


def test_jpeg_folders_decode_through_pinned_batches_and_encode_as_on_the_cpu(tmp_path):
    """The decode path: JPEG files decoded in loader workers, pinned, copied and encoded on the GPU give the
    CPU's features."""
    from posprobe.data import FolderImages
    from posprobe.studies.bench_dataset import write_synthetic_dataset

    train_dir, _ = write_synthetic_dataset(tmp_path, 20, 1, progress=False)
    images = FolderImages(train_dir, SIZE)
    backbone = create_backbone("vgg16", "random", seed=0)
    cpu = encode(backbone, images, FEAT, device="cpu", num_workers=1, progress=False)
    gpu = encode(backbone, images, FEAT, device="cuda", num_workers=1, progress=False)
    assert gpu.ids == cpu.ids == images.ids
    scale = cpu.features.abs().amax()
    torch.testing.assert_close(gpu.features.float(), cpu.features.float(), rtol=0, atol=2e-3 * float(scale))
