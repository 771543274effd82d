"""Maps of the image-independent spatial structure in a level: the mean feature map over natural images, and
what the network draws on a blank, content-free input.

A convolution over a constant image computes the same thing everywhere except where its window meets the
padding: whatever structure a blank input's features show is the padding's (Alsallakh et al., "Mind the Pad --
CNNs Can Develop Blind Spots", ICLR 2021). Vision transformers show position-tied artefacts of their own, from
the position embedding, that survive any content (Yang et al., "Denoising Vision Transformers", ECCV 2024).
The mean map shows the same structure on natural images, where content averages out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones import Backbone
from ..errors import PosprobeError
from ..features.encode import EncodedSet
from ..features.levels import level_views
from .position_variance import MAX_BYTES


def mean_map(features: torch.Tensor, scale: float = 1.0, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """(h, w): the mean over images and channels of each channel standardised by its total standard deviation
    (over images and locations), so that no channel dominates by its scale; constant (dead) channels are left out.
    Content averages out over images: what stays is the level's image-independent structure (border artefacts)."""
    if features.dim() != 4:
        raise PosprobeError(f"features must be (N, C, h, w); got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    step = max(1, max_bytes // (n * h * w * 8))
    acc, live = torch.zeros(h, w, dtype=torch.float64), 0
    for c0 in range(0, c, step):
        x = features[:, c0 : c0 + step].to(dtype=torch.float64, memory_format=torch.contiguous_format) * scale
        keep = x.amax((0, 2, 3)) != x.amin((0, 2, 3))  # (k,) not dead
        x = x[:, keep]
        mu, sd = x.mean((0, 2, 3)), x.std((0, 2, 3), correction=0)  # (k,) per channel, over images and locations
        acc += ((x.mean(0) - mu[:, None, None]) / sd[:, None, None]).sum(0)
        live += int(keep.sum())
    return (acc / live if live else acc * math.nan).numpy()


@dataclass(frozen=True)
class BlankMap:
    """One level's features on a constant input of ``value``: ``map`` (h, w) is the RMS over channels of each
    channel's deviation from its own spatial mean, in units of natural variation when a reference was given
    (``units``); ``blank_position_ratio`` = sum_c spatial variance on the blank / sum_c V_tot(c) on natural images."""

    level: str
    value: float
    size: tuple[int, int]
    map: np.ndarray
    units: str
    blank_position_ratio: float
    resolution: str

    def to_dict(self) -> dict:
        ratio = self.blank_position_ratio
        return {
            "level": self.level,
            "value": self.value,
            "size": list(self.size),
            "units": self.units,
            "resolution": self.resolution,
            "blank_position_ratio": ratio if math.isfinite(ratio) else None,
            "map": self.map.tolist(),
        }


@torch.inference_mode()
def blank_maps(
    backbone: Backbone,
    image_size: int,
    values: Sequence[float] = (0.0, 1.0),
    reference_std: Mapping[str, float] | None = None,
    feat_size: int | None = None,
) -> list[BlankMap]:
    """Per level and constant input value v (the image filled with v in [0, 1]; the backbone normalises it), the
    map of the padding's artefact. ``reference_std[level]``: the level's RMS over channels of the per-channel total
    std on natural images (``PositionVariance.reference_std``), which makes the maps and the ratio comparable
    across levels. With ``feat_size`` each level is measured as the feature cache stores it (aligned to feat_size
    unless alignment would upsample it), the resolution the natural images' measures were taken at."""
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise PosprobeError(f"a blank input's value must be in [0, 1]; given {v}")
    device = backbone.mean.device
    x = torch.stack([torch.full((3, image_size, image_size), float(v), device=device) for v in values])  # (V, 3, S, S)
    levels = [f.double().cpu() for f in backbone(x)]
    if feat_size is None:
        views = [(lv.name, f, "native") for lv, f in zip(backbone.levels, levels)]
    else:
        encoded = EncodedSet.from_levels("blank", levels, feat_size, [str(v) for v in values])
        native = {lv.name: f.shape[-2:] for lv, f in zip(backbone.levels, levels)}
        views = [
            (v.level.name, v.data * v.scale, v.resolution(tuple(native[v.level.name])))
            for v in level_views(encoded, backbone.levels)
        ]
    out = []
    for name, f, resolution in views:
        dev = f - f.mean((2, 3), keepdim=True)  # (V, C, h, w) each channel minus its spatial mean
        power = dev.pow(2).mean(1)  # (V, h, w) mean over channels of the squared deviation
        ref = (reference_std or {}).get(name)
        for i, v in enumerate(values):
            rms = power[i].sqrt()
            if ref is None:
                out.append(
                    BlankMap(name, float(v), tuple(rms.shape), rms.numpy(), "feature units", math.nan, resolution)
                )
                continue
            ratio = float(power[i].mean()) / ref**2 if ref > 0 else math.nan  # sum_c spatial var / sum_c V_tot
            unit = rms / ref if ref > 0 else rms * math.nan
            out.append(BlankMap(name, float(v), tuple(rms.shape), unit.numpy(), "natural std", ratio, resolution))
    return out
