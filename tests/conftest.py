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


@pytest.fixture
def small_sets(tmp_path: Path) -> tuple[Path, Path]:
    """Folders of 6 training PNGs (40x40) and 3 test JPEGs (50x30) of seeded noise: a command's smallest real run."""
    rng = np.random.default_rng(0)
    for i in range(6):
        save_image(tmp_path / "train" / f"t{i}.png", rng.integers(0, 256, (40, 40, 3)))
    for i in range(3):
        save_image(tmp_path / "test" / f"s{i}.jpg", rng.integers(0, 256, (50, 30, 3)))
    return tmp_path / "train", tmp_path / "test"


def invoke(*args: str | Path) -> tuple[int, str, str]:
    """Run `posprobe ARGS` in this process through the console entry point; returns (code, stdout, stderr).
    Needs no fixture, so module-scoped fixtures can run commands too."""
    import contextlib
    import io
    import warnings

    from posprobe import cli

    out, err = io.StringIO(), io.StringIO()
    showwarning = warnings.showwarning
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(sys, "argv", ["posprobe", *map(str, args)])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            finally:
                warnings.showwarning = showwarning
    return code, out.getvalue(), err.getvalue()


def run_cli(args: list[str], capsys=None, monkeypatch=None) -> tuple[int, str, str]:
    """``invoke(*args)``, in the calling convention older tests use."""
    return invoke(*args)


def one_line_error(code: int, err: str) -> str:
    """Exit 2, no traceback, and one error line, the last (progress notes such as the cache's may precede it)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("posprobe: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    line = one_line_error(code, err)
    for f in fragments:
        assert f in line, (f, line)
