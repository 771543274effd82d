"""A DUT-S / PASCAL-S-sized stand-in for the benchmark: JPEG files with the paper's image sizes and photo content.

The paper's setting is 10,553 DUT-S training images and 850 PASCAL-S test images, JPEGs of about 300-400 x 400
px. Timing posprobe at that scale needs files that cost what those do to read and decode, so this writes seeded
crops of the bundled photos (interior photos for training, the classic photos for testing: two sources, as in
the paper) at DUT-S's sizes, as JPEG at quality 90. No image is repeated; none is a real DUT-S image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data import bundled_test_photos, bundled_train_photos, upright
from ..errors import PosprobeError

PAPER_TRAIN, PAPER_TEST = 10_553, 850  # DUT-S train, PASCAL-S
LONG_SIDE = 400  # DUT-S images are 400 px on their long side ...
SHORT_SIDES = (300, 400)  # ... and mostly 300-400 on the short one
LANDSCAPE = 0.75  # share of landscape images
SOURCE_SIDE = 1200  # source photos are decoded once at this long side, then cropped
QUALITY = 90


def split_counts(total: int) -> tuple[int, int]:
    """(train, test) for ``total`` images in DUT-S : PASCAL-S proportions (10,553 : 850), at least 1 each."""
    if total < 2:
        raise PosprobeError(f"--synthetic-dataset needs at least 2 images (1 train, 1 test); given {total}")
    test = max(1, round(total * PAPER_TEST / (PAPER_TRAIN + PAPER_TEST)))
    return total - test, test


def _sources(paths: list[Path]) -> list[Image.Image]:
    """Each photo decoded once, upright, RGB, at most SOURCE_SIDE on its long side."""
    out = []
    for path in paths:
        with Image.open(path) as img:
            img.draft("RGB", (SOURCE_SIDE, SOURCE_SIDE))  # JPEG DCT scaling: decode a 4k photo at ~1/4 the cost
            img = upright(img).convert("RGB")
            img.thumbnail((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.BILINEAR)
            out.append(img.copy())
    return out


def _paper_sized_crop(src: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``src`` with a DUT-S aspect, resized to 400 px on its long side."""
    short = int(rng.integers(SHORT_SIDES[0], SHORT_SIDES[1] + 1))
    w, h = (LONG_SIDE, short) if rng.random() < LANDSCAPE else (short, LONG_SIDE)
    scale = rng.uniform(0.4, 1.0) * min(src.width / w, src.height / h)  # crop covers 40-100% of what fits
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0 = int(rng.integers(0, src.width - cw + 1))
    y0 = int(rng.integers(0, src.height - ch + 1))
    return src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)


def write_synthetic_dataset(
    root: Path, n_train: int, n_test: int, seed: int = 0, progress: bool = True
) -> tuple[Path, Path]:
    """Write ``n_train`` training and ``n_test`` test JPEGs under ``root``/train and ``root``/test; returns both
    folders. Seeded: the same arguments write the same files."""
    if n_train < 1 or n_test < 1:
        raise PosprobeError(f"a synthetic dataset needs >= 1 training and >= 1 test image; given {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    folders = []
    for name, count, paths in (("train", n_train, bundled_train_photos()), ("test", n_test, bundled_test_photos())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        sources = _sources(paths)
        for i in tqdm(range(count), desc=f"write {name} JPEGs", unit="img", disable=None if progress else True):
            crop = _paper_sized_crop(sources[int(rng.integers(len(sources)))], rng)
            crop.save(folder / f"{name}{i:05d}.jpg", quality=QUALITY)
        folders.append(folder)
    return folders[0], folders[1]
