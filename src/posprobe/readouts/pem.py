"""The position encoding module (PEM): the tiny trainable readout of PAPER.md.

Every tapped level is resized bilinearly (align_corners=True) to ``feat_size`` and concatenated on
channels; then ``depth`` convolutions of kernel ``k`` and padding ``p``: intermediate layers are
Conv(C->C) + BatchNorm + ReLU (``width`` channels instead of C when given), the last is Conv(->1) +
BatchNorm(1) + Sigmoid. Weights are
Xavier-uniform, biases zero. The map is upsampled bilinearly (align_corners=False) to ``out_size``.

``align`` is split from the trainable ``head`` so a frozen encoder's aligned features can be computed
once and reused by any number of readouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PosprobeError
from ..features.parts import align


def readout_map_size(feat_size: int, kernel_size: int, depth: int, padding: int) -> int:
    """Side of the readout's map before upsampling: each conv maps n -> n + 2p - k + 1."""
    return feat_size + depth * (2 * padding - kernel_size + 1)


def check_readout_config(feat_size: int, kernel_size: int, depth: int, padding: int) -> None:
    """Refuse settings that cannot produce a map, with the arithmetic in the message."""
    if kernel_size < 1 or depth < 1 or padding < 0 or feat_size < 1:
        raise PosprobeError(
            "readout needs kernel_size >= 1, depth >= 1, padding >= 0 and feat_size >= 1; "
            f"given kernel_size={kernel_size}, depth={depth}, padding={padding}, feat_size={feat_size}"
        )
    side = readout_map_size(feat_size, kernel_size, depth, padding)
    if side < 1:
        raise PosprobeError(
            f"impossible readout: {depth} conv layer(s) of kernel {kernel_size} with padding {padding} "
            f"shrink a {feat_size}x{feat_size} feature map to {side}x{side}; use a smaller kernel or depth, "
            "more padding, or a larger --feat-size"
        )


class UpsampledHead(nn.Module):
    """A readout whose ``forward_aligned`` is ``upsample(head(x))``: training may take its loss on the small map
    and fuse the first convolution of ``head`` with other readouts' (joint.py)."""


class Readout(UpsampledHead):
    """PEM readout: list of level tensors -> (B, 1, out_size, out_size) map in [0, 1]."""

    def __init__(
        self,
        in_channels: int,
        kernel_size: int = 3,
        depth: int = 1,
        padding: int = 0,
        feat_size: int = 28,
        out_size: int = 224,
        width: int | None = None,
    ) -> None:
        super().__init__()
        check_readout_config(feat_size, kernel_size, depth, padding)
        if width is not None and width < 1:
            raise PosprobeError(f"readout width must be >= 1 (or unset for C->C layers); given {width}")
        self.in_channels, self.kernel_size, self.depth, self.padding = in_channels, kernel_size, depth, padding
        self.feat_size, self.out_size = feat_size, out_size
        self.width = in_channels if width is None else width  # only depth > 1 readouts have intermediate layers
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(channels, self.width, kernel_size, padding=padding),
                nn.BatchNorm2d(self.width),
                nn.ReLU(),
            ]
            channels = self.width
        layers += [nn.Conv2d(channels, 1, kernel_size, padding=padding), nn.BatchNorm2d(1), nn.Sigmoid()]
        self.head = nn.Sequential(*layers)
        for m in self.head:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, fs, fs) aligned features -> (B, 1, out_size, out_size)."""
        y = self.head(x)  # (B, 1, s, s), s = readout_map_size(...)
        return F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(levels, torch.Tensor):
            levels = [levels]
        return self.forward_aligned(align(levels, self.feat_size))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, kernel_size={self.kernel_size}, depth={self.depth}, "
            f"padding={self.padding}, feat_size={self.feat_size}, out_size={self.out_size}"
            + (f", width={self.width}" if self.depth > 1 else "")
        )
