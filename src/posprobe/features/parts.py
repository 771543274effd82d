"""Features as channel *parts*: the aligned features without the copies that alignment upsampled.

A readout consumes the aligned features: every tapped level resized to ``feat_size`` and concatenated.
A level that the alignment *upsamples* (native side below ``feat_size``: VGG16's relu5_3, ResNet's layer3
and layer4) is exactly ``A f A^T`` for its native map ``f`` and the fixed bilinear matrix ``A``, so it is
kept at its native size: 4 to 16 times less memory and disk, and the readout's convolution over it is
computed there (``joint.conv_parts``), the same linear map at a fraction of the cost. Consecutive levels
that are stored aligned are merged into one part. ``FeatureBatch.aligned()`` gives the aligned tensor.

A stored part may be float16 with a power-of-two ``scale`` (the cache keeps large features that way): its
values are ``data * scale``, with float16's 11 significant bits wherever |value| > 6.1e-5 * scale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PosprobeError

Shape = tuple[int, int, int]  # (channels, height, width) of one tapped level at its native size


@functools.lru_cache(maxsize=64)
def interp_matrix(n_out: int, n_in: int, align_corners: bool) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of 1-D linear interpolation as F.interpolate does it.

    Bilinear resizing is separable: resizing an (h, w) map to (H, W) is ``A_h @ map @ A_w.T``.
    """
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in)  # n_in unit signals of length n_in
    out = F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)  # (n_in, 1, n_out)
    return out[:, 0].T.contiguous()


def align(levels: Sequence[torch.Tensor], feat_size: int) -> torch.Tensor:
    """Resize every (B, C_i, h_i, w_i) level to feat_size x feat_size and concatenate: (B, sum C_i, fs, fs)."""
    resized = [F.interpolate(f, size=(feat_size, feat_size), mode="bilinear", align_corners=True) for f in levels]
    return torch.cat(resized, dim=1)


@dataclass(frozen=True)
class PartPlan:
    """Channels [lo, hi) of the aligned features; ``native_size`` = (h, w) when kept at the level's own size
    (``Part.native`` says only whether it is)."""

    lo: int
    hi: int
    native_size: tuple[int, int] | None

    def shape(self, feat_size: int) -> tuple[int, int, int]:
        """(channels, height, width) of the part for one image."""
        h, w = self.native_size or (feat_size, feat_size)
        return self.hi - self.lo, h, w


def plan_parts(levels: Sequence[Shape], feat_size: int) -> list[PartPlan]:
    """Merge consecutive levels that are stored aligned into one part; keep strongly upsampled ones native.

    A level is kept native when its map has at most half the aligned map's pixels (below that the
    convolution at native size plus its upsampling costs more than the direct one).
    """
    plans: list[PartPlan] = []
    lo = 0
    for c, h, w in levels:
        native = (h, w) if h * w * 2 <= feat_size * feat_size else None
        if native is None and plans and plans[-1].native_size is None and plans[-1].hi == lo:
            plans[-1] = PartPlan(plans[-1].lo, lo + c, None)
        else:
            plans.append(PartPlan(lo, lo + c, native))
        lo += c
    return plans


@dataclass
class Part:
    """One block of channels: (n, hi-lo, fs, fs) aligned, or (n, hi-lo, h, w) native; values ``data * scale``."""

    lo: int
    hi: int
    data: torch.Tensor
    native: bool
    scale: float = 1.0

    def values(
        self, rows: torch.Tensor | slice | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """The part's (selected rows') values as float32, channels_last, on ``device``."""
        x = self.data if rows is None else self.data[rows]
        x = x.to(device=device if device is not None else x.device, dtype=torch.float32)
        if self.scale != 1.0:
            x = x * self.scale  # a power of two: exact
        return x.contiguous(memory_format=torch.channels_last)

    def plan(self) -> PartPlan:
        return PartPlan(self.lo, self.hi, tuple(self.data.shape[-2:]) if self.native else None)


def split_levels(levels: Sequence[torch.Tensor], feat_size: int) -> list[Part]:
    """Encoder levels (b, c_i, h_i, w_i) -> parts: levels the alignment would upsample stay as they are,
    consecutive others are aligned together (``align``). Every part is channels_last."""
    plans = plan_parts([tuple(f.shape[1:]) for f in levels], feat_size)
    parts, i = [], 0
    for plan in plans:
        group = []
        while sum(f.shape[1] for f in group) < plan.hi - plan.lo:
            group.append(levels[i])
            i += 1
        data = group[0] if plan.native_size is not None else align(group, feat_size)
        parts.append(
            Part(plan.lo, plan.hi, data.contiguous(memory_format=torch.channels_last), plan.native_size is not None)
        )
    return parts


def concat_parts(batches: Sequence[Sequence[Part]]) -> list[Part]:
    """Batches of parts with the same layout -> one part per channel block, on the CPU, channels_last."""
    out = []
    for k, p in enumerate(batches[0]):
        data = [b[k].data.cpu() for b in batches]
        data = data[0] if len(data) == 1 else torch.cat(data)
        out.append(Part(p.lo, p.hi, data.contiguous(memory_format=torch.channels_last), p.native))
    return out


class FeatureBatch:
    """A batch of readout inputs as channel parts; ``aligned()`` gives the (b, C, fs, fs) tensor.

    The engine (``joint.conv_parts``) reads the parts' values, so stored float16 parts with a scale work too;
    the sources hand out float32 parts.
    """

    def __init__(self, parts: list[Part], feat_size: int):
        self.parts, self.feat_size = parts, feat_size
        self.channels = parts[-1].hi if parts else 0
        self._aligned: torch.Tensor | None = None
        self._selected: dict[tuple[int, ...], FeatureBatch] = {}

    def __len__(self) -> int:
        return self.parts[0].data.shape[0]

    def aligned(self) -> torch.Tensor:
        """(b, C, fs, fs) float32, channels_last: exactly what ``Readout.forward_aligned`` consumes."""
        if self._aligned is None:
            fs = self.feat_size
            blocks = [p.values() for p in self.parts]
            blocks = [
                F.interpolate(x, size=(fs, fs), mode="bilinear", align_corners=True) if p.native else x
                for p, x in zip(self.parts, blocks)
            ]
            x = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
            self._aligned = x.contiguous(memory_format=torch.channels_last)
        return self._aligned

    def select(self, channels: torch.Tensor | None) -> FeatureBatch:
        """The batch restricted to ``channels`` (indices into the aligned channels, in that order)."""
        if channels is None:
            return self
        key = tuple(int(c) for c in channels)
        if key not in self._selected:
            parts: list[Part] = []
            for c in key:
                if not 0 <= c < self.channels:
                    raise PosprobeError(f"channel {c} is outside the features' {self.channels} channels")
            i = 0
            while i < len(key):  # runs of consecutive channels inside one part become one part
                part = next(p for p in self.parts if p.lo <= key[i] < p.hi)
                j = i + 1
                while j < len(key) and key[j] == key[j - 1] + 1 and key[j] < part.hi:
                    j += 1
                a, b = key[i] - part.lo, key[j - 1] + 1 - part.lo
                data = part.data if (a, b) == (0, part.hi - part.lo) else part.data[:, a:b]
                lo = parts[-1].hi if parts else 0
                parts.append(
                    Part(lo, lo + (b - a), data.contiguous(memory_format=torch.channels_last), part.native, part.scale)
                )
                i = j
            self._selected[key] = FeatureBatch(parts, self.feat_size)
        return self._selected[key]
