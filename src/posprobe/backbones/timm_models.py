"""Any timm model as a backbone (``timm:NAME``): taps from its ``feature_info``, read with
``forward_intermediates`` as (B, C, h, w) maps.

CNNs tap their stage ends (``stages.0``...). Vision transformers tap blocks (``blocks.3``): their patch
tokens come back reshaped to the patch grid, class and register tokens dropped. A layer is named by its
module or by its feature_info index (``--layers 0,2``).

Models built for one input size (ViT, DeiT, Swin: timm's ``fixed_input_size``) are created for the
probe's image size rather than made dynamic: a random-weight ViT then has exactly one learned position
vector per patch of the grid it sees, named weights get timm's one-time resampling of the pretrained grid
at load, and ``--pos-embed`` acts on exactly what is added to the tokens (a dynamic-size model would
re-interpolate a 224-px grid at every call, smearing a shuffled embedding).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import PosprobeError, unknown_choice
from .padding import repad
from .registry import (
    BackboneSpec,
    LayerInfo,
    Level,
    check_finite_state,
    explained_forward,
    load_into,
    load_state_dict_file,
    offline,
    register_resolver,
)

PREFIX = "timm"
N_ISOTROPIC_TAPS = 4  # default taps of a transformer whose blocks all share one stride: the quarter ends


def _timm():
    try:
        import timm
    except ImportError:
        raise PosprobeError("timm: backbones need the timm package: pip install 'posprobe[timm]'") from None
    return timm


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_name(name: str) -> None:
    timm = _timm()
    if "." in name and timm.is_model(name.split(".", 1)[0]):
        arch, tag = name.split(".", 1)
        raise PosprobeError(f"timm:{name} names pretrained weights; write --backbone timm:{arch} --weights {tag}")
    if not timm.is_model(name):
        raise unknown_choice("timm model", name, timm.list_models(), "timm.list_models() lists them", max_listed=15)


def _pretrained_cfg(name: str) -> dict:
    cfg = _timm().models.get_pretrained_cfg(name, allow_unregistered=True)
    return cfg.to_dict() if cfg is not None else {}


def input_side(name: str, image_size: int | None) -> int | None:
    """The input side a fixed-size model is built for (the probe's, else its default); None for the rest."""
    cfg = _pretrained_cfg(name)
    if not cfg.get("fixed_input_size"):
        return None
    return image_size or int(cfg.get("input_size", (3, 224, 224))[-1])


def _create(name: str, side: int | None, **kwargs) -> nn.Module:
    size_kwargs = {"img_size": side} if side is not None else {}
    try:
        return _timm().create_model(name, **size_kwargs, **kwargs)
    except PosprobeError:
        raise
    except (AssertionError, ValueError, RuntimeError, TypeError) as err:
        at = f" for {side}x{side} inputs" if side is not None else ""
        raise PosprobeError(f"timm:{name} cannot be built{at} ({_first_line(err)}); try another --image-size") from None


@functools.lru_cache(maxsize=16)
def _meta_facts(name: str, side: int | None) -> tuple[tuple[dict, ...], dict, bool]:
    """(feature_info, pretrained_cfg, has forward_intermediates) of a weightless instance on the meta device."""
    with torch.device("meta"):
        model = _create(name, side)
    info = tuple(dict(f) for f in getattr(model, "feature_info", None) or ())
    return info, dict(model.pretrained_cfg), hasattr(model, "forward_intermediates")


class TimmTaps(nn.Module):
    """``forward_intermediates`` at the tapped feature_info indices: a list of (B, C, h, w) maps."""

    def __init__(self, model: nn.Module, indices: list[int], side: int | None, label: str):
        super().__init__()
        self.model, self.indices, self.side, self.label = model, list(indices), side, label
        params = inspect.signature(model.forward_intermediates).parameters
        self.kwargs = {"output_fmt": "NCHW"} if "output_fmt" in params else {}  # Swin's blocks are NHWC inside
        # What these weights were trained with: a tag (e.g. a CLIP one) may differ from the model's default.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        norm = (tuple(cfg["mean"]), tuple(cfg["std"])) if cfg.get("mean") and cfg.get("std") else None
        self.preprocessing = (norm, cfg.get("interpolation"))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.side is not None and tuple(x.shape[-2:]) != (self.side, self.side):
            raise PosprobeError(
                f"{self.label} was built for {self.side}x{self.side} inputs and cannot take "
                f"{x.shape[-2]}x{x.shape[-1]}; build it for that size (--image-size, or create_backbone(..., "
                f"image_size={x.shape[-1]}))"
            )
        return list(self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True, **self.kwargs))


# ---- weights ----------------------------------------------------------------------------------------------


def cached_weights(cfg: dict) -> Path | None:
    """The local copy of a pretrained config's weights (Hugging Face or torch hub cache), if there is one."""
    hub = cfg.get("hf_hub_id")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
        for filename in names + ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(hub, filename) if try_to_load_from_cache else None
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"]).name
        if path.exists():
            return path
    if cfg.get("file") and Path(cfg["file"]).exists():
        return Path(cfg["file"])
    return None


def _expected_location(cfg: dict) -> Path:
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE) / f"models--{cfg['hf_hub_id'].replace('/', '--')}"
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.get("url") or "unknown").name


def weights_file(name: str, weights: str) -> Path | None:
    """Where named weights of timm model ``name`` are (or would be) on disk; None for random weights."""
    if weights == "random":
        return None
    cfg = _pretrained_cfg(name if weights == "pretrained" else f"{name}.{weights}")
    return cached_weights(cfg) or _expected_location(cfg) / "model.safetensors"


