"""Fixed position maps the readout must draw (PAPER.md, "Targets").

Axis conventions: a map is a float32 tensor of shape (H, W) indexed ``[y, x]``; ``y`` is the row index,
0 at the top, and ``x`` the column index, 0 at the left. Every map is min-max normalised to [0, 1].

- ``H``  horizontal gradient: ``x / (W - 1)``, 0 at the left column, 1 at the right, constant down a column.
- ``V``  vertical gradient: ``y / (H - 1)``, 0 at the top row, 1 at the bottom.
- ``G``  centred Gaussian: ``exp(-((x-cx)^2 + (y-cy)^2) / (2 s^2))`` with ``cx = (W-1)/2``,
  ``cy = (H-1)/2`` and ``s = 0.496 W``, then min-max normalised (1 at the centre, 0 in the far corners).
- ``HS`` horizontal stripes (bands that vary along y): ``(1 + cos(2 pi 2.5 y / (H-1))) / 2``,
  2.5 periods, 1 at the top row.
- ``VS`` vertical stripes: the same along x, 1 at the left column.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import PosprobeError, unknown_choice

PATTERNS: tuple[str, ...] = ("H", "V", "G", "HS", "VS")
GAUSSIAN_SIGMA_FRACTION = 0.496  # 127 px of 256 in the authors' ground-truth maps
STRIPE_PERIODS = 2.5


def _ramp(n: int) -> torch.Tensor:
    """0..1 over n samples (a single sample is 0)."""
    return torch.arange(n, dtype=torch.float64) / max(n - 1, 1)


def _min_max(t: torch.Tensor) -> torch.Tensor:
    span = t.max() - t.min()
    return (t - t.min()) / span if span > 0 else torch.zeros_like(t)


def make_target(name: str, height: int, width: int) -> torch.Tensor:
    """The position map ``name`` (one of PATTERNS) as a float32 tensor of shape (height, width) in [0, 1]."""
    if name not in PATTERNS:
        raise unknown_choice("pattern", name, PATTERNS)
    if int(height) < 2 or int(width) < 2:
        raise PosprobeError(f"a target needs at least 2x2 pixels; given {height}x{width}")
    y = _ramp(height)[:, None].expand(height, width)  # (H, W), 0 at the top
    x = _ramp(width)[None, :].expand(height, width)  # (H, W), 0 at the left
    if name == "H":
        out = x
    elif name == "V":
        out = y
    elif name == "G":
        xs = torch.arange(width, dtype=torch.float64)[None, :]
        ys = torch.arange(height, dtype=torch.float64)[:, None]
        cx, cy, s = (width - 1) / 2, (height - 1) / 2, GAUSSIAN_SIGMA_FRACTION * width
        out = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * s**2))
    elif name == "HS":
        out = (1 + torch.cos(2 * math.pi * STRIPE_PERIODS * y)) / 2
    else:  # VS
        out = (1 + torch.cos(2 * math.pi * STRIPE_PERIODS * x)) / 2
    return _min_max(out.contiguous()).to(torch.float32)


def probe_targets(patterns, extra: dict[str, torch.Tensor] | None, image_size: int) -> dict[str, torch.Tensor]:
    """The maps a probe reads out: each named pattern, then the user's own (checked to be image_size square)."""
    targets = {p: make_target(p, image_size, image_size) for p in patterns}
    for name, t in dict(extra or {}).items():
        if tuple(t.shape) != (image_size, image_size):
            raise PosprobeError(f"target '{name}' is {tuple(t.shape)}; expected ({image_size}, {image_size})")
        targets[name] = t.float()
    if not targets:
        raise PosprobeError("no target to probe: give at least one pattern or target image")
    return targets


def load_target_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """A target drawn by the user: the image at ``path`` as grayscale, resized bilinearly, min-max normalised."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            # float32 keeps a 16-bit map's precision (PIL's convert("L") would clip it at 255)
            wide = img.mode.startswith("I") or img.mode == "F"
            gray = Image.fromarray(np.asarray(img if wide else img.convert("L"), dtype=np.float32), "F")
            gray = gray.resize((int(width), int(height)), Image.BILINEAR)
    except FileNotFoundError:
        raise PosprobeError(f"target image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise PosprobeError(f"cannot read target image {path}: {err}") from None
    t = torch.from_numpy(np.asarray(gray, dtype=np.float64))
    if t.max() == t.min():
        raise PosprobeError(f"target image {path} is constant; a position map needs variation")
    return _min_max(t).to(torch.float32)


def resolve_patterns(spec: str | list[str]) -> list[str]:
    """'all', 'H,G' or a list -> validated pattern names in the order given."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return list(PATTERNS)
    if not items:
        raise PosprobeError(f"no pattern given; expected 'all' or some of {', '.join(PATTERNS)}")
    for s in items:
        if s not in PATTERNS:
            raise unknown_choice("pattern", s, [*PATTERNS, "all"])
    return list(dict.fromkeys(items))
