"""The backbone registry: named, frozen feature extractors that declare their tapped levels.

Registered names (``vgg16``, ``resnet50``...) are presets. Prefixed names (``tv:resnet50``,
``timm:convnext_tiny``) are resolved on demand by the family that owns the prefix (``register_resolver``),
so any torchvision or timm model is a backbone without being registered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import PosprobeError, unknown_choice
from .padding import PaddingReport, check_padding_mode, explain_forward_error, repad, short_module_name
from .pos_embed import check_pos_embed_mode, set_pos_embed

INPUT_NORMS = ("none", "imagenet", "weights", "paper")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NonFiniteFeatures(PosprobeError):
    """A level of the encoder's output (or its input) holds a NaN or an infinity: ``Backbone.forward`` stops
    at the first such level, so no readout trains on it and no score comes of it. ``rows`` are the batch
    rows that hold one; ``named`` turns them into image ids (``features.encode.encode_batches`` knows those)."""

    def __init__(self, backbone: str, level: str, rows: list[int], value: str, batch: int):
        self.backbone, self.level, self.rows, self.value, self.batch = backbone, level, rows, value, batch
        super().__init__(self._line(f"in rows {_listed([str(r) for r in rows])} of a batch of {batch}"))

    def _line(self, where: str) -> str:
        what = (
            "the input images are not finite"
            if self.level == "<input>"
            else f"{self.backbone} features are not finite at level '{self.level}'"
        )
        return (
            f"{what} ({self.value}) {where}: nothing trained on or scored from them; check the weights "
            "(a checkpoint whose values overflow float32) and the input images"
        )

    def named(self, ids: Sequence[str], set_name: str = "") -> PosprobeError:
        """The same error naming the images (``ids`` of the batch rows), for the one line a user sees."""
        images = _listed([str(ids[r]) for r in self.rows if r < len(ids)])
        return PosprobeError(self._line(f"for image(s) {images}" + (f" of {set_name}" if set_name else "")))


def _listed(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_finite_levels(
    levels: Sequence[torch.Tensor], names: Sequence[str], backbone: str, images: torch.Tensor | None = None
) -> None:
    """Raise ``NonFiniteFeatures`` for the first of ``images`` and ``levels`` that holds a NaN or an infinity.

    A sum per tensor and one host sync for them all: a NaN or an infinity makes a sum non-finite, and a finite
    sum means every value is finite. Only a non-finite sum (or one that overflowed) is checked value by value.
    Summing reads the levels at memory speed, 5-15x faster than ``isfinite().all()`` (which writes a mask and
    reduces it). Measured on 2 busy CPU cores, a batch of 16 at 224: 40-50 ms per batch for ResNet-18 (24 MB of
    levels), VGG16 (392 MB) and ResNet-152 (96 MB), 0.5-4% of their forward passes (1 s, 5.9 s, 8.5 s);
    ``isfinite().all()`` took 200, 660 and 230 ms."""
    tensors = ([images] if images is not None else []) + list(levels)
    labels = (["<input>"] if images is not None else []) + [
        names[i] if i < len(names) else f"#{i}" for i in range(len(levels))
    ]
    sums = torch.stack([_sum(t) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return
    finite = [bool(torch.isfinite(t).all()) for t in tensors]  # a sum may overflow: the values decide
    if all(finite):
        return
    i = finite.index(False)
    bad = ~torch.isfinite(tensors[i])
    rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
    value = "NaN" if bool(torch.isnan(tensors[i]).any()) else "inf"
    raise NonFiniteFeatures(backbone, labels[i], rows, value, tensors[i].shape[0])


def _sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor's values, in float32 at least (half-precision values overflow float16 sums)."""
    if not t.is_floating_point():
        return torch.zeros((), device=t.device)
    return t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).to(torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity (a sum first: at memory speed when it does not)."""
    return bool(torch.isfinite(_sum(t))) or bool(torch.isfinite(t).all())


def check_finite_state(state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Refuse a checkpoint that holds a NaN or an infinity, naming the first such tensor (one pass over it)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite(value):
            bad = ~torch.isfinite(value)
            what = "NaN" if bool(torch.isnan(value).any()) else "inf"
            raise PosprobeError(
                f"checkpoint {source} holds non-finite values ({int(bad.sum())} {what} of {value.numel()}) in "
                f"tensor '{key}', the first such tensor; refusing to encode with it"
            )


@dataclass(frozen=True)
class Level:
    """One tapped feature map: its name in the model, channel count and nominal stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class LayerInfo:
    """One layer a backbone can tap, as ``posprobe layers`` lists it.

    ``stride`` is nominal (input side / map side with the model's own padding); ``size`` is the map's
    (height, width) at the listed input size, after any padding surgery. ``default`` marks the taps used
    when no ``layers`` are given; ``aliases`` are other names that select the same tensor.
    """

    name: str
    channels: int
    stride: int
    size: tuple[int, int]
    aliases: tuple[str, ...] = ()
    default: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and what it yields.

    ``build(weights, seed)`` returns an nn.Module mapping a (B, 3, S, S) image batch to the list of level
    tensors, where ``weights`` is one of ``weight_names`` (other than "random"), "random", or a Path.
    ``weights_file(weights)`` tells where named weights live on disk (None when nothing needs a file).
    ``norm`` is the (mean, std) the weights were trained with (``--input-norm weights``).
    ``exact_strides`` is False where convolutions lose border pixels (no padding), so level sizes are
    smaller than ``input / stride``.
    ``select(names)`` returns the spec tapping those layers instead (None: any subset of ``levels``);
    ``layer_table(image_size, padding)`` lists every tappable layer (None: ``levels``, sized by a dry run).
    ``interpolation`` is how the weights' training images were resized (recorded, for ``--input-norm
    weights``); ``input_size`` is the side a fixed-size model (ViT, Swin) was built for (None: any).
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
    select: Callable[[tuple[str, ...]], BackboneSpec] | None = None
    layer_table: Callable[[int, str | None], list[LayerInfo]] | None = None
    interpolation: str | None = None
    input_size: int | None = None

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
# prefix -> resolver(model name, image size or None) -> spec, for the "prefix:model" names
_RESOLVERS: dict[str, Callable[[str, int | None], BackboneSpec]] = {}


