"""Target maps against the formulas of PAPER.md ("Targets"), computed here with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_image
from posprobe.errors import PosprobeError
from posprobe.targets import PATTERNS, load_target_image, make_target, resolve_patterns

SIZES = [(224, 224), (17, 31), (40, 9), (3, 2)]


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def reference(name: str, height: int, width: int) -> np.ndarray:
    """PAPER.md: x, y pixel indices (x along columns, y down rows), every map min-max normalised."""
    x, y = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    if name == "H":
        out = x / (width - 1)
    elif name == "V":
        out = y / (height - 1)
    elif name == "G":
        cx, cy, s = (width - 1) / 2, (height - 1) / 2, 0.496 * width
        out = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2))
    elif name == "HS":
        out = (1 + np.cos(2 * np.pi * 2.5 * y / (height - 1))) / 2
    elif name == "VS":
        out = (1 + np.cos(2 * np.pi * 2.5 * x / (width - 1))) / 2
    return minmax(out)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("name", PATTERNS)
def test_matches_paper_formula(name, height, width):
    t = make_target(name, height, width)
    assert t.shape == (height, width)
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), reference(name, height, width), atol=1e-6)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("name", PATTERNS)
def test_range_is_exactly_zero_to_one(name, height, width):
    t = make_target(name, height, width)
    assert t.min().item() == 0.0
    assert t.max().item() == 1.0


def test_pattern_names_are_the_papers():
    assert set(PATTERNS) == {"H", "V", "G", "HS", "VS"}


@pytest.mark.parametrize("height,width", [(17, 31), (40, 9)])
def test_horizontal_gradient_runs_left_to_right(height, width):
    t = make_target("H", height, width)
    assert torch.all(t[:, 0] == 0) and torch.all(t[:, -1] == 1)
    assert torch.all(t == t[:1])  # constant down every column
    assert torch.all(t[:, 1:] > t[:, :-1])


@pytest.mark.parametrize("height,width", [(17, 31), (40, 9)])
def test_vertical_gradient_runs_top_to_bottom(height, width):
    t = make_target("V", height, width)
    assert torch.all(t[0] == 0) and torch.all(t[-1] == 1)
    assert torch.all(t == t[:, :1])  # constant along every row
    assert torch.all(t[1:] > t[:-1])


@pytest.mark.parametrize("height,width", [(17, 31), (40, 9), (224, 224)])
def test_horizontal_stripes_peak_at_top_row_and_vary_along_y(height, width):
    t = make_target("HS", height, width)
    assert torch.all(t[0] == 1)
    assert torch.all(t == t[:, :1])


@pytest.mark.parametrize("height,width", [(17, 31), (40, 9), (224, 224)])
def test_vertical_stripes_peak_at_left_column_and_vary_along_x(height, width):
    t = make_target("VS", height, width)
    assert torch.all(t[:, 0] == 1)
    assert torch.all(t == t[:1])


def test_stripes_have_two_and_a_half_periods():
    """2.5 periods: three bright bands (top, 40 %, 80 %) and three dark minima (20 %, 60 %, bottom)."""
    col = make_target("HS", 101, 5)[:, 0]
    assert col[[0, 40, 80]].tolist() == pytest.approx([1, 1, 1], abs=1e-6)
    assert col[[20, 60, 100]].tolist() == pytest.approx([0, 0, 0], abs=1e-6)


@pytest.mark.parametrize("height,width", [(17, 31), (41, 9), (224, 224)])
def test_gaussian_peaks_at_centre_and_is_zero_in_corners(height, width):
    t = make_target("G", height, width)
    peak = np.unravel_index(int(t.argmax()), t.shape)
    assert abs(peak[0] - (height - 1) / 2) <= 0.5 and abs(peak[1] - (width - 1) / 2) <= 0.5
    assert t[0, 0].item() == pytest.approx(0, abs=1e-6) and t[-1, -1].item() == pytest.approx(0, abs=1e-6)
    assert torch.allclose(t, t.flip(0)) and torch.allclose(t, t.flip(1))


def test_gaussian_sigma_is_127_of_256_pixels():
    """Before min-max the map is exp(-d^2 / 2s^2) with s = 0.496 W; check via the ratio centre row/centre."""
    w = 257
    t = make_target("G", w, w).double()
    raw_corner = np.exp(-2 * 128.0**2 / (2 * (0.496 * w) ** 2))
    raw_edge = np.exp(-(128.0**2) / (2 * (0.496 * w) ** 2))
    expected_edge = (raw_edge - raw_corner) / (1 - raw_corner)
    assert t[128, 0].item() == pytest.approx(expected_edge, abs=1e-6)


@pytest.mark.parametrize("bad", ["h", "X", "hs", "HX", "", "all"])
def test_unknown_pattern_is_refused_listing_valid_names(bad):
    with pytest.raises(PosprobeError) as err:
        make_target(bad, 8, 8)
    msg = str(err.value)
    for name in PATTERNS:
        assert name in msg


@pytest.mark.parametrize("bad,closest", [("h", "H"), ("hs", "HS"), ("VX", "V")])
def test_unknown_pattern_suggests_closest(bad, closest):
    with pytest.raises(PosprobeError, match=f"Did you mean '{closest}'"):
        make_target(bad, 8, 8)


@pytest.mark.parametrize("height,width", [(1, 10), (10, 1), (0, 5), (1, 1)])
def test_too_small_target_is_refused(height, width):
    with pytest.raises(PosprobeError):
        make_target("H", height, width)


# ---- user-drawn targets ------------------------------------------------------------------------------


def test_load_target_image_min_max_normalises_grayscale(tmp_path):
    arr = np.array([[10, 20, 30], [40, 50, 110]], dtype=np.uint8)
    path = save_image(tmp_path / "t.png", arr)
    t = load_target_image(path, 2, 3)
    assert t.dtype == torch.float32 and t.shape == (2, 3)
    np.testing.assert_allclose(t.numpy(), (arr - 10) / 100.0, atol=1e-6)


def test_load_target_image_converts_colour_to_luma(tmp_path):
    """PIL's L conversion: L = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2)."""
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[:, 2:] = (0, 255, 0)  # right half green -> 150, left black -> 0
    arr[0, 0] = (255, 0, 0)  # red -> 76
    t = load_target_image(save_image(tmp_path / "c.png", arr), 4, 4)
    assert t[0, 0].item() == pytest.approx(76 / 150, abs=1e-6)
    assert torch.all(t[:, 2:] == 1) and torch.all(t[1:, :2] == 0)


