"""Image sources: user folders (with unreadable files), synthetic inputs, bundled photo sets, and encoding."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_image
from posprobe.backbones import create_backbone
from posprobe.data import (
    FolderImages,
    TensorImages,
    bundled_test_photos,
    bundled_test_set,
    bundled_train_photos,
    bundled_train_set,
    parse_synthetic,
    synthetic_images,
)
from posprobe.errors import PosprobeError
from posprobe.features.encode import encode

READABLE = [
    "a_rgb.jpg",
    "b_gray.png",
    "g_upper.JPEG",
    "sub/c_rgba.png",
    "sub/d_palette.png",
    "sub/deeper/e.bmp",
    "sub/deeper/f.webp",
]


def jpeg_bytes(rng: np.random.Generator, size=(48, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def folder_with_bad_files(image_folder: Path, rng) -> Path:
    data = jpeg_bytes(rng)
    (image_folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (image_folder / "sub" / "garbage.jpg").write_bytes(b"definitely not a jpeg" * 20)
    return image_folder


# ---- folders -----------------------------------------------------------------------------------------


def test_folder_finds_images_recursively_and_ignores_other_files(image_folder):
    ds = FolderImages(image_folder, image_size=24)
    assert sorted(ds.ids) == sorted(str(Path(p)) for p in READABLE)
    assert len(ds) == len(READABLE)
    assert ds.name == "images"


def test_folder_order_is_sorted_and_stable(image_folder):
    assert FolderImages(image_folder, 24).ids == FolderImages(image_folder, 24).ids
    assert FolderImages(image_folder, 24).paths == sorted(FolderImages(image_folder, 24).paths)


@pytest.mark.parametrize("size", [16, 37])
def test_every_format_and_mode_becomes_rgb_in_unit_range(image_folder, size):
    ds = FolderImages(image_folder, image_size=size)
    for i in range(len(ds)):
        x = ds[i]
        assert x is not None, ds.ids[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32, ds.ids[i]
        assert 0 <= float(x.min()) and float(x.max()) <= 1, ds.ids[i]


def test_grayscale_image_has_three_equal_channels(image_folder):
    ds = FolderImages(image_folder, image_size=20)
    x = ds[ds.ids.index("b_gray.png")]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_pixel_values_are_scaled_by_255(tmp_path):
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 255, 51, 0
    save_image(tmp_path / "f" / "solid.png", arr)
    x = FolderImages(tmp_path / "f", image_size=8)[0]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.2, 0.0]))


def test_16_bit_grayscale_png_keeps_its_range(tmp_path):
    """uint16 arrays save as 16-bit grayscale PNGs (mode I;16): mid-grey 32768 must read as about 0.5."""
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    (tmp_path / "f").mkdir()
    Image.fromarray(ramp).save(tmp_path / "f" / "ramp16.png")
    x = FolderImages(tmp_path / "f", image_size=16)[0]
    np.testing.assert_allclose(x[0, 0].numpy(), np.linspace(0, 1, 16), atol=0.02)


def test_image_orientation_is_kept(tmp_path):
    """Row 0 is the top of the picture and column 0 its left: a bright top-left quadrant stays there."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:20, :30] = 255
    save_image(tmp_path / "f" / "q.png", arr)
    x = FolderImages(tmp_path / "f", image_size=32)[0]
    assert x[:, :12, :12].min() == 1 and x[:, 20:, 20:].max() == 0


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(PosprobeError, match="not found"):
        FolderImages(tmp_path / "nope")


def test_file_instead_of_folder_is_refused(tmp_path, rng):
    path = tmp_path / "one.jpg"
    path.write_bytes(jpeg_bytes(rng))
    with pytest.raises(PosprobeError, match="folder"):
        FolderImages(path)


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(PosprobeError, match="no images"):
        FolderImages(tmp_path / "empty")


def test_truncated_jpeg_reads_as_none(tmp_path, rng):
    data = jpeg_bytes(rng)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert FolderImages(tmp_path / "f", 16)[0] is None


