"""Image files that used to be lost or read wrong: names that are not UTF-8, images over PIL's pixel limits,
and photos whose EXIF orientation says they are stored sideways."""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_image
from posprobe.backbones import create_backbone
from posprobe.data import FolderImages, display_name, to_tensor
from posprobe.errors import PosprobeError
from posprobe.features.encode import encode
from posprobe.output.rundir import write_csv, write_json

CAFE = "caf\udce9.png"  # b"caf\xe9.png" as os.listdir gives it: the undecodable byte as a lone surrogate
CAFE_SHOWN = "caf\\xe9.png"  # as it is written out


def make_file(folder: Path, name: str, data: bytes) -> Path:
    """Write a file whose name may not be valid UTF-8; skip the test where the file system refuses the name."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(os.fsencode(folder) + b"/" + os.fsencode(name), "wb") as f:
            f.write(data)
    except (OSError, UnicodeEncodeError) as err:
        pytest.skip(f"this file system refuses non-UTF-8 file names: {err}")
    return folder / name


def png_bytes(rng: np.random.Generator, size=(24, 24)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: PIL judges its size from this header alone."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


# ---- names that are not UTF-8 ------------------------------------------------------------------------------


def test_display_name_escapes_undecodable_bytes_and_keeps_valid_names():
    assert display_name(CAFE) == CAFE_SHOWN
    assert display_name("café.png") == "café.png"  # valid UTF-8, not ASCII: unchanged
    assert display_name(Path("sub") / CAFE) == str(Path("sub") / CAFE_SHOWN)
    assert display_name("x\ud800.png") == "x\\ud800.png"  # a surrogate no byte decodes to: escaped as it is


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16, never undecodable bytes")
def test_non_utf8_file_name_loads_and_is_written_escaped(tmp_path, rng):
    root = tmp_path / "imgs"
    make_file(root, CAFE, png_bytes(rng))
    make_file(root, "plain.png", png_bytes(rng))
    ds = FolderImages(root, image_size=16)
    assert ds.ids == [CAFE, "plain.png"]  # the name as os.listdir gives it: it still opens
    assert ds[0].shape == (3, 16, 16)

    rows = [{"image": i, "spc": 0.5} for i in ds.ids]
    write_csv(tmp_path / "rows.csv", rows)
    write_json(tmp_path / "rows.json", {"rows": rows, "skipped": [CAFE], "by_name": {CAFE: 1}, "path": root / CAFE})
    text = (tmp_path / "rows.csv").read_bytes().decode("utf-8")  # valid UTF-8
    assert [r["image"] for r in csv.DictReader(text.splitlines())] == [CAFE_SHOWN, "plain.png"]
    loaded = json.loads((tmp_path / "rows.json").read_bytes().decode("utf-8"))
    assert loaded["rows"][0]["image"] == CAFE_SHOWN and loaded["skipped"] == [CAFE_SHOWN]
    assert loaded["by_name"] == {CAFE_SHOWN: 1} and loaded["path"].endswith(CAFE_SHOWN)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16, never undecodable bytes")
def test_non_utf8_folder_name_is_escaped_in_the_description(tmp_path, rng):
    root = tmp_path / "d\udce9j\udce0"
    make_file(root, "a.png", png_bytes(rng))
    ds = FolderImages(root, image_size=16)
    assert "d\\xe9j\\xe0" in ds.description and ds.description.encode("utf-8")
    assert ds[0] is not None


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16, never undecodable bytes")
def test_probe_cli_without_cache_runs_end_to_end_on_non_utf8_names(tmp_path, rng, capsys, monkeypatch):
    from test_cli import FAST, run_cli

    train, test = tmp_path / "train", tmp_path / "test"
    for i in range(5):
        make_file(train, f"t{i}.png", png_bytes(rng, (40, 40)))
    make_file(train, CAFE, png_bytes(rng, (40, 40)))
    make_file(train, "bro\udcefken.png", b"not a png at all")
    for i in range(4):  # the first four test images are the previews (see test_prediction_grid_... below)
        make_file(test, f"s{i}.png", png_bytes(rng, (30, 30)))
    make_file(test, "zna\udcefve.png", png_bytes(rng, (30, 30)))
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["probe", *FAST, "--pattern", "H", "--no-cache", "--train", str(train), "--test", str(test), "--out", str(out)],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert "Traceback" not in err
    for path in out.rglob("*"):
        if path.suffix in (".csv", ".json", ".md"):
            path.read_bytes().decode("utf-8")  # every text file is valid UTF-8
    per_image = list(csv.DictReader((out / "per_image.csv").open(encoding="utf-8")))
    assert "zna\\xefve.png" in {r["image"] for r in per_image if r["test_set"] == "test"}
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["resolved"]["train_set"]["skipped"] == ["bro\\xefken.png"]
    assert config["resolved"]["train_set"]["n"] == 6  # the five plain names and caf\xe9.png


def test_prediction_grid_labels_a_non_utf8_name(tmp_path):
    from posprobe.output.plots import prediction_grid

    target = {"H": torch.zeros(8, 8)}
    prediction_grid(tmp_path / "p.png", target, [(CAFE, torch.zeros(3, 8, 8))], {"H": torch.zeros(1, 8, 8)})
    assert (tmp_path / "p.png").is_file()


# ---- images over PIL's pixel limits ------------------------------------------------------------------------


def test_a_400_megapixel_image_is_refused_with_its_size_and_the_limit(tmp_path, rng):
    save_image(tmp_path / "imgs" / "ok.png", rng.integers(0, 256, (20, 20, 3)))
    (tmp_path / "imgs" / "x.png").write_bytes(png_header(20000, 20000))
    ds = FolderImages(tmp_path / "imgs", image_size=16)
    i = ds.ids.index("x.png")
    with pytest.warns(UserWarning) as caught:
        assert ds[i] is None
    message = str(caught[0].message)
    assert "x.png: 400 megapixels, over the decompression-bomb limit of 179 megapixels" in message
    assert ds.unreadable_reason("x.png") == "400 megapixels, over the decompression-bomb limit of 179 megapixels"
    assert ds.unreadable_reason("ok.png") is None


def test_a_144_megapixel_image_is_read_with_a_warning_naming_it(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(png_header(12000, 12000))  # a header only: decoding then fails
    ds = FolderImages(tmp_path / "imgs", image_size=16)
    with pytest.warns(
        UserWarning,
        match=r"big\.png: 12000x12000 = 144 megapixels, over PIL's decompression-bomb "
        r"warning threshold of 89 megapixels; read anyway",
    ):
        ds[0]


def test_over_the_limit_is_refused_and_between_is_decoded_under_a_lowered_limit(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused over 2000 pixels, a warning over 1000
    save_image(tmp_path / "imgs" / "huge.png", rng.integers(0, 256, (50, 50, 3)))  # 2500 pixels
    save_image(tmp_path / "imgs" / "large.png", rng.integers(0, 256, (40, 40, 3)))  # 1600 pixels
    save_image(tmp_path / "imgs" / "small.png", rng.integers(0, 256, (20, 20, 3)))
    ds = FolderImages(tmp_path / "imgs", image_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = {i: ds[k] for k, i in enumerate(ds.ids)}
    assert decoded["huge.png"] is None
    assert decoded["large.png"].shape == (3, 16, 16) and decoded["small.png"] is not None
    messages = [str(w.message) for w in caught]
    assert any(
        "huge.png: 0.0025 megapixels, over the decompression-bomb limit of 0.002 megapixels" in m for m in messages
    ), messages
    assert any("large.png: 40x40" in m and "read anyway" in m for m in messages), messages
    assert not any("DecompressionBomb" in w.category.__name__ for w in caught)  # PIL's nameless warning: replaced

    backbone = create_backbone("posenet", weights="random")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(PosprobeError, match=r"huge\.png.*--strict"):
        warnings.simplefilter("always")
        encode(backbone, ds, feat_size=4, batch_size=8, strict=True, num_workers=0, progress=False)
    assert any("huge.png: 0.0025 megapixels, over the decompression-bomb limit" in str(w.message) for w in caught)


# ---- EXIF orientation ----------------------------------------------------------------------------------------


def test_an_exif_rotated_jpeg_decodes_upright(tmp_path):
    yy, xx = np.mgrid[0:64, 0:32]
    upright = np.stack([yy * 4, xx * 8, np.full_like(yy, 128)], axis=-1).astype(np.uint8)  # 64 tall, 32 wide
    stored = Image.fromarray(upright).rotate(90, expand=True)  # as a camera held sideways stores it: 32 x 64
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    (tmp_path / "imgs").mkdir()
    stored.save(tmp_path / "imgs" / "phone.jpg", quality=100, exif=exif.tobytes())
    with Image.open(tmp_path / "imgs" / "phone.jpg") as img:
        assert img.size == (64, 32) and img.getexif()[0x0112] == 6

    decoded = FolderImages(tmp_path / "imgs", image_size=32)[0]
    reference = to_tensor(Image.fromarray(upright), 32)
    sideways = to_tensor(stored, 32)
    assert (decoded - reference).abs().mean() < 0.02
    assert (decoded - sideways).abs().mean() > 0.1  # what was decoded before: the stored, sideways pixels
