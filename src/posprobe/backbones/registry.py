"""The backbone registry: named, frozen feature extractors that declare their tapped levels."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import PosprobeError, unknown_choice

INPUT_NORMS = ("none", "imagenet", "weights")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Level:
    """One tapped feature map: its name in the model, channel count and nominal stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and what it yields.

    ``build(weights, seed)`` returns an nn.Module mapping a (B, 3, S, S) image batch to the list of level
    tensors, where ``weights`` is one of ``weight_names`` (other than "random"), "random", or a Path.
    ``weights_file(weights)`` tells where named weights live on disk (None when nothing needs a file).
    ``norm`` is the (mean, std) the weights were trained with (``--input-norm weights``).
    ``exact_strides`` is False where convolutions lose border pixels (no padding), so level sizes are
    smaller than ``input / stride``.
    """

    name: str
    description: str
    levels: tuple[Level, ...]
    build: Callable[[str | Path, int], nn.Module]
    weight_names: tuple[str, ...]
    default_weights: str
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    weights_file: Callable[[str], Path | None] = field(default=lambda w: None)
    weight_labels: dict[str, str] = field(default_factory=dict)
    exact_strides: bool = True

    @property
    def channels(self) -> int:
        return sum(level.channels for level in self.levels)

    def weights_available(self, weights: str | None = None) -> bool:
        """Whether named weights can be loaded here without a download."""
        weights = weights or self.default_weights
        if weights == "random":
            return True
        path = self.weights_file(weights)
        return path is None or path.exists()


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return list(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise unknown_choice("backbone", name, _REGISTRY, "run 'posprobe backbones' to list them")
    return _REGISTRY[name]


class Backbone(nn.Module):
    """A frozen backbone in eval mode: (B, 3, S, S) images in [0, 1] -> list of level tensors.

    Input normalisation happens here so that every caller sees the same preprocessing.
    """

    def __init__(self, spec: BackboneSpec, extractor: nn.Module, weights: str, input_norm: str = "none"):
        super().__init__()
        self.spec, self.extractor, self.weights = spec, extractor, weights
        if input_norm not in INPUT_NORMS:
            raise unknown_choice("input normalisation", input_norm, INPUT_NORMS)
        if input_norm == "weights" and spec.norm is None:
            input_norm = "none"  # e.g. PosENet: nothing was trained on the input
        self.input_norm = input_norm
        mean, std = {"none": ((0.0,) * 3, (1.0,) * 3), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}.get(
            input_norm, spec.norm
        )
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def levels(self) -> tuple[Level, ...]:
        return self.spec.levels

    @property
    def channels(self) -> int:
        return self.spec.channels

    @property
    def weights_label(self) -> str:
        """What the weights are, in words, for reports (a stand-in says so)."""
        return self.spec.weight_labels.get(self.weights, self.weights)

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(False)  # frozen: BatchNorm statistics and dropout never change

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        return list(self.extractor(x))

    @torch.inference_mode()
    def level_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each level for a square input of side image_size."""
        device = self.mean.device
        try:
            levels = self(torch.zeros(1, 3, image_size, image_size, device=device))
        except RuntimeError as err:
            raise PosprobeError(
                f"image size {image_size} is too small for backbone {self.name} "
                f"({str(err).strip().splitlines()[0]}); use a larger --image-size"
            ) from None
        return [tuple(f.shape[1:]) for f in levels]


def _disable_inplace(model: nn.Module) -> nn.Module:
    """Make in-place activations out-of-place so a tapped tensor is never overwritten downstream."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def offline() -> bool:
    return os.environ.get("POSPROBE_OFFLINE", "") not in ("", "0")


def create_backbone(
    name: str, weights: str | Path | None = None, seed: int = 0, input_norm: str = "none"
) -> Backbone:
    """Build the frozen backbone ``name`` with ``weights`` (a name it knows, "random", or a checkpoint path).

    Random weights are drawn from a generator seeded with ``seed`` and leave the global RNG untouched.
    """
    spec = get_backbone_spec(name)
    weights = spec.default_weights if weights is None else weights
    key: str | Path
    if str(weights) in spec.weight_names or str(weights) == "random":
        key = str(weights)
    elif Path(str(weights)).expanduser().is_file():
        key = Path(str(weights)).expanduser()
    else:
        named = [w for w in spec.weight_names if w != "random"] + ["random"]
        raise PosprobeError(
            f"unknown weights '{weights}' for backbone {name}; expected one of {', '.join(named)}, "
            "or the path of an existing checkpoint file"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extractor = spec.build(key, seed)
    label = str(key) if isinstance(key, Path) else key
    return Backbone(spec, _disable_inplace(extractor), label, input_norm)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint (plain, or wrapped under 'state_dict' / 'model')."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise PosprobeError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PosprobeError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path, optional=("classifier", "fc")) -> None:
    """Load ``state`` into ``model``; every parameter outside the ``optional`` heads must be present."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise PosprobeError(f"checkpoint {source} does not fit the model: {first}") from None
    missing = [k for k in result.missing_keys if not k.startswith(tuple(o + "." for o in optional))]
    if missing:
        raise PosprobeError(
            f"checkpoint {source} lacks {len(missing)} of the model's tensors (first: {missing[0]})"
        )
