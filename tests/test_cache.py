"""The feature cache: content keys, atomic entries, resume after an interruption, streaming fallback, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import save_image
from posprobe.backbones import create_backbone
from posprobe.cli import app
from posprobe.data import FolderImages, TensorImages
from posprobe.errors import PosprobeError
from posprobe.features import cache as cache_mod
from posprobe.features.cache import FeatureCache, feature_key
from posprobe.features.encode import EncodedSet, encode
from posprobe.features.sources import MemorySource, StreamedSet

SIZE, FEAT = 32, 12


def noise_images(n: int = 6, seed: int = 0, name: str = "noise") -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.rand(n, 3, SIZE, SIZE, generator=g), [f"im{i}" for i in range(n)], name)


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("resnet18", "random", seed=0)


def quiet_cache(root, **kw) -> tuple[FeatureCache, list[str]]:
    messages: list[str] = []
    return FeatureCache(root, log=messages.append, **kw), messages


# ---- keys --------------------------------------------------------------------------------------------


def test_key_changes_with_every_setting_and_with_the_images(resnet):
    images = noise_images()
    base = feature_key(resnet, images, FEAT)[0]
    assert feature_key(resnet, images, FEAT)[0] == base  # deterministic
    changed = images.images.clone()
    changed[2, 1, 5, 7] += 1e-3  # one value of one image
    variants = {
        "feat size": feature_key(resnet, images, FEAT + 2),
        "image bytes": feature_key(resnet, TensorImages(changed, images.ids, "noise"), FEAT),
        "image size": feature_key(
            resnet, TensorImages(images.images[..., :30, :30].contiguous(), images.ids, "n"), FEAT
        ),
        "ids": feature_key(resnet, TensorImages(images.images, [f"x{i}" for i in range(6)], "noise"), FEAT),
        "weights seed": feature_key(create_backbone("resnet18", "random", seed=1), images, FEAT),
        "input norm": feature_key(create_backbone("resnet18", "random", seed=0, input_norm="imagenet"), images, FEAT),
        "backbone": feature_key(create_backbone("resnet34", "random", seed=0), images, FEAT),
    }
    for what, keyed in variants.items():
        assert keyed[0] != base, what
    # the set's name is not content: renaming it keeps the key
    assert feature_key(resnet, TensorImages(images.images, images.ids, "other name"), FEAT)[0] == base


def test_key_follows_the_bytes_of_image_files(tmp_path, rng):
    for i in range(3):
        save_image(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (20, 20, 3)))
    backbone = create_backbone("posenet")
    before = feature_key(backbone, FolderImages(tmp_path / "imgs", SIZE), FEAT)[0]
    path = tmp_path / "imgs" / "1.png"
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(path)).copy()
    arr[0, 0, 0] ^= 1  # one bit of one pixel
    save_image(path, arr)
    assert feature_key(backbone, FolderImages(tmp_path / "imgs", SIZE), FEAT)[0] != before


def test_a_checkpoint_is_keyed_by_its_content(tmp_path, resnet):
    ckpt = tmp_path / "w.pt"
    torch.save(resnet.extractor.state_dict(), ckpt)
    images = noise_images()
    from posprobe.features.cache import weights_digest

    # same weights loaded another way (a random backbone vs the same tensors from a file) hash alike
    state = {k: v.clone() for k, v in resnet.extractor.state_dict().items()}
    other = create_backbone("resnet18", "random", seed=5)
    assert weights_digest(other) != weights_digest(resnet)
    other.extractor.load_state_dict(state)
    other.__dict__.pop("_posprobe_weights_digest", None)  # digest is memoised per object
    assert weights_digest(other) == weights_digest(resnet)
    assert feature_key(other, images, FEAT)[0] == feature_key(resnet, images, FEAT)[0]


# ---- entries -----------------------------------------------------------------------------------------


def test_cached_features_are_the_encoders_in_float16_and_hit_the_second_time(tmp_path, resnet):
    images = noise_images()
    cache, log = quiet_cache(tmp_path)
    first = cache.encode(resnet, images, FEAT, batch_size=4, progress=False)
    assert isinstance(first, EncodedSet) and all(p.data.dtype == torch.float16 for p in first.parts)
    assert any("GB" in m for m in log)  # the expected size is announced before extracting
    ref = encode(resnet, images, FEAT, batch_size=4, progress=False)
    assert first.features.shape == ref.features.shape and first.ids == ref.ids
    torch.testing.assert_close(first.features, ref.features.half().float(), atol=1e-3, rtol=1e-3)
    assert [p.plan() for p in first.parts] == [p.plan() for p in ref.parts]
    log.clear()
    again = cache.encode(resnet, images, FEAT, progress=False)
    assert any("hit" in m for m in log)
    assert torch.equal(again.features, first.features)


def test_an_entry_keeps_upsampled_levels_at_native_size(tmp_path, resnet):
    """ResNet-18 at 32 px: all four levels (8x8 .. 1x1) are upsampled to 12x12, so they are stored as they
    are: the file is the levels' size, not the aligned size."""
    images = noise_images()
    cache, _ = quiet_cache(tmp_path)
    got = cache.encode(resnet, images, FEAT, progress=False)
    assert [(p.lo, p.hi, tuple(p.data.shape[1:]), p.native) for p in got.parts] == [
        (0, 64, (64, 8, 8), True),
        (64, 192, (128, 4, 4), True),
        (192, 448, (256, 2, 2), True),
        (448, 960, (512, 1, 1), True),
    ]
    on_disk = (tmp_path / feature_key(resnet, images, FEAT)[0] / "features.bin").stat().st_size
    assert on_disk == 6 * 2 * (64 * 64 + 128 * 16 + 256 * 4 + 512) < 6 * 2 * 960 * FEAT * FEAT
    assert on_disk == cache.expected_bytes(cache.layout(resnet, SIZE, FEAT), 6, FEAT)