def test_load_target_image_resizes_and_keeps_orientation(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))  # dark left, bright right
    t = load_target_image(save_image(tmp_path / "ramp.png", ramp), 20, 30)
    assert t.shape == (20, 30)
    assert t.min().item() == 0.0 and t.max().item() == 1.0
    assert torch.all(t[:, 1:] >= t[:, :-1])
    assert torch.allclose(t, t[:1].expand_as(t))
    np.testing.assert_allclose(t[0].numpy(), np.linspace(0, 1, 30), atol=0.05)


def test_load_target_image_keeps_a_16_bit_gradient(tmp_path):
    """uint16 arrays save as 16-bit grayscale PNGs (mode I;16); their full range must map to [0, 1]."""
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (8, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    t = load_target_image(path, 8, 32)
    np.testing.assert_allclose(t[0].numpy(), np.linspace(0, 1, 32), atol=0.02)


def test_load_target_image_refuses_constant_image(tmp_path):
    path = save_image(tmp_path / "flat.png", np.full((10, 10), 128, dtype=np.uint8))
    with pytest.raises(PosprobeError, match="constant"):
        load_target_image(path, 10, 10)


def test_load_target_image_refuses_corrupt_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png at all")
    with pytest.raises(PosprobeError):
        load_target_image(path, 10, 10)


def test_load_target_image_refuses_missing_file(tmp_path):
    with pytest.raises(PosprobeError, match="not found"):
        load_target_image(tmp_path / "nope.png", 10, 10)


# ---- pattern lists -----------------------------------------------------------------------------------


def test_resolve_all():
    assert resolve_patterns("all") == ["H", "V", "G", "HS", "VS"]


def test_resolve_list_keeps_order_and_drops_duplicates():
    assert resolve_patterns("H,G") == ["H", "G"]
    assert resolve_patterns(" G , H ,G") == ["G", "H"]
    assert resolve_patterns(["VS", "H"]) == ["VS", "H"]


@pytest.mark.parametrize("spec", ["H,Q", "horizontal", "", " , "])
def test_resolve_refuses_unknown_or_empty(spec):
    with pytest.raises(PosprobeError):
        resolve_patterns(spec)
