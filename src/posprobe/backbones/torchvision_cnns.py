"""The paper's CNNs as presets over ``tv:`` backbones: VGG16 and the ResNets from torchvision, tapped with
FX feature extraction (true activations, not hooks).

A preset fixes the taps (VGG16's relu1_2..relu5_3, the ResNets' layer1..layer4) and its weight name
(``imagenet``); any other FX node can still be chosen with ``layers`` (``--backbone vgg16 --layers
relu4_3,features.10``), and the VGG16 tap names are aliases of their nodes.
"""

from __future__ import annotations

import torchvision
from torch import nn

from .padding import repad
from .registry import Level, register_backbone
from .tv_models import TappedModel, hub_checkpoint, load_imagenet_state, tv_backbone_spec

__all__ = [
    "RESNET_TAPS",
    "VGG16_LEVELS",
    "VGG16_TAPS",
    "TappedModel",
    "hub_checkpoint",
    "load_imagenet_state",
    "remove_conv_padding",
]

VGG16_TAPS = {
    "features.3": "relu1_2",
    "features.8": "relu2_2",
    "features.15": "relu3_3",
    "features.22": "relu4_3",
    "features.29": "relu5_3",
}
VGG16_LEVELS = (
    Level("relu1_2", 64, 1),
    Level("relu2_2", 128, 2),
    Level("relu3_3", 256, 4),
    Level("relu4_3", 512, 8),
    Level("relu5_3", 512, 16),
)
RESNET_TAPS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
IMAGENET_LABEL = {"imagenet": "ImageNet (torchvision IMAGENET1K_V1)"}


def remove_conv_padding(model: nn.Module) -> nn.Module:
    """The paper's "VGG16 without padding": every convolution's padding set to 0, weights kept."""
    repad(model, "valid", type(model).__name__)
    return model


def _imagenet_v1(enum):
    return lambda weights: enum.IMAGENET1K_V1


def _register_vgg16(name: str, description: str, nopad: bool) -> None:
    register_backbone(
        tv_backbone_spec(
            name=name,
            arch="vgg16",
            description=description,
            taps=list(VGG16_TAPS.items()),
            weights_for=_imagenet_v1(torchvision.models.VGG16_Weights),
            weight_names=("imagenet", "random"),
            default_weights="imagenet",
            weight_labels=IMAGENET_LABEL,
            levels=VGG16_LEVELS,
            aliases={level: node for node, level in VGG16_TAPS.items()},
            base_padding="valid" if nopad else None,
        )
    )


_register_vgg16("vgg16", "VGG16 (torchvision), taps relu1_2..relu5_3", nopad=False)
_register_vgg16("vgg16_nopad", "VGG16 with every conv padding set to 0 (same weights)", nopad=True)

for _depth, _wide in [(18, False), (34, False), (50, True), (101, True), (152, True)]:
    _mult = 4 if _wide else 1
    register_backbone(
        tv_backbone_spec(
            name=f"resnet{_depth}",
            arch=f"resnet{_depth}",
            description=f"ResNet-{_depth} (torchvision), taps layer1..layer4",
            taps=list(RESNET_TAPS.items()),
            weights_for=_imagenet_v1(getattr(torchvision.models, f"ResNet{_depth}_Weights")),
            weight_names=("imagenet", "random"),
            default_weights="imagenet",
            weight_labels=IMAGENET_LABEL,
            levels=tuple(Level(f"layer{i}", 64 * 2 ** (i - 1) * _mult, 2 ** (i + 1)) for i in range(1, 5)),
        )
    )