def test_an_entry_without_manifest_is_never_used(tmp_path, resnet):
    images = noise_images()
    cache, _ = quiet_cache(tmp_path)
    cache.encode(resnet, images, FEAT, progress=False)
    key = feature_key(resnet, images, FEAT)[0]
    (tmp_path / key / "manifest.json").unlink()  # as if killed between the data and the manifest
    assert cache.load(key) is None
    assert [e.complete for e in cache.entries()] == [False]
    again = cache.encode(resnet, images, FEAT, progress=False)  # re-extracted, not trusted
    assert again.features.shape[0] == 6 and cache.entries()[0].complete


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path, resnet, monkeypatch):
    images = noise_images(10)
    cache, log = quiet_cache(tmp_path)
    real = cache_mod.encode_batches
    starts = []

    def interrupted(*args, **kw):
        starts.append(args[6] if len(args) > 6 else kw.get("start", 0))
        for i, item in enumerate(real(*args, **kw)):
            if i == 2:
                raise KeyboardInterrupt  # killed mid-run, after two batches were written
            yield item

    monkeypatch.setattr(cache_mod, "encode_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.encode(resnet, images, FEAT, batch_size=3, progress=False)
    key = feature_key(resnet, images, FEAT)[0]
    assert cache.load(key) is None
    progress = json.loads((tmp_path / key / "progress.json").read_text())
    assert progress["done"] == 6
    monkeypatch.setattr(cache_mod, "encode_batches", real)
    resumed = cache.encode(resnet, images, FEAT, batch_size=3, progress=False)
    assert any("resuming" in m and "image 6" in m for m in log)
    fresh = FeatureCache(tmp_path / "fresh", log=None).encode(resnet, images, FEAT, batch_size=3, progress=False)
    assert torch.equal(resumed.features, fresh.features)
    assert not (tmp_path / key / "progress.json").exists()


def test_unreadable_images_are_skipped_and_remembered(tmp_path, rng):
    for i in range(4):
        save_image(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (20, 20, 3)))
    (tmp_path / "imgs" / "2.png").write_bytes(b"not a png")
    cache, _ = quiet_cache(tmp_path / "c")
    backbone = create_backbone("posenet")
    with pytest.warns(UserWarning, match="skipped 1"):
        enc = cache.encode(
            backbone, FolderImages(tmp_path / "imgs", SIZE), FEAT, batch_size=2, num_workers=0, progress=False
        )
    assert enc.ids == ["0.png", "1.png", "3.png"] and enc.skipped == ["2.png"] and len(enc) == 3
    with pytest.raises(PosprobeError, match="strict"):
        cache.encode(backbone, FolderImages(tmp_path / "imgs", SIZE), FEAT, strict=True, progress=False)