def _pretrained(name: str, weights: str, side: int | None) -> nn.Module:
    full = name if weights == "pretrained" else f"{name}.{weights}"
    cfg = _pretrained_cfg(full)
    source = cfg.get("hf_hub_id") or cfg.get("url") or full
    path = cached_weights(cfg)
    if path is not None:
        try:
            return _create(full, side, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        except PosprobeError as err:
            raise PosprobeError(f"cannot load the cached weights {path} into timm:{name}: {err}") from None
    if not offline():
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)  # its retry warnings would precede our one-line error
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return _create(full, side, pretrained=True)
        except Exception:  # noqa: BLE001 - no network, proxy, hub down...: all mean "not available here"
            pass
        finally:
            hub_logger.setLevel(level)
    raise PosprobeError(
        f"pretrained weights for timm:{name} ({source}) are not available offline: download them where there is "
        f"a network (huggingface-cli download {source}) into {_expected_location(cfg).parent}, or pass "
        "--weights random or a checkpoint path"
    )


def _load_local(model: nn.Module, path: Path, label: str) -> None:
    """A local checkpoint through the model's own timm filter (which e.g. resamples a ViT's pos_embed)."""
    state = load_state_dict_file(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # noqa: BLE001 - any failure means the file is not this model's
            raise PosprobeError(f"checkpoint {path} does not fit {label}: {_first_line(err)}") from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    load_into(model, state, path, optional=(*heads, *(h.split(".")[0] for h in heads), "head", "fc", "classifier"))


# ---- specs --------------------------------------------------------------------------------------------------


def default_indices(info: tuple[dict, ...]) -> list[int]:
    """Every stage end of a hierarchical model; the ends of the four quarters of an isotropic one (ViT)."""
    n = len(info)
    if len({f["reduction"] for f in info}) == 1 and n > N_ISOTROPIC_TAPS:
        return [(k + 1) * n // N_ISOTROPIC_TAPS - 1 for k in range(N_ISOTROPIC_TAPS)]
    return list(range(n))


def _resolve(info: tuple[dict, ...], names: tuple[str, ...], label: str) -> list[int]:
    if names == ("all",):
        return list(range(len(info)))
    by_name = {f["module"]: i for i, f in enumerate(info)} | {str(i): i for i in range(len(info))}
    for n in names:
        if n not in by_name:
            valid = [f["module"] for f in info] + [str(i) for i in range(len(info))] + ["all"]
            raise unknown_choice(
                f"layer of {label}", n, valid, f"run 'posprobe layers {label}' to list them", max_listed=40
            )
    return sorted(by_name[n] for n in names)


@functools.lru_cache(maxsize=32)
def timm_spec(name: str, side: int | None = None, indices: tuple[int, ...] | None = None) -> BackboneSpec:
    """The ``timm:NAME`` backbone for inputs of side ``side`` (fixed-size models only; else None)."""
    _check_name(name)
    timm, label = _timm(), f"{PREFIX}:{name}"
    info, cfg, has_intermediates = _meta_facts(name, side)
    if not has_intermediates or not info:
        raise PosprobeError(
            f"{label} has no forward_intermediates() / feature_info in timm {timm.__version__}, "
            "so its layers cannot be tapped; try the tv: version or a newer timm"
        )
    taps = list(indices) if indices is not None else default_indices(info)
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")]
    labels = {"pretrained": f"timm {name}.{cfg.get('tag') or 'default'}", **{t: f"timm {name}.{t}" for t in tags}}

    def build(weights: str | Path, seed: int) -> nn.Module:
        if weights == "random" or isinstance(weights, Path):
            model = _create(name, side)
            if isinstance(weights, Path):
                _load_local(model, weights, label)
        else:
            model = _pretrained(name, weights, side)
            check_finite_state(model.state_dict(), f"{labels.get(weights, weights)} (as loaded by timm)")
        return TimmTaps(model.eval(), taps, side, label)

    def layer_table(image_size: int, padding: str | None) -> list[LayerInfo]:
        s = input_side(name, image_size)
        with torch.device("meta"):
            tapped = TimmTaps(_create(name, s).eval(), list(range(len(info))), s, label)
        if padding is not None:
            repad(tapped, padding, label)
        with torch.inference_mode():
            maps = explained_forward(tapped, torch.empty(1, 3, image_size, image_size, device="meta"), label, padding)
        return [
            LayerInfo(
                f["module"],
                int(f["num_chs"]),
                int(f["reduction"]),
                (int(m.shape[2]), int(m.shape[3])),
                (str(i),),
                i in taps,
            )
            for i, (f, m) in enumerate(zip(info, maps))
        ]

    mean, std = cfg.get("mean"), cfg.get("std")
    return BackboneSpec(
        name=label,
        description=f"timm {name}, forward_intermediates taps",
        build=build,
        levels=tuple(Level(info[i]["module"], int(info[i]["num_chs"]), int(info[i]["reduction"])) for i in taps),
        weight_names=("pretrained", *tags, "random") if tags else ("random",),
        default_weights="pretrained" if tags else "random",
        norm=(tuple(mean), tuple(std)) if mean and std else None,
        weights_file=functools.partial(weights_file, name),
        weight_labels=labels,
        select=lambda names: timm_spec(name, side, tuple(_resolve(info, names, label))),
        layer_table=layer_table,
        interpolation=cfg.get("interpolation"),
        input_size=side,
    )


def _resolver(name: str, image_size: int | None) -> BackboneSpec:
    _check_name(name)
    return timm_spec(name, input_side(name, image_size))


register_resolver(PREFIX, _resolver)
