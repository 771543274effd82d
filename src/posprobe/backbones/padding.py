"""Padding surgery: re-pad every convolution and pooling layer of a loaded model, keeping its weights.

The paper's strongest finding is that zero padding is where CNNs get absolute position from, shown with
one model ("VGG16 without padding"). ``repad`` asks the same question of any CNN: the border is filled
with zeros, by reflection, by replication, by wrapping around (circular: a translation-equivariant torus,
no border at all) or not at all (valid: every padded layer loses its border pixels).

Without padding a residual block's two branches no longer have the same size. Where the model is an FX
graph (every ``tv:`` backbone and the torchvision presets) each sum and concatenation is rewritten to
centre-crop the larger operand (the skip) to the smaller one, so ``valid`` works on ResNets, ConvNeXts and
DenseNets alike. Other models (timm, custom forwards) are refused with the mismatch named: the dry run's
shape error is caught and explained by ``explain_forward_error``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import PosprobeError, unknown_choice

BACKBONE_PADDINGS = ("zeros", "reflect", "replicate", "circular", "valid")
_PAD_LAYERS = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
# Layers that compute TF-style "same" padding inside their forward from the input size: nothing to rewrite.
_DYNAMIC_SAME = (
    "Conv2dSame",
    "Conv2dSameExport",
    "MaxPool2dSame",
    "AvgPool2dSame",
    "Conv2dDynamicSamePadding",
    "MaxPool2dDynamicSamePadding",
)


@dataclass(frozen=True)
class PaddingReport:
    """What ``repad`` changed: counts of rewritten layers and of skip connections that now centre-crop."""

    mode: str
    convs: int
    pools: int
    pad_layers: int
    cropping_skips: int
    traced: bool  # the model is (or holds) an FX graph, whose skips can be cropped

    def describe(self) -> str:
        parts = f"{self.convs} conv(s), {self.pools} pooling layer(s), {self.pad_layers} padding layer(s)"
        line = f"backbone padding {self.mode}: rewrote {parts}"
        if self.mode == "valid" and self.cropping_skips:
            line += (
                f"; {self.cropping_skips} sum/concatenation node(s) centre-crop the larger operand where sizes differ"
            )
        elif self.mode == "valid" and not self.traced:
            line += "; not an FX graph, so a residual sum whose branches no longer match is refused"
        return line

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}


class PaddedPool(nn.Module):
    """Pads with ``mode`` and then pools without padding: pooling layers have no padding_mode of their own."""

    def __init__(self, pool: nn.Module, mode: str):
        super().__init__()
        ph, pw = _pair(pool.padding)
        self.pad, self.mode = (pw, pw, ph, ph), mode  # F.pad order: left, right, top, bottom
        pool.padding = 0
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.pad(x, self.pad, mode=self.mode))

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}"


def _pair(p) -> tuple[int, int]:
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def _pads(padding) -> bool:
    """Whether a conv/pool ``padding`` attribute adds any border ('same' counts, 'valid' does not)."""
    if isinstance(padding, str):
        return padding == "same"
    return any(int(p) for p in ((padding,) if isinstance(padding, int) else padding))


def _new_pad_layer(padding: tuple[int, ...], mode: str) -> nn.Module:
    if mode == "valid":
        return nn.Identity()
    cls = {
        "zeros": nn.ZeroPad2d,
        "reflect": nn.ReflectionPad2d,
        "replicate": nn.ReplicationPad2d,
        "circular": nn.CircularPad2d,
    }[mode]
    return cls(padding)


def _set_child(model: nn.Module, qualified: str, child: nn.Module) -> None:
    parent_name, _, attr = qualified.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


WRAPPERS = ("extractor", "graph_module", "model")  # posprobe's own wrapper modules around a network


def short_module_name(name: str) -> str:
    """A module's name inside the user's network: extractor.graph_module.layer1.0.conv1 -> layer1.0.conv1."""
    while "." in name and name.split(".", 1)[0] in WRAPPERS:
        name = name.split(".", 1)[1]
    return name


def check_padding_mode(mode: str) -> str:
    if mode not in BACKBONE_PADDINGS:
        raise unknown_choice("backbone padding", mode, BACKBONE_PADDINGS)
    return mode


def repad(model: nn.Module, mode: str, backbone: str = "the backbone") -> PaddingReport:
    """Rewrite every padded Conv2d, MaxPool2d/AvgPool2d and padding layer of ``model`` in place.

    ``zeros``/``reflect``/``replicate``/``circular`` set the convolutions' padding_mode (pooling layers
    keep their own padding under ``zeros`` and are wrapped in ``PaddedPool`` otherwise); ``valid`` sets
    every padding to 0. Weights are untouched. Raises PosprobeError where nothing pads or a layer pads
    inside its own forward.
    """
    check_padding_mode(mode)
    convs = pools = pad_layers = 0
    for name, m in list(model.named_modules()):
        if type(m).__name__ in _DYNAMIC_SAME:
            raise PosprobeError(
                f"{backbone} pads inside {short_module_name(name)} ({type(m).__name__}, TensorFlow 'same' padding "
                "computed per input), which --backbone-padding cannot rewrite; use a model without the 'tf_' prefix"
            )
        if isinstance(m, nn.Conv2d) and _pads(m.padding):
            if mode == "valid":
                m.padding = (0, 0)
                m._reversed_padding_repeated_twice = [0, 0, 0, 0]
            else:
                m.padding_mode = mode
            convs += 1
        elif isinstance(m, _POOLS) and _pads(m.padding):
            if mode == "valid":
                m.padding = 0
            elif mode != "zeros":  # a max pool's own padding is -inf, an avg pool's is 0: "zeros" keeps both
                _set_child(model, name, PaddedPool(m, mode))
            pools += 1
        elif isinstance(m, _PAD_LAYERS):
            _set_child(model, name, _new_pad_layer(tuple(m.padding), mode))
            pad_layers += 1
    if convs + pools + pad_layers == 0:
        raise PosprobeError(
            f"{backbone} has no padded convolution, pooling or padding layer for --backbone-padding {mode} to "
            "rewrite (vision transformers embed patches without padding); leave --backbone-padding unset"
        )
    graphs = [gm for gm in model.modules() if isinstance(gm, fx.GraphModule)]
    crops = sum(crop_skips(gm) for gm in graphs) if mode == "valid" else 0
    return PaddingReport(mode, convs, pools, pad_layers, crops, traced=bool(graphs))


# ---- centre-cropping skips in FX graphs ----------------------------------------------------------------


def _centre_crop(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (t.shape[-2] - h) // 2, (t.shape[-1] - w) // 2
    return t[..., top : top + h, left : left + w]


def _spatial_mismatch(tensors, broadcast: bool) -> tuple[int, int] | None:
    """The common (h, w) to crop to when maps of different spatial sizes meet; else None.

    Under ``broadcast`` (a sum) a 1x1 operand such as a (B, C, 1, 1) gate is broadcast, not a map to crop to.
    """
    maps = [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() >= 3]
    if len(maps) < 2:
        return None
    sizes = {tuple(t.shape[-2:]) for t in maps}
    if len(sizes) == 1 or (broadcast and any(1 in s for s in sizes)):
        return None
    return min(s[0] for s in sizes), min(s[1] for s in sizes)


def cropping_add(a, b, *args, **kwargs):
    """a + b, centre-cropping the larger map (the skip) when valid padding shrank the other branch."""
    size = _spatial_mismatch((a, b), broadcast=True)
    if size is not None:
        a, b = _centre_crop(a, *size), _centre_crop(b, *size)
    return torch.add(a, b, *args, **kwargs)


def cropping_cat(tensors, dim: int = 0, *args, **kwargs):
    """torch.cat on maps centre-cropped to the smallest (a DenseNet's concatenated features)."""
    size = _spatial_mismatch(tensors, broadcast=False) if dim in (1, -3) else None
    if size is not None:
        tensors = [_centre_crop(t, *size) for t in tensors]
    return torch.cat(tensors, dim, *args, **kwargs)


def crop_skips(gm: fx.GraphModule) -> int:
    """Point every sum and concatenation of ``gm`` at the cropping versions; returns how many."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
            node.target, n = cropping_add, n + 1
        elif node.op == "call_function" and node.target in (torch.cat, torch.concat):
            node.target, n = cropping_cat, n + 1
    if n:
        gm.recompile()
    return n


# ---- explaining a failed dry run --------------------------------------------------------------------------


def explain_forward_error(
    err: Exception, backbone: str, image_size: int, padding: str | None, where: str | None
) -> PosprobeError:
    """One line saying why a forward pass at ``image_size`` failed: a broken skip, a too-large pad, a tiny input."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    at = f" after {where}" if where else ""
    if "out of memory" in first:
        return PosprobeError(
            f"backbone {backbone} ran out of memory on a {image_size}x{image_size} input{at}; "
            "use a smaller --image-size or another --device"
        )
    broken_skip = r"must match the size|[Ss]izes of tensors must match|broadcast a dimension"
    if padding == "valid" and re.search(broken_skip, first):
        return PosprobeError(
            f"--backbone-padding valid breaks a residual connection of {backbone}{at} ({first}); refused: "
            "skips are centre-cropped only in FX-traced models (tv: names and the torchvision presets), "
            "so use the tv: version of this network or another --backbone-padding"
        )
    if padding in ("reflect", "replicate", "circular") and re.search(r"[Pp]adding", first):
        return PosprobeError(
            f"{padding} padding of {backbone} needs every padded map larger than its padding{at} ({first}); "
            "use a larger --image-size"
        )
    if isinstance(err, AssertionError):
        return PosprobeError(
            f"backbone {backbone} refuses a {image_size}x{image_size} input{at} ({first}); it may take only the "
            "input size it was built for"
        )
    return PosprobeError(
        f"image size {image_size} is too small for backbone {backbone}{at} ({first}); use a larger --image-size"
    )