def test_values_beyond_float16_are_stored_scaled_by_a_power_of_two_not_as_inf(tmp_path):
    """A randomly initialised ResNet-152 reaches 2e8; float16 would make that inf."""
    huge = TensorImages(torch.linspace(0, 1, 2 * 3 * SIZE * SIZE).view(2, 3, SIZE, SIZE) * 1e7, ["a", "b"], "huge")
    cache, _ = quiet_cache(tmp_path)
    backbone = create_backbone("posenet")
    got = cache.encode(backbone, huge, FEAT, progress=False)
    ref = encode(backbone, huge, FEAT, progress=False).features
    peak = float(ref.abs().max())
    assert peak > 1e6  # far beyond float16's 65504
    manifest = cache.entries()[0].manifest
    (scale,) = [p["scale"] for p in manifest["parts"]]
    assert manifest["dtype"] == "float16" and got.parts[0].data.dtype == torch.float16 and got.parts[0].scale == scale
    assert math.log2(scale).is_integer() and peak / scale * 16 <= 65504 < peak / scale * 32  # the smallest such
    assert bool(torch.isfinite(got.features).all())
    # a power of two moves only the exponent: float16's relative precision (2^-11) everywhere above its normal
    # range's floor (6.1e-5 x the scale)
    big = ref.abs() > 6.2e-5 * scale
    torch.testing.assert_close(got.features[big], ref[big], rtol=2.0**-11, atol=0)


def test_batches_read_from_the_entry_equal_the_working_copys(tmp_path, resnet):
    """A cache entry too large for the working copy is read batch by batch (float16 rows gathered, then widened):
    the same float32 values as from the working copy, for native and aligned parts and a scaled part; a part not
    stored channels_last takes the plain path."""
    cache, _ = quiet_cache(tmp_path)
    huge = TensorImages(
        torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 1e7, list("abcde"), "h"
    )
    for backbone, images in ((resnet, noise_images(7)), (create_backbone("posenet"), huge)):
        entry = cache.encode(backbone, images, FEAT, progress=False)
        order = torch.tensor([4, 0, 2, 1, 3])
        copy = MemorySource(entry).batches(order, 2)
        direct = MemorySource(entry, budget_bytes=0).batches(order, 2)
        seen = 0
        for (i1, b1), (i2, b2) in zip(copy, direct):  # in step: each batch is used before the next is gathered
            assert torch.equal(i1, i2)
            for p1, p2 in zip(b1.parts, b2.parts):  # the same exact widening of the same stored numbers
                assert p2.data.dtype == torch.float32 and p2.data.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(p1.data, p2.data)
            for p, whole in zip(b2.parts, entry.parts):
                assert torch.equal(p.data, whole.values(i2))
            seen += len(i2)
        assert seen == 5
    assert any(p.scale != 1.0 for p in entry.parts)
    plain = EncodedSet.from_aligned("x", torch.rand(4, 3, FEAT, FEAT), FEAT, list("wxyz"))  # NCHW, not channels_last
    ((_, batch),) = MemorySource(plain, budget_bytes=0).batches(torch.arange(4), 4)
    assert torch.equal(batch.aligned(), plain.features)


@pytest.mark.parametrize(
    "peak,scale",
    [(0.0, 1.0), (1.0, 1.0), (4094.0, 1.0), (4094.5, 2.0), (8188.0, 2.0), (8189.0, 4.0), (2e8, 2.0**16)]
    + [(0.75, 0.5), (1e-8, 2.0**-27)],
)
def test_part_scale_keeps_sixteen_times_headroom_and_lifts_tiny_parts(peak, scale):
    from posprobe.features.cache import FP16_MAX, part_scale

    assert part_scale(peak) == scale
    assert peak / scale * 16 <= FP16_MAX and (peak == 0 or peak / scale >= 1)


def test_features_far_below_float16s_range_are_cached_not_flushed_to_zero(tmp_path):
    """A random MobileNet's last stage is ~1e-8, under float16's smallest subnormal (6e-8): stored as they came,
    every value would be 0 and every readout on them a flat map."""
    tiny = TensorImages(torch.linspace(0, 1, 2 * 3 * SIZE * SIZE).view(2, 3, SIZE, SIZE) * 1e-8, ["a", "b"], "tiny")
    cache, _ = quiet_cache(tmp_path)
    backbone = create_backbone("posenet")
    got = cache.encode(backbone, tiny, FEAT, progress=False)
    ref = encode(backbone, tiny, FEAT, progress=False).features
    assert got.parts[0].data.dtype == torch.float16 and got.parts[0].scale <= 2.0**-26
    big = ref.abs() > 6.2e-5 * got.parts[0].scale  # above float16's subnormals after scaling: 11 significant bits
    assert big.float().mean() > 0.99
    torch.testing.assert_close(got.features[big], ref[big], rtol=2.0**-11, atol=0)


def test_features_that_are_not_finite_are_never_cached(tmp_path):
    images = torch.rand(2, 3, SIZE, SIZE)
    images[0, :, 3, 3] = float("inf")
    bad = TensorImages(images, ["a", "b"], "inf")
    cache, _ = quiet_cache(tmp_path)
    with pytest.raises(PosprobeError, match="not finite"):
        cache.encode(create_backbone("posenet"), bad, FEAT, progress=False)
    assert all(not e.complete for e in cache.entries())


