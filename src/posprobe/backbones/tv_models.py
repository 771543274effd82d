"""Any torchvision classification model as a backbone (``tv:NAME``), tapped at FX graph nodes.

A layer is named as ``torchvision.models.feature_extraction.get_graph_node_names`` names the node
(``layer1.0.relu_1``), or by a module's name (``layer1``), which FX resolves to that module's last node.
Shapes come from running the graph on the meta device (no memory, no weights); a node is tappable when
its output is a 4-d map whose side follows the input side (adaptive pools and the classifier are not).
The layout is found the same way, so channels-last maps (torchvision's Swin) are permuted to NCHW.
Without ``layers`` the taps are the last node at each stride: the end of every resolution stage.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..errors import PosprobeError, unknown_choice
from .padding import repad
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    LayerInfo,
    Level,
    explained_forward,
    load_into,
    load_state_dict_file,
    offline,
    register_resolver,
)

PREFIX = "tv"
NOMINAL_SIZE = 224  # strides are measured at this input side
HEADS = ("classifier", "fc", "heads", "head")  # classifier parameters a backbone checkpoint may lack


@contextlib.contextmanager
def _quiet():
    """torchvision warns about init defaults (Inception) and train/eval graph differences: not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


class TappedModel(nn.Module):
    """FX-extracted graph returning the tapped nodes as a list in declared order.

    ``taps``: {node: level name}, or (node, level name) pairs when one node is tapped under two names;
    levels named in ``nhwc`` come out of the graph channels-last and are permuted to (B, C, H, W).
    """

    def __init__(
        self, model: nn.Module, taps: Mapping[str, str] | Sequence[tuple[str, str]], nhwc: Collection[str] = ()
    ):
        super().__init__()
        pairs = list(taps.items()) if isinstance(taps, Mapping) else list(taps)
        nodes = list(dict.fromkeys(node for node, _ in pairs))  # one output per node: FX pairs each query once
        with _quiet():
            self.graph_module = create_feature_extractor(model, return_nodes={n: n for n in nodes})
        _no_inplace_calls(self.graph_module)
        self.pairs, self.nhwc = pairs, set(nhwc)
        self.names = [name for _, name in pairs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.graph_module(x)
        # (B, H, W, C) -> (B, C, H, W) for channels-last levels
        return [out[node].permute(0, 3, 1, 2) if name in self.nhwc else out[node] for node, name in self.pairs]


def _no_inplace_calls(gm: fx.GraphModule) -> None:
    """Functional activations called with inplace=True would overwrite a tapped tensor downstream."""
    changed = False
    for node in gm.graph.nodes:
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            changed = True
    if changed:
        gm.recompile()


# ---- weights ----------------------------------------------------------------------------------------------


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


def _transform_facts(weights_enum) -> tuple[tuple[tuple[float, ...], tuple[float, ...]], str | None]:
    """(mean, std) and resize interpolation of the weights' own preprocessing."""
    try:
        t = weights_enum.transforms()
        interp = getattr(t, "interpolation", None)
        return (tuple(t.mean), tuple(t.std)), getattr(interp, "value", None)
    except (AttributeError, TypeError):
        return (IMAGENET_MEAN, IMAGENET_STD), None


# ---- the graph: every tappable node, its shape and its names ---------------------------------------------


@dataclass(frozen=True)
class Node:
    """A tappable node: a 4-d map whose side follows the input side."""

    name: str
    position: int  # order in the graph
    channels: int
    stride: int  # nominal: NOMINAL_SIZE / side, rounded to a power of two
    nhwc: bool


@dataclass(frozen=True)
class Graph:
    arch: str
    nodes: tuple[Node, ...]  # tappable, in graph order
    queries: dict[str, str]  # every accepted layer name (node or module) -> node name
    all_nodes: tuple[str, ...]  # every node of the eval graph, tappable or not

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def aliases(self, node: str) -> list[str]:
        return sorted((q for q, n in self.queries.items() if n == node and q != node), key=len)

    def short_name(self, node: str) -> str:
        """The shortest name of a node: 'layer1' rather than 'layer1.1.relu_1'."""
        return min([node, *self.aliases(node)], key=lambda q: (q.count("."), len(q)))

    def stage_ends(self) -> list[Node]:
        """The output of every resolution stage, in graph order.

        A stage is the run of nodes at one stride before the first node of a larger stride (a branch that
        downsamples later, as in Inception, does not reopen it); its output is the last node that ends the
        outermost module (``layer1`` over ``layer1.1.relu_1``, ``features.1`` over ``features.2.block.0``).
        """
        best: dict[int, Node] = {}
        largest = 0
        for node in self.nodes:
            if node.stride < largest:
                continue
            largest = node.stride
            current = best.get(node.stride)
            if current is None or self.short_name(node.name).count(".") <= self.short_name(current.name).count("."):
                best[node.stride] = node
        return sorted(best.values(), key=lambda n: n.position)


def tv_architectures() -> list[str]:
    """torchvision's classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str) -> None:
    if arch not in tv_architectures():
        raise unknown_choice(
            "torchvision model",
            arch,
            tv_architectures(),
            "torchvision.models.list_models() lists them; timm models are timm:NAME",
            max_listed=20,
        )


def _new_model(arch: str) -> nn.Module:
    with _quiet():
        return torchvision.models.get_model(arch, weights=None)


def _meta_model(arch: str) -> nn.Module:
    """A weightless instance for tracing and shape discovery (built on the CPU where the builder needs data)."""
    try:
        with torch.device("meta"):
            return _new_model(arch).eval()
    except NotImplementedError:  # e.g. RegNet computes its widths with tensors
        return _new_model(arch).to("meta").eval()


@functools.lru_cache(maxsize=16)
def graph_of(arch: str) -> Graph:
    """The tappable nodes of ``arch``, found by running its FX graph on meta tensors at two input sizes."""
    _check_arch(arch)
    model = _meta_model(arch)
    with _quiet():
        all_nodes = [n for n in get_graph_node_names(model)[1] if n != "x"]
        fx_all = create_feature_extractor(model, return_nodes={n: n for n in all_nodes})
    nominal = fx_all(torch.empty(1, 3, NOMINAL_SIZE, NOMINAL_SIZE, device="meta"))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # FX prints the failing line of generated code
            larger = fx_all(torch.empty(1, 3, 2 * NOMINAL_SIZE, 2 * NOMINAL_SIZE, device="meta"))
    except (RuntimeError, AssertionError):  # a fixed-size model (torchvision's ViT, MaxViT)
        larger = None
    nodes = []
    for i, name in enumerate(all_nodes):
        a = nominal[name]
        if not (isinstance(a, torch.Tensor) and a.dim() == 4):
            continue
        if larger is not None:
            changed = [d for d in (1, 2, 3) if a.shape[d] != larger[name].shape[d]]
        else:  # one size only: keep square NCHW maps whose side divides the input by a power of two
            ratio = NOMINAL_SIZE / a.shape[2]
            changed = [2, 3] if a.shape[2] == a.shape[3] and ratio == 2 ** round(math.log2(ratio)) else []
        if changed == [2, 3]:
            channels, side, nhwc = a.shape[1], a.shape[2], False
        elif changed == [1, 2]:
            channels, side, nhwc = a.shape[3], a.shape[1], True
        else:
            continue  # its size does not follow the input: adaptive pooling, a classifier
        stride = 2 ** round(math.log2(NOMINAL_SIZE / max(side, 1)))
        nodes.append(Node(name, i, int(channels), int(stride), nhwc))
    tappable = {n.name for n in nodes}
    # FX's rule for a query q: the last node whose first q.count('.') + 1 name components spell q
    queries: dict[str, str] = {}
    candidates = {".".join(n.split(".")[:k]) for n in all_nodes for k in range(1, n.count(".") + 2)}
    for q in candidates:
        depth = q.count(".") + 1
        target = next((n for n in reversed(all_nodes) if ".".join(n.split(".")[:depth]) == q), None)
        if target in tappable:
            queries[q] = target
    return Graph(arch, tuple(nodes), queries, tuple(all_nodes))


def resolve_layers(graph: Graph, names: Sequence[str], aliases: Mapping[str, str], label: str) -> list[tuple[str, str]]:
    """(node, level name) pairs for user layer names, in graph order; 'all' is every tappable node."""
    if tuple(names) == ("all",):
        return [(n.name, n.name) for n in graph.nodes]
    pairs = []
    for name in names:
        query = aliases.get(name, name)
        if query not in graph.queries:
            valid = [
                *aliases,
                *(graph.short_name(n.name) for n in graph.stage_ends()),
                *sorted(graph.queries, key=lambda q: graph.node(graph.queries[q]).position),
                "all",
            ]
            raise unknown_choice(
                f"layer of {label}",
                name,
                list(dict.fromkeys(valid)),
                f"run 'posprobe layers {label}' to list them with channels and strides",
                max_listed=25,
            )
        pairs.append((graph.queries[query], name))
    return sorted(pairs, key=lambda p: graph.node(p[0]).position)


# ---- specs --------------------------------------------------------------------------------------------------


def tv_backbone_spec(
    name: str,
    arch: str,
    description: str,
    taps: Sequence[tuple[str, str]] | None,
    weights_for: Callable[[str], object],
    weight_names: tuple[str, ...],
    default_weights: str,
    weight_labels: Mapping[str, str],
    levels: tuple[Level, ...] | None = None,
    aliases: Mapping[str, str] | None = None,
    base_padding: str | None = None,
) -> BackboneSpec:
    """A spec for torchvision ``arch`` tapped at ``taps`` ((node or module, level name) pairs; None: the
    stage ends). ``weights_for(name)`` gives the torchvision weights enum member of a weight name.
    ``levels`` may be declared up front (presets, so that registering them traces nothing); ``aliases``
    are extra layer names ({'relu4_3': 'features.22'}); ``base_padding`` is surgery every build applies."""
    aliases = dict(aliases or {})
    if taps is None:
        graph = graph_of(arch)
        taps = [(n.name, graph.short_name(n.name)) for n in graph.stage_ends()]
    if levels is None:
        graph = graph_of(arch)
        levels = tuple(
            Level(level, graph.node(graph.queries[node]).channels, graph.node(graph.queries[node]).stride)
            for node, level in taps
        )
    taps = list(taps)
    first = weights_for(default_weights) if default_weights != "random" else None
    norm, interpolation = _transform_facts(first) if first is not None else ((IMAGENET_MEAN, IMAGENET_STD), None)

    select = functools.partial(
        _tv_select,
        name,
        arch,
        description,
        weights_for,
        weight_names,
        default_weights,
        weight_labels,
        aliases,
        base_padding,
    )
    return BackboneSpec(
        name=name,
        description=description,
        levels=levels,
        build=functools.partial(_tv_build, name, arch, taps, base_padding, weights_for),
        weight_names=weight_names,
        default_weights=default_weights,
        norm=norm,
        weights_file=lambda w: hub_checkpoint(weights_for(w)) if w in weight_names and w != "random" else None,
        weight_labels=dict(weight_labels),
        exact_strides=base_padding != "valid",
        select=select,
        layer_table=functools.partial(_tv_layer_table, name, arch, taps, aliases, base_padding),
        interpolation=interpolation,
    )


def _tv_build(
    name: str,
    arch: str,
    taps: list[tuple[str, str]],
    base_padding: str | None,
    weights_for: Callable[[str], object],
    weights: str | Path,
    seed: int,
) -> nn.Module:
    """The model with its weights (random, named torchvision weights, or a checkpoint file), tapped at ``taps``."""
    model = _new_model(arch)
    if isinstance(weights, Path):
        load_into(model, load_state_dict_file(weights), weights, optional=HEADS)
    elif weights != "random":
        member = weights_for(weights)
        load_into(model, load_imagenet_state(arch, member), hub_checkpoint(member), optional=HEADS)
    graph = graph_of(arch)
    nhwc = {level for node, level in taps if graph.node(graph.queries[node]).nhwc}
    tapped = TappedModel(model.eval(), taps, nhwc)
    if base_padding is not None:
        repad(tapped, base_padding, name)
    return tapped


def _tv_select(
    name: str,
    arch: str,
    description: str,
    weights_for,
    weight_names,
    default_weights,
    weight_labels,
    aliases: Mapping[str, str],
    base_padding: str | None,
    names: tuple[str, ...],
) -> BackboneSpec:
    """The same backbone tapped at ``names`` (layer names or aliases) instead."""
    pairs = resolve_layers(graph_of(arch), names, aliases, name)
    return tv_backbone_spec(
        name,
        arch,
        description,
        pairs,
        weights_for,
        weight_names,
        default_weights,
        weight_labels,
        aliases=aliases,
        base_padding=base_padding,
    )


def _tv_layer_table(
    name: str,
    arch: str,
    taps: list[tuple[str, str]],
    aliases: Mapping[str, str],
    base_padding: str | None,
    image_size: int,
    padding: str | None,
) -> list[LayerInfo]:
    """Every layer of ``arch`` as ``posprobe layers`` lists it, sized by a dry run on the meta device."""
    graph = graph_of(arch)
    tapped = TappedModel(
        _meta_model(arch), [(n.name, n.name) for n in graph.nodes], {n.name for n in graph.nodes if n.nhwc}
    )
    for mode in (base_padding, padding):
        if mode is not None:
            repad(tapped, mode, name)
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    with torch.inference_mode():
        maps = explained_forward(tapped, x, name, padding or base_padding)
    defaults = {graph.queries[node] for node, _ in taps}
    preset_names: dict[str, list[str]] = {}
    for alias, query in aliases.items():
        preset_names.setdefault(graph.queries.get(query, ""), []).append(alias)
    return [
        LayerInfo(
            n.name,
            n.channels,
            n.stride,
            (int(m.shape[2]), int(m.shape[3])),
            tuple(preset_names.get(n.name, []) + graph.aliases(n.name)),
            n.name in defaults,
        )
        for n, m in zip(graph.nodes, maps)
    ]


@functools.lru_cache(maxsize=32)
def tv_spec(arch: str) -> BackboneSpec:
    """The ``tv:ARCH`` backbone: stage-end taps, weights by torchvision enum name (DEFAULT, IMAGENET1K_V1...)."""
    _check_arch(arch)
    enum = torchvision.models.get_model_weights(arch)
    members = [m for m in enum.__members__ if m != "DEFAULT"]
    labels = {m: f"{m} (torchvision)" for m in members}
    labels["DEFAULT"] = f"{enum.DEFAULT.name} (torchvision DEFAULT)"
    graph = graph_of(arch)
    return tv_backbone_spec(
        name=f"{PREFIX}:{arch}",
        arch=arch,
        description=f"torchvision {arch}, FX taps at the end of each resolution stage",
        taps=None,
        weights_for=lambda w: enum.DEFAULT if w == "DEFAULT" else enum[w],
        weight_names=(*members, "DEFAULT", "random"),
        default_weights="DEFAULT",
        weight_labels=labels,
        levels=tuple(Level(graph.short_name(n.name), n.channels, n.stride) for n in graph.stage_ends()),
    )


register_resolver(PREFIX, lambda arch, image_size: tv_spec(arch))
