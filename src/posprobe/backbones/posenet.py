"""PosENet alone: the raw image is the only level, so the readout sees pixels and nothing else.

This is the paper's control: with no padding anywhere, no absolute position can be read out.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import BackboneSpec, Level, register_backbone


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


register_backbone(
    BackboneSpec(
        name="posenet",
        description="no encoder: the readout sees the raw RGB image (the paper's control)",
        levels=(Level("image", 3, 1),),
        build=lambda weights, seed: Identity(),
        weight_names=("none", "random"),
        default_weights="none",
        weight_labels={"none": "none (no encoder)", "random": "none (no encoder)"},
    )
)