def test_a_set_over_the_size_limit_is_streamed(tmp_path, resnet):
    cache, log = quiet_cache(tmp_path, max_gb=1e-6)
    got = cache.encode(resnet, noise_images(), FEAT, progress=False)
    assert isinstance(got, StreamedSet) and len(got) == 6
    assert any("streaming" in m for m in log) and cache.entries() == []


# ---- the cache command -------------------------------------------------------------------------------


def test_cache_ls_du_clear(tmp_path, resnet):
    cache, _ = quiet_cache(tmp_path)
    cache.encode(resnet, noise_images(4, name="setA"), FEAT, progress=False)
    cache.encode(resnet, noise_images(4, seed=1, name="setB"), FEAT, progress=False)
    keys = sorted(e.key for e in cache.entries())
    runner = CliRunner()
    out = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "2 entries" in out.output and "setA" in out.output and "resnet18" in out.output
    out = runner.invoke(app, ["cache", "du", "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0 and "2 complete entries" in out.output
    out = runner.invoke(app, ["cache", "clear", keys[0][:10], "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0 and "removed 1 entry" in out.output
    assert [e.key for e in cache.entries()] == keys[1:]
    out = runner.invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert "removed 1 entry" in out.output and cache.entries() == []
    out = runner.invoke(app, ["cache", "clear", "ffff", "--cache-dir", str(tmp_path)])
    assert out.exit_code != 0


def test_a_later_overflow_restarts_the_entry_as_float32(tmp_path):
    images = torch.rand(3, 3, SIZE, SIZE)
    images[2] *= 1e6  # only the last batch overflows float16
    huge = TensorImages(images, ["a", "b", "c"], "late")
    cache, log = quiet_cache(tmp_path)
    backbone = create_backbone("posenet")
    got = cache.encode(backbone, huge, FEAT, batch_size=1, num_workers=0, progress=False)
    assert got.parts[0].data.dtype == torch.float32 and cache.entries()[0].manifest["dtype"] == "float32"
    # exact: PosENet's features are the resized pixels (no convolution), the same per image in any batch
    assert torch.equal(got.features, encode(backbone, huge, FEAT, progress=False).features)
    assert any("float32" in m for m in log)


def test_the_probe_command_caches_features_and_reports_the_linear_probe(tmp_path, rng):
    for split, n in (("train", 8), ("test", 3)):
        for i in range(n):
            save_image(tmp_path / split / f"{i}.png", rng.integers(0, 256, (24, 24, 3)))
    args = [
        "probe",
        "--backbone",
        "posenet",
        "--train",
        str(tmp_path / "train"),
        "--test",
        str(tmp_path / "test"),
        "--synthetic",
        "none",
        "--controls",
        "none",
        "--image-size",
        "32",
        "--feat-size",
        "12",
        "--readout-padding",
        "1",
        "--epochs",
        "1",
        "--pattern",
        "H,G",
        "--quiet",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "run1"), "--readout", "linear"])
    assert first.exit_code == 0, first.output
    assert "H lin" in first.output and "linear probe: exact ridge (direct solver" in first.output
    rows = (tmp_path / "run1" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("readout,pattern,test_set") and sum(r.startswith("linear,") for r in rows) == 2
    assert "linear_probe" in json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert len(FeatureCache(tmp_path / "cache", log=None).entries()) == 2  # train and test, once each
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "run2")])
    assert second.exit_code == 0, second.output
    assert "hit" in second.output  # the size notes and hits go to stderr, which the runner mixes in
    assert (tmp_path / "run2" / "metrics.csv").read_text().startswith("pattern,test_set")  # no readout column
    third = runner.invoke(app, [*args, "--out", str(tmp_path / "run3"), "--no-cache"])
    assert third.exit_code == 0 and "hit" not in third.output


def test_entries_of_an_older_cache_format_are_never_read_and_clear_partial_removes_them(tmp_path, resnet):
    images = noise_images(3)
    cache, log = quiet_cache(tmp_path)
    cache.encode(resnet, images, FEAT, progress=False)
    key = feature_key(resnet, images, FEAT)[0]
    manifest_path = tmp_path / key / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format": 1}))  # as an older posprobe wrote it
    assert cache.load(key) is None and cache.entries()[0].outdated
    runner = CliRunner()
    out = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0 and "old format" in out.output
    out = runner.invoke(app, ["cache", "du", "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0 and "1 of an older format" in out.output
    out = runner.invoke(app, ["cache", "clear", "--partial", "--cache-dir", str(tmp_path)])
    assert out.exit_code == 0 and "removed 1 entry" in out.output and cache.entries() == []