def register_backbone(spec: BackboneSpec, replace: bool = False) -> BackboneSpec:
    """Make ``spec`` available by its name (``posprobe backbones`` lists it, ``create_backbone`` builds it).

    A name already registered is refused unless ``replace``: two plug-ins choosing the same name would
    otherwise silently change what a study ran. Its levels must be distinct, with channels and strides >= 1.
    """
    if not spec.name or ":" in spec.name:
        raise PosprobeError(
            f"a backbone name must be non-empty and without ':' (kept for tv:/timm:); given '{spec.name}'"
        )
    if spec.name in _REGISTRY and not replace:
        raise PosprobeError(f"backbone '{spec.name}' is already registered; pass replace=True to replace it")
    names = [lv.name for lv in spec.levels]
    bad = [lv for lv in spec.levels if lv.channels < 1 or lv.stride < 1]
    if not names or len(set(names)) != len(names) or bad:
        raise PosprobeError(
            f"backbone '{spec.name}' needs at least one level, distinct level names and channels and strides >= 1; "
            f"given {[(lv.name, lv.channels, lv.stride) for lv in spec.levels]}"
        )
    if spec.default_weights not in (*spec.weight_names, "random"):
        raise PosprobeError(
            f"backbone '{spec.name}': default weights '{spec.default_weights}' are not among its weight names "
            f"{list(spec.weight_names)} or 'random'"
        )
    _REGISTRY[spec.name] = spec
    return spec


def register_resolver(prefix: str, resolver: Callable[[str, int | None], BackboneSpec]) -> None:
    """Make every ``prefix:MODEL`` name a backbone, built by ``resolver(MODEL, image_size)`` on demand."""
    _RESOLVERS[prefix] = resolver


def list_backbones() -> list[str]:
    """Names of every registered backbone (the presets; ``tv:`` and ``timm:`` names are resolved on demand)."""
    return list(_REGISTRY)


def get_backbone_spec(name: str, image_size: int | None = None) -> BackboneSpec:
    """The spec of a preset or of a ``prefix:MODEL`` name.

    ``image_size`` matters only for models built for one input size (a timm ViT or Swin is created for
    it, so its position embedding has exactly one vector per patch of that grid).
    """
    prefix, sep, model = name.partition(":")
    if sep:
        if prefix not in _RESOLVERS:
            raise unknown_choice(
                "backbone family",
                f"{prefix}:",
                [f"{p}:" for p in _RESOLVERS],
                "write tv:MODEL for a torchvision model or timm:MODEL for a timm model",
            )
        if not model:
            raise PosprobeError(f"backbone '{name}' names no model; expected {prefix}:MODEL, e.g. {prefix}:resnet18")
        return _RESOLVERS[prefix](model, image_size)
    if name not in _REGISTRY:
        raise unknown_choice(
            "backbone", name, _REGISTRY, "run 'posprobe backbones' to list them, or write tv:MODEL / timm:MODEL"
        )
    return _REGISTRY[name]


def parse_layers(layers: str | Sequence[str]) -> tuple[str, ...]:
    """'layer2,layer4' or ['layer2', 'layer4'] -> ('layer2', 'layer4'); refuses empty lists and repeats."""
    items = layers.split(",") if isinstance(layers, str) else [x for item in layers for x in str(item).split(",")]
    names = tuple(x.strip() for x in items if x.strip())
    if not names:
        raise PosprobeError("--layers names no layer; expected a comma list such as layer2,layer4, or all")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PosprobeError(f"--layers lists '{repeated[0]}' more than once; name each layer once")
    return names


