"""VGG16 and ResNets from torchvision, tapped with FX feature extraction (true activations, not hooks)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from ..errors import PosprobeError
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    Level,
    load_into,
    load_state_dict_file,
    offline,
    register_backbone,
)

VGG16_TAPS = {"features.3": "relu1_2", "features.8": "relu2_2", "features.15": "relu3_3",
              "features.22": "relu4_3", "features.29": "relu5_3"}  # fmt: skip
VGG16_LEVELS = (Level("relu1_2", 64, 1), Level("relu2_2", 128, 2), Level("relu3_3", 256, 4),
                Level("relu4_3", 512, 8), Level("relu5_3", 512, 16))  # fmt: skip
RESNET_TAPS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}


class TappedModel(nn.Module):
    """FX-extracted graph returning the tapped nodes as a list in declared order."""

    def __init__(self, model: nn.Module, taps: dict[str, str]):
        super().__init__()
        self.graph_module = create_feature_extractor(model, return_nodes=dict(taps))
        self.names = list(taps.values())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.graph_module(x)
        return [out[n] for n in self.names]


def hub_checkpoint(weights_enum) -> Path:
    """Where torchvision's weights API keeps (or would download) this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name


def load_imagenet_state(model_name: str, weights_enum) -> dict[str, torch.Tensor]:
    """torchvision ImageNet weights from the hub cache, downloading only when allowed and reachable."""
    path = hub_checkpoint(weights_enum)
    if not path.exists() and not offline():
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch.hub announces downloads on stderr
                return weights_enum.get_state_dict(progress=False, check_hash=True)
        except Exception:  # noqa: BLE001 - no network, proxy, DNS...: all mean "not available here"
            pass
    if not path.exists():
        raise PosprobeError(
            f"ImageNet weights for {model_name} are not available offline: put {path.name} "
            f"(from {weights_enum.url}) in {path.parent}, or pass --weights random or a checkpoint path"
        )
    return load_state_dict_file(path)


def _torchvision_builder(arch: str, weights_enum, taps: dict[str, str], nopad: bool = False):
    def build(weights: str | Path, seed: int) -> nn.Module:
        model = getattr(torchvision.models, arch)(weights=None)
        if weights == "imagenet":
            load_into(model, load_imagenet_state(arch, weights_enum), hub_checkpoint(weights_enum))
        elif isinstance(weights, Path):
            load_into(model, load_state_dict_file(weights), weights)
        if nopad:
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.padding = (0, 0)
        return TappedModel(model, taps)

    return build


def _register_vgg16(name: str, description: str, nopad: bool) -> None:
    enum = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    register_backbone(BackboneSpec(
        name=name, description=description, levels=VGG16_LEVELS,
        build=_torchvision_builder("vgg16", enum, VGG16_TAPS, nopad=nopad),
        weight_names=("imagenet", "random"), default_weights="imagenet",
        norm=(IMAGENET_MEAN, IMAGENET_STD), weights_file=lambda w, e=enum: hub_checkpoint(e) if w == "imagenet" else None,
        weight_labels={"imagenet": "ImageNet (torchvision IMAGENET1K_V1)"}, exact_strides=not nopad,
    ))  # fmt: skip


_register_vgg16("vgg16", "VGG16 (torchvision), taps relu1_2..relu5_3", nopad=False)
_register_vgg16("vgg16_nopad", "VGG16 with every conv padding set to 0 (same weights)", nopad=True)

for _depth, _enum_name, _wide in [(18, "ResNet18_Weights", False), (34, "ResNet34_Weights", False),
                                  (50, "ResNet50_Weights", True), (101, "ResNet101_Weights", True),
                                  (152, "ResNet152_Weights", True)]:  # fmt: skip
    _enum = getattr(torchvision.models, _enum_name).IMAGENET1K_V1
    _mult = 4 if _wide else 1
    register_backbone(BackboneSpec(
        name=f"resnet{_depth}", description=f"ResNet-{_depth} (torchvision), taps layer1..layer4",
        levels=tuple(Level(f"layer{i}", 64 * 2 ** (i - 1) * _mult, 2 ** (i + 1)) for i in range(1, 5)),
        build=_torchvision_builder(f"resnet{_depth}", _enum, RESNET_TAPS),
        weight_names=("imagenet", "random"), default_weights="imagenet",
        norm=(IMAGENET_MEAN, IMAGENET_STD),
        weights_file=lambda w, e=_enum: hub_checkpoint(e) if w == "imagenet" else None,
        weight_labels={"imagenet": "ImageNet (torchvision IMAGENET1K_V1)"},
    ))  # fmt: skip
