"""Each tapped level's features, back out of an encoded set's channel parts.

An EncodedSet stores the aligned features as parts (parts.py): a level that alignment upsamples is kept at its
native size, the others are resized to ``feat_size`` and consecutive ones share one part. A measure that reads
one level at a time (measures/) needs that level's (N, C, h, w) block and the scale its values are stored with;
``level_views`` gives it as a view into the parts (a memory-mapped cache entry stays on disk until read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..backbones import Level
from ..errors import PosprobeError
from .encode import EncodedSet
from .parts import Part


@dataclass(frozen=True)
class LevelView:
    """One level's features: ``data`` (N, C, h, w), values ``data * scale``; ``native`` when stored at the level's
    own size (alignment would upsample it), else resized to the set's ``feat_size``."""

    level: Level
    data: torch.Tensor
    scale: float
    native: bool

    @property
    def size(self) -> tuple[int, int]:
        return int(self.data.shape[-2]), int(self.data.shape[-1])

    def resolution(self, native_size: tuple[int, int] | None = None) -> str:
        """Where it was measured, in words: 'native 14x14' or 'aligned 28x28 (native 224x224)'."""
        h, w = self.size
        if self.native:
            return f"native {h}x{w}"
        if native_size is None or tuple(native_size) == (h, w):
            return f"aligned {h}x{w}"
        return f"aligned {h}x{w} (native {native_size[0]}x{native_size[1]})"


def level_views(encoded: EncodedSet, levels: Sequence[Level]) -> list[LevelView]:
    """The (N, C_level, h, w) view of every level of ``encoded``, in order; ``levels`` are the backbone's."""
    total = sum(lv.channels for lv in levels)
    if total != encoded.channels:
        raise PosprobeError(
            f"the features have {encoded.channels} channels but the levels "
            f"{[(lv.name, lv.channels) for lv in levels]} add up to {total}"
        )
    views, lo = [], 0
    for lv in levels:
        hi = lo + lv.channels
        part = next((p for p in encoded.parts if p.lo <= lo and hi <= p.hi), None)
        if part is None:  # the parts split inside a level: not a layout split_levels makes
            raise PosprobeError(f"level {lv.name} (channels {lo}..{hi - 1}) straddles two feature parts")
        data = part.data[:, lo - part.lo : hi - part.lo]  # (N, C_level, h, w), a view
        views.append(LevelView(lv, data, float(part.scale), bool(part.native)))
        lo = hi
    return views


def select_levels(encoded: EncodedSet, levels: Sequence[Level], names: Sequence[str]) -> EncodedSet:
    """The features of ``names`` only (in network order), as an EncodedSet of views: what a readout of those
    levels alone reads, for estimators that take a whole set (the exact linear probe)."""
    chosen = [v for v in level_views(encoded, levels) if v.level.name in names]
    missing = sorted(set(names) - {v.level.name for v in chosen})
    if missing:
        raise PosprobeError(f"no level '{missing[0]}' among {[lv.name for lv in levels]}")
    parts, lo = [], 0
    for v in chosen:
        parts.append(Part(lo, lo + v.level.channels, v.data, v.native, v.scale))
        lo += v.level.channels
    return EncodedSet(encoded.name, parts, encoded.feat_size, encoded.ids, encoded.skipped, encoded.description)