class SelectLevels(nn.Module):
    """An extractor's outputs, restricted to some of its levels (by index, in order)."""

    def __init__(self, extractor: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.extractor, self.indices = extractor, list(indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = list(self.extractor(x))
        return [levels[i] for i in self.indices]


def select_layers(spec: BackboneSpec, layers: str | Sequence[str]) -> BackboneSpec:
    """The spec tapping only ``layers`` (names or aliases its family accepts, or 'all'), in network order."""
    names = parse_layers(layers)
    if spec.select is not None:
        return spec.select(names)
    by_name = {level.name: i for i, level in enumerate(spec.levels)}
    if names == ("all",):
        return spec
    for n in names:
        if n not in by_name:
            raise unknown_choice(
                f"layer of {spec.name}", n, [*by_name, "all"], f"run 'posprobe layers {spec.name}' to list them"
            )
    indices = sorted(by_name[n] for n in names)
    build = spec.build
    return replace(
        spec,
        levels=tuple(spec.levels[i] for i in indices),
        build=lambda weights, seed: SelectLevels(build(weights, seed), indices),
    )


class Backbone(nn.Module):
    """A frozen backbone in eval mode: (B, 3, S, S) images in [0, 1] -> list of level tensors.

    Input normalisation happens here so that every caller sees the same preprocessing.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        extractor: nn.Module,
        weights: str,
        input_norm: str = "paper",
        *,
        padding: PaddingReport | None = None,
        pos_embed: str | None = None,
    ):
        super().__init__()
        self.spec, self.extractor, self.weights = spec, extractor, weights
        self.padding_report = padding  # what --backbone-padding rewrote (None: untouched)
        self.pos_embed_note = pos_embed  # what --pos-embed did, in words (None: untouched)
        if input_norm not in INPUT_NORMS:
            raise unknown_choice("input normalisation", input_norm, INPUT_NORMS)
        if input_norm in ("weights", "paper") and spec.norm is None:
            input_norm = "none"  # e.g. PosENet: nothing was trained on the input
        if input_norm == "paper" and weights == "random":
            input_norm = "none"  # the authors' [0, 1]: random weights expect no normalisation
        self.input_norm = input_norm
        if input_norm == "none":
            mean, std = (0.0,) * 3, (1.0,) * 3
        elif input_norm == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        elif input_norm == "paper":  # x * (ImageNet std / the weights' std): the authors' mismatch, carried over
            mean, std = (0.0,) * 3, tuple(w / r for w, r in zip(spec.norm[1], IMAGENET_STD))
        else:
            mean, std = spec.norm
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
    def padding(self) -> str | None:
        """The --backbone-padding this backbone was re-padded with (None: the model's own padding)."""
        return self.padding_report.mode if self.padding_report else None

    @property
    def interpolation(self) -> str | None:
        return self.spec.interpolation

    @property
    def input_description(self) -> str:
        """What the encoder is fed, in words, for reports and config.json."""
        scale = ", ".join(f"{1 / s:.4g}" for s in self.std.flatten().tolist())
        mean = ", ".join(f"{m:.4g}" for m in self.mean.flatten().tolist())
        return {
            "none": "RGB in [0, 1], no normalisation (the authors' code)",
            "imagenet": "(RGB in [0, 1] - ImageNet mean) / ImageNet std",
            "weights": f"the weights' own normalisation: (RGB in [0, 1] - ({mean})) x ({scale})",
            "paper": f"RGB in [0, 1] x ({scale}), no mean subtracted: the input mismatch the authors' code gives an "
            "ImageNet network ([0, 1] where it expects (x - mean) / std), carried over to these weights' "
            "own normalisation (x ImageNet std / the weights' std)",
        }[self.input_norm]

    @property
    def weights_label(self) -> str:
        """What the weights are, in words, for reports (a stand-in says so)."""
        return self.spec.weight_labels.get(self.weights, self.weights)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen: BatchNorm statistics and dropout never change

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The levels of ``images``; a NaN or an infinity in the input or any level raises ``NonFiniteFeatures``
        naming the first (every encoding path, in memory, cached or streamed, comes through here)."""
        x = (images - self.mean) / self.std
        try:
            levels = list(self.extractor(x))
        except (RuntimeError, AssertionError):
            explained_forward(self.extractor, x[:1], self.name, self.padding)  # raises the one-line reason
            raise
        check_finite_levels(levels, [lv.name for lv in self.levels], self.name, images)
        return levels

    @torch.inference_mode()
    def level_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each level for a square input of side image_size (one forward pass
        of a blank image the first time per size: a ResNet-152 pass costs 0.2 s on 2 cores)."""
        known = self.__dict__.setdefault("_level_shapes", {})
        if image_size not in known:
            x = torch.zeros(1, 3, image_size, image_size, device=self.mean.device)
            levels = explained_forward(self.extractor, (x - self.mean) / self.std, self.name, self.padding)
            known[image_size] = [tuple(f.shape[1:]) for f in levels]
        return list(known[image_size])


def explained_forward(module: nn.Module, x: torch.Tensor, name: str, padding: str | None = None):
    """``module(x)``, turning a shape error from deep inside torch into one line that names the layer after
    which it happened and its likely cause (a too-small input, a skip broken by valid padding...)."""
    last: list[str | None] = [None]
    names = {m: n for n, m in module.named_modules() if n}

    def remember(m, args, out):
        last[0] = names.get(m, last[0])

    handles = [m.register_forward_hook(remember) for m in names]
    try:
        return list(module(x))
    except (RuntimeError, AssertionError) as err:
        where = short_module_name(last[0]) if last[0] else None
        raise explain_forward_error(err, name, x.shape[-1], padding, where) from None
    finally:
        for h in handles:
            h.remove()


def _disable_inplace(model: nn.Module) -> nn.Module:
    """Make in-place activations out-of-place so a tapped tensor is never overwritten downstream."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def offline() -> bool:
    return os.environ.get("POSPROBE_OFFLINE", "") not in ("", "0")


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    seed: int = 0,
    input_norm: str = "paper",
    *,
    layers: str | Sequence[str] | None = None,
    padding: str | None = None,
    pos_embed: str = "keep",
    image_size: int | None = None,
) -> Backbone:
    """Build the frozen backbone ``name`` with ``weights`` (a name it knows, "random", or a checkpoint path).

    Random weights are drawn from a generator seeded with ``seed`` and leave the global RNG untouched.
    ``layers`` taps those layers instead of the defaults; ``padding`` re-pads every convolution and pooling
    layer (``repad``); ``pos_embed`` zeroes or permutes (seeded by ``seed``) a ViT's position embedding;
    ``image_size`` builds fixed-size models for that input and checks the surgery with a dry run there.
    An extractor may carry ``preprocessing`` = ((mean, std), interpolation) of the weights it loaded (a timm
    tag may differ from its model's default); ``--input-norm weights`` then uses those.
    """
    spec = get_backbone_spec(name, image_size)
    if padding is not None:
        check_padding_mode(padding)
    check_pos_embed_mode(pos_embed)
    if layers is not None:
        spec = select_layers(spec, layers)
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
    preprocessing = getattr(extractor, "preprocessing", None)  # (norm, interpolation) of the weights loaded
    if preprocessing is not None and preprocessing[0] is not None:
        spec = replace(spec, norm=preprocessing[0], interpolation=preprocessing[1])
    pos_note = set_pos_embed(extractor, pos_embed, seed, spec.name) if pos_embed != "keep" else None
    report = None
    if padding is not None:
        report = repad(extractor, padding, spec.name)
        spec = replace(spec, exact_strides=spec.exact_strides and padding != "valid")
    backbone = Backbone(spec, _disable_inplace(extractor), label, input_norm, padding=report, pos_embed=pos_note)
    if image_size is not None and (report is not None or pos_embed != "keep"):
        backbone.level_shapes(image_size)  # the surgery's dry run: refuse here, with the reason, not mid-encode
    return backbone


def layer_table(name: str, image_size: int = 224, padding: str | None = None) -> list[LayerInfo]:
    """Every layer ``name`` can tap, with channels, nominal stride and size at ``image_size`` (after
    ``padding`` surgery, when given). Families list their whole graph; other presets list their levels."""
    spec = get_backbone_spec(name, image_size)
    if padding is not None:
        check_padding_mode(padding)
    if spec.layer_table is not None:
        return spec.layer_table(image_size, padding)
    backbone = create_backbone(name, "random", padding=padding, image_size=image_size)
    shapes = backbone.level_shapes(image_size)
    return [
        LayerInfo(lv.name, lv.channels, lv.stride, (h, w), default=True)
        for lv, (_, h, w) in zip(backbone.levels, shapes)
    ]


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint (plain, or wrapped under 'state_dict' / 'model')."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = (str(err).strip().splitlines() or [""])[0]  # torch's unpickling errors run to many lines
        raise PosprobeError(f"cannot read checkpoint {path}: {type(err).__name__}: {first}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PosprobeError(f"checkpoint {path} does not hold a state dict of tensors")
    check_finite_state(obj, path)  # a NaN or inf weight would only surface as NaN features, or NaN scores
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
        raise PosprobeError(f"checkpoint {source} lacks {len(missing)} of the model's tensors (first: {missing[0]})")