def test_garbage_jpg_reads_as_none(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage" * 50)
    assert FolderImages(tmp_path / "f", 16)[0] is None


def test_empty_image_file_reads_as_none(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "zero.png").write_bytes(b"")
    assert FolderImages(tmp_path / "f", 16)[0] is None


# ---- encoding folders with unreadable files ----------------------------------------------------------


@pytest.fixture(scope="module")
def posenet():
    return create_backbone("posenet")


def test_encode_skips_unreadable_images_and_names_them(folder_with_bad_files, posenet):
    ds = FolderImages(folder_with_bad_files, image_size=16)
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as record:
        enc = encode(posenet, ds, feat_size=8, batch_size=4, num_workers=0, progress=False)
    message = str(record[0].message)
    assert "truncated.jpg" in message and "garbage.jpg" in message
    assert sorted(enc.skipped) == sorted(["truncated.jpg", str(Path("sub/garbage.jpg"))])
    assert sorted(enc.ids) == sorted(str(Path(p)) for p in READABLE)
    assert enc.features.shape == (len(READABLE), 3, 8, 8)


def test_encoded_features_keep_the_id_order(folder_with_bad_files, posenet):
    """Each kept feature map belongs to the id at the same index (no shift after a skipped file)."""
    ds = FolderImages(folder_with_bad_files, image_size=16)
    with pytest.warns(UserWarning):
        enc = encode(posenet, ds, feat_size=16, batch_size=3, num_workers=0, progress=False)
    for i, image_id in enumerate(enc.ids):
        torch.testing.assert_close(enc.features[i], ds[ds.ids.index(image_id)])


def test_encode_strict_stops_at_unreadable_image(folder_with_bad_files, posenet):
    ds = FolderImages(folder_with_bad_files, image_size=16)
    with pytest.raises(PosprobeError, match="unreadable image"):
        encode(posenet, ds, feat_size=8, num_workers=0, progress=False, strict=True)


def test_encode_refuses_a_folder_of_only_unreadable_images(tmp_path, posenet, rng):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"nope" * 10)
    data = jpeg_bytes(rng)
    (tmp_path / "bad" / "b.jpg").write_bytes(data[: len(data) // 3])
    ds = FolderImages(tmp_path / "bad", image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PosprobeError, match="none of the 2"):
            encode(posenet, ds, feat_size=8, num_workers=0, progress=False)


def test_encode_clean_folder_warns_nothing(image_folder, posenet):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = encode(posenet, FolderImages(image_folder, 16), feat_size=8, num_workers=0, progress=False)
    assert enc.skipped == [] and len(enc) == len(READABLE)


def test_encode_with_worker_processes_matches_in_process(folder_with_bad_files, posenet):
    ds = FolderImages(folder_with_bad_files, image_size=16)
    with pytest.warns(UserWarning):
        a = encode(posenet, ds, feat_size=8, batch_size=2, num_workers=0, progress=False)
    with pytest.warns(UserWarning):
        b = encode(posenet, ds, feat_size=8, batch_size=2, num_workers=1, progress=False)
    assert a.ids == b.ids and a.skipped == b.skipped and torch.equal(a.features, b.features)


# ---- synthetic inputs --------------------------------------------------------------------------------


def test_black_and_white_images():
    black, white = synthetic_images("black", 32), synthetic_images("white", 32)
    assert black[0].shape == white[0].shape == (3, 32, 32)
    assert torch.all(black[0] == 0) and torch.all(white[0] == 1)
    assert black.ids == ["black"] and white.ids == ["white"] and len(black) == 1


def test_noise_is_seeded():
    a, b, c = (synthetic_images("noise", 64, seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_statistics():
    x = synthetic_images("noise", 224, seed=3)[0]
    assert x.dtype == torch.float32 and x.shape == (3, 224, 224)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x.mean()) == pytest.approx(0.5, abs=0.01)
    assert 0.2 < float(x.std()) < 0.25  # N(0.5, 0.25^2) clipped to [0, 1]: a little under 0.25
    assert len(x.unique()) > 1000  # continuous, not a handful of levels


def test_noise_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    synthetic_images("noise", 16, seed=9)
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_synthetic_is_refused():
    with pytest.raises(PosprobeError, match="Did you mean 'noise'"):
        synthetic_images("nosie", 16)


def test_parse_synthetic():
    assert parse_synthetic("black,white,noise") == ["black", "white", "noise"]
    assert parse_synthetic(" noise , black,noise") == ["noise", "black"]
    assert parse_synthetic("none") == [] and parse_synthetic("") == []
    with pytest.raises(PosprobeError):
        parse_synthetic("black,grey")


def test_tensor_images_refuses_bad_shapes():
    with pytest.raises(ValueError):
        TensorImages(torch.zeros(2, 1, 8, 8), ["a", "b"], "x")
    with pytest.raises(ValueError):
        TensorImages(torch.zeros(2, 3, 8, 8), ["a"], "x")


# ---- bundled photo sets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_set():
    return bundled_train_set(image_size=32, crops_per_photo=1, seed=0)


def test_bundled_train_set_shape_and_ids(train_set):
    n = len(bundled_train_photos())
    assert len(train_set) == n and train_set.images.shape == (n, 3, 32, 32)
    assert len(set(train_set.ids)) == n
    assert float(train_set.images.min()) >= 0 and float(train_set.images.max()) <= 1


def test_bundled_train_set_is_deterministic_per_seed(train_set):
    again = bundled_train_set(image_size=32, crops_per_photo=1, seed=0)
    other = bundled_train_set(image_size=32, crops_per_photo=1, seed=1)
    assert again.ids == train_set.ids and torch.equal(again.images, train_set.images)
    assert not torch.equal(other.images, train_set.images)


def test_bundled_train_set_crops_are_distinct_and_ids_unique():
    photos = bundled_train_photos()[:1]
    ds = bundled_train_set(image_size=32, crops_per_photo=3, seed=0)
    first = ds.images[:3]
    assert len(set(ds.ids)) == len(ds.ids) == 3 * len(bundled_train_photos())
    assert ds.ids[:3] == [f"{photos[0].stem}#crop{c}" for c in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])


def test_bundled_test_set_is_a_dozen_photos_from_other_packages():
    test = bundled_test_set(image_size=32)
    assert len(test) == 12 and test.images.shape == (12, 3, 32, 32)
    assert len(set(test.ids)) == 12
    train_root = bundled_train_photos()[0].parents[1]  # the interior_photos package
    for path in bundled_test_photos():
        assert train_root not in path.parents
    sources = {p.parts[p.parts.index("site-packages") + 1] for p in bundled_test_photos() if "site-packages" in p.parts}
    assert sources and "interior_photos" not in sources


def test_bundled_photo_sets_do_not_overlap(train_set):
    test = bundled_test_set(image_size=32)
    assert not set(test.ids) & {i.split("#")[0] for i in train_set.ids}
