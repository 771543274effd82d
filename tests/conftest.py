"""Shared fixtures. No test downloads anything: POSPROBE_OFFLINE is set before posprobe is imported."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["POSPROBE_OFFLINE"] = "1"
# Tests never read or fill the user's feature cache.
os.environ["POSPROBE_CACHE"] = tempfile.mkdtemp(prefix="posprobe-test-cache-")
atexit.register(shutil.rmtree, os.environ["POSPROBE_CACHE"], ignore_errors=True)

if importlib.util.find_spec("posprobe") is None:  # running from a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from posprobe.backbones import create_backbone, get_backbone_spec  # noqa: E402


def small_input(name: str) -> int:
    """A small input every backbone accepts: VGG16 without padding loses 2 px per conv and needs 196."""
    return 64 if get_backbone_spec(name).exact_strides else 196


@pytest.fixture(scope="session")
def random_backbone():
    """create_backbone(name, weights="random", seed=0), built once per session (VGG16 takes seconds)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = create_backbone(name, weights="random", seed=0)
        return cache[name]

    return get


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def save_image(path: Path, array: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    """Write a uint8 array (H, W) or (H, W, C) as an image file; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if mode is not None:
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A nested folder of readable images in several formats and modes, plus files that are not images."""
    root = tmp_path / "images"
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    save_image(root / "a_rgb.jpg", rgb(40, 60), quality=90)
    save_image(root / "b_gray.png", rng.integers(0, 256, (50, 30), dtype=np.uint8))  # mode L
    save_image(root / "sub" / "c_rgba.png", rng.integers(0, 256, (33, 33, 4), dtype=np.uint8))  # mode RGBA
    save_image(root / "sub" / "d_palette.png", rgb(20, 25), mode="P")
    save_image(root / "sub" / "deeper" / "e.bmp", rgb(16, 16))
    save_image(root / "sub" / "deeper" / "f.webp", rgb(24, 18))
    save_image(root / "g_upper.JPEG", rgb(30, 30))
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.csv").write_text("1,2,3\n")
    (root / "sub" / "no_suffix").write_bytes(b"\x89PNG but no suffix")
    return root
