"""Faults of the feature cache done for real: damaged bytes, truncated and missing files, a full disk, an
unwritable folder, a process killed with SIGKILL mid-extraction."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from posprobe.backbones import create_backbone
from posprobe.cli import app
from posprobe.data import TensorImages
from posprobe.errors import PosprobeError
from posprobe.features import cache as cache_mod
from posprobe.features.cache import FeatureCache, feature_key
from posprobe.features.sources import StreamedSet

SIZE, FEAT = 32, 12


def noise_images(n: int = 8, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.rand(n, 3, SIZE, SIZE, generator=g), [f"im{i}" for i in range(n)], "noise")


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("resnet18", "random", seed=0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one row (each image its own checksum), so damage is located to the image."""
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 1)


def made(root: Path, resnet, images: TensorImages) -> tuple[FeatureCache, list[str], Path, torch.Tensor]:
    """A complete entry of ``images`` under ``root``: (cache, its log, the entry folder, its features)."""
    log: list[str] = []
    cache = FeatureCache(root, log=log.append)
    features = cache.encode(resnet, images, FEAT, progress=False).features.clone()
    return cache, log, root / feature_key(resnet, images, FEAT)[0], features


def as_a_new_process(entry: Path, stat: os.stat_result) -> None:
    """Disk rot keeps the file's times; a new process has verified nothing yet."""
    os.utime(entry / "features.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cache_mod._VERIFIED.clear()


@pytest.mark.parametrize("damage", ["flip", "zero", "ff"])
def test_damaged_bytes_are_caught_moved_aside_and_extracted_again(tmp_path, resnet, small_chunks, damage):
    images = noise_images()
    cache, log, entry, clean = made(tmp_path, resnet, images)
    data = entry / "features.bin"
    stat = data.stat()
    raw = bytearray(data.read_bytes())
    middle = slice(len(raw) // 2, len(raw) // 2 + 64)
    raw[middle] = {"flip": bytes(b ^ 0x10 for b in raw[middle]), "zero": bytes(64), "ff": b"\xff" * 64}[damage]
    data.write_bytes(raw)
    as_a_new_process(entry, stat)
    log.clear()
    again = cache.encode(resnet, images, FEAT, progress=False)
    said = [m for m in log if "is damaged" in m]
    assert len(said) == 1 and "fails its checksum in 1 of 8 chunks" in said[0] and "images 4-4, from im4" in said[0]
    torch.testing.assert_close(again.features, clean, rtol=0, atol=0)  # the same rows, re-encoded the same way
    aside = list((tmp_path / "damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(entry.name)
    states = {e.path: e for e in cache.entries()}
    assert states[entry].complete and states[aside[0]].damage.startswith("set aside: features.bin fails")


@pytest.mark.parametrize("fault", ["truncate data", "delete data", "truncate manifest", "empty manifest"])
def test_a_truncated_or_missing_file_is_damage_not_a_dead_end(tmp_path, resnet, fault):
    images = noise_images(4)
    cache, log, entry, clean = made(tmp_path, resnet, images)
    if fault == "truncate data":
        os.truncate(entry / "features.bin", (entry / "features.bin").stat().st_size // 3)
    elif fault == "delete data":
        (entry / "features.bin").unlink()
    else:
        text = (entry / "manifest.json").read_text()
        (entry / "manifest.json").write_text(text[: len(text) // 2] if fault == "truncate manifest" else "")
    [e] = cache.entries()
    assert not e.complete and e.damage  # 'cache ls' calls it damaged, not complete
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path)])
    assert listed.exit_code == 0 and "damaged (" in listed.output
    log.clear()
    again = cache.encode(resnet, images, FEAT, progress=False)  # reported, set aside, rebuilt
    assert sum("is damaged" in m for m in log) == 1
    torch.testing.assert_close(again.features, clean, rtol=0, atol=0)
    cleared = runner.invoke(app, ["cache", "clear", "--damaged", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0 and "removed 1 entry" in cleared.output
    assert [e.complete for e in cache.entries()] == [True]


@pytest.mark.parametrize("fault", ["empty manifest", "truncate data"])
def test_cache_verify_reports_an_entry_whose_manifest_or_size_is_wrong(tmp_path, resnet, fault):
    _, _, entry, _ = made(tmp_path, resnet, noise_images(4))
    if fault == "empty manifest":
        (entry / "manifest.json").write_text("")
    else:
        os.truncate(entry / "features.bin", 100)
    verified = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert verified.exit_code == 1 and "DAMAGED" in verified.output and not entry.exists()  # moved aside


def test_cache_verify_reads_every_entry_and_exits_1_on_damage(tmp_path, resnet):
    cache, _, entry, _ = made(tmp_path, resnet, noise_images(4))
    made(tmp_path, resnet, noise_images(4, seed=1))
    runner = CliRunner()
    ok = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert ok.exit_code == 0 and "verified 2 entries" in ok.output and "all match" in ok.output
    with open(entry / "features.bin", "r+b") as f:  # one byte, anywhere
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    bad = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 1 and f"{entry.name[:12]}  DAMAGED: features.bin fails its checksum" in bad.output
    assert "1 damaged" in bad.output and not entry.exists()
    unknown = runner.invoke(app, ["cache", "verify", "0000", "--cache-dir", str(tmp_path)])
    assert isinstance(unknown.exception, PosprobeError) and "no cache entry starts with '0000'" in str(
        unknown.exception
    )


def test_no_room_for_the_entry_streams_before_the_first_image(tmp_path, resnet, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    log: list[str] = []
    got = FeatureCache(tmp_path, log=log.append).encode(resnet, noise_images(4), FEAT, progress=False)
    assert isinstance(got, StreamedSet)
    assert any("cannot take" in m and "No space left on device" in m and "streaming" in m for m in log)
    assert FeatureCache(tmp_path, log=None).entries() == []  # no empty entry left behind


def test_a_disk_that_fills_mid_extraction_stops_in_one_line_and_resumes(tmp_path, resnet, monkeypatch):
    images = noise_images(8)
    cache = FeatureCache(tmp_path, log=None)
    real = cache_mod._write_json_atomic
    writes = []

    def filling(path, obj):
        writes.append(path)
        if len(writes) == 3:  # after two batches were recorded, another process takes the last bytes
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, obj)

    monkeypatch.setattr(cache_mod, "_write_json_atomic", filling)
    with pytest.raises(PosprobeError, match=r"No space left on device; it keeps 4 of 8 images and resumes"):
        cache.encode(resnet, images, FEAT, batch_size=2, num_workers=0, progress=False)
    monkeypatch.setattr(cache_mod, "_write_json_atomic", real)
    log: list[str] = []
    resumed = FeatureCache(tmp_path, log=log.append).encode(
        resnet, images, FEAT, batch_size=2, num_workers=0, progress=False
    )
    assert any("resuming an interrupted extraction at image 4 of 8" in m for m in log)
    fresh = FeatureCache(tmp_path / "fresh", log=None).encode(
        resnet, images, FEAT, batch_size=2, num_workers=0, progress=False
    )
    torch.testing.assert_close(resumed.features, fresh.features, rtol=0, atol=0)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_streams_with_one_line(tmp_path, resnet, monkeypatch):
    disk = tmp_path / "tiny"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this container may not mount a tmpfs")
    try:
        (disk / "cache").mkdir()
        (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - 64 * 1024))  # another process filled it
        # after posprobe's free-space check had passed
        monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**12))
        log: list[str] = []
        got = FeatureCache(disk / "cache", log=log.append).encode(resnet, noise_images(8), FEAT, progress=False)
        assert isinstance(got, StreamedSet)
        assert any("cannot take" in m and "No space left on device" in m for m in log), log
        assert list((disk / "cache").iterdir()) == []
    finally:
        monkeypatch.undo()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_unwritable_cache_folder_falls_back_to_memory(tmp_path, resnet):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    log: list[str] = []
    got = FeatureCache(not_a_folder, log=log.append).encode(resnet, noise_images(4), FEAT, progress=False)
    assert len(got) == 4 and any("cannot be written" in m and "in memory" in m for m in log)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o555)
        log.clear()
        got = FeatureCache(locked, log=log.append).encode(resnet, noise_images(4), FEAT, progress=False)
        assert len(got) == 4 and any("Permission denied" in m for m in log)


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    from posprobe.features import cache as cache_mod
    from posprobe.backbones import create_backbone
    from posprobe.features.cache import FeatureCache
    from posprobe.data import TensorImages
    real = cache_mod.encode_batches
    def slow(*args, **kw):
        for i, item in enumerate(real(*args, **kw)):
            yield item
            print("batch", i, flush=True)
            time.sleep(0.3)
    cache_mod.encode_batches = slow
    g = torch.Generator().manual_seed(0)
    images = TensorImages(torch.rand(12, 3, 32, 32, generator=g), [f"im{i}" for i in range(12)], "noise")
    FeatureCache(sys.argv[1], log=None).encode(create_backbone("resnet18", "random", seed=0), images, 12,
                                               batch_size=2, num_workers=0, progress=False)
    print("done", flush=True)
""")


def test_sigkill_mid_extraction_resumes_to_the_same_entry(tmp_path, resnet):
    env = {**os.environ, "POSPROBE_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.startswith("batch 2") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    [partial] = FeatureCache(tmp_path, log=None).entries()
    assert not partial.complete and partial.rows_done >= 4  # batches 0 and 1 are on disk before 2 is encoded
    g = torch.Generator().manual_seed(0)
    images = TensorImages(torch.rand(12, 3, 32, 32, generator=g), [f"im{i}" for i in range(12)], "noise")
    log: list[str] = []
    resumed = FeatureCache(tmp_path, log=log.append).encode(
        resnet, images, FEAT, batch_size=2, num_workers=0, progress=False
    )
    assert any("resuming an interrupted extraction" in m for m in log)
    fresh = FeatureCache(tmp_path / "fresh", log=None).encode(
        resnet, images, FEAT, batch_size=2, num_workers=0, progress=False
    )
    torch.testing.assert_close(resumed.features, fresh.features, rtol=0, atol=0)  # same batches, same shapes
    manifest = json.loads((partial.path / "manifest.json").read_text())
    assert len(manifest["checksums"]["sha256"]) >= 1 and np.dtype(manifest["dtype"]) == np.float16
