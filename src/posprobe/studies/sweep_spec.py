"""A sweep's spec: a TOML file naming a grid (backbones x readouts and measures x layers x patterns x seeds, on one
or more training sets and the test sets), checked whole and expanded into cells before any work.

A *cell* is one number's worth of work: one readout trained with one seed on one backbone setting and training
set (scored on every test set), or one readout-free measure of one level. Its id is a hash of everything that
determines its numbers, so a re-run recognises finished cells, and a spec that only adds cells resumes. Cells are
grouped by (backbone setting, training set): a *group* encodes each image set once and trains all its cells.

Every mistake in a spec (an unknown key, backbone, layer, pattern or test set, an impossible readout) is one line
naming the place in the spec, before any encoding.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..backbones import INPUT_NORMS, get_backbone_spec
from ..backbones.padding import check_padding_mode
from ..backbones.pos_embed import check_pos_embed_mode
from ..backbones.registry import parse_layers, select_layers
from ..data import IMAGE_EXTENSIONS, SYNTHETIC, FolderImages
from ..errors import PosprobeError, unknown_choice
from ..readouts.pem import check_readout_config
from ..readouts.train import TrainConfig, get_profile
from ..targets import resolve_patterns

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RESULTS_FORMAT = 1  # raise when a change to posprobe alters the numbers a finished cell holds: no cell is reused
BUNDLED = "bundled"
NATURAL, ROLLED = "natural", "rolled"
TEST_SETS = (NATURAL, *SYNTHETIC, ROLLED)
READOUT_KINDS = ("pem", "linear")
MEASURE_KINDS = ("pvf",)  # the readout-free position-variance fraction of every level (measures/)
ALL, EACH = "all", "each"  # layers: every tap together (the paper's readout) / each tap alone (a layer curve)

_TOP_KEYS = ("name", "patterns", "seeds", "data", "training", "backbones", "readouts", "measures", "resources", "cache")
_DATA_KEYS = ("train", "natural", "test", "image_size", "feat_size", "crops_per_photo", "rolls", "input_norm")
_TRAINING_KEYS = ("profile", "steps", "epochs", "lr", "batch_size", "readout_width", "device")
_BACKBONE_KEYS = ("name", "weights", "weights_seed", "padding", "pos_embed", "taps", "layers")
_READOUT_KEYS = ("kind", "kernel_size", "depth", "padding")
_RESOURCE_KEYS = ("num_cpus", "num_gpus", "max_retries")
_CACHE_KEYS = ("enabled", "dir", "max_gb")
_COUNTS = ("steps", "epochs", "batch_size", "readout_width")  # [training]'s integers


@dataclass(frozen=True)
class BackboneSetting:
    """One encoder: a backbone with its weights, padding surgery, position embedding and taps."""

    name: str
    weights: str | None = None  # None: the backbone's default
    weights_seed: int = 0  # the draw of random weights (and of a shuffled position embedding)
    padding: str | None = None  # None: as the model was built
    pos_embed: str = "keep"
    taps: tuple[str, ...] | None = None  # None: the backbone's own taps

    @property
    def label(self) -> str:
        """'tv:resnet18 · random · padding zeros': the defaults left out."""
        parts = [self.name]
        if self.weights is not None:
            parts.append(self.weights + (f" (seed {self.weights_seed})" if self.weights_seed else ""))
        if self.padding is not None:
            parts.append(f"padding {self.padding}")
        if self.pos_embed != "keep":
            parts.append(f"pos-embed {self.pos_embed}")
        if self.taps is not None:
            parts.append("taps " + ",".join(self.taps))
        return " · ".join(parts)


@dataclass(frozen=True)
class ReadoutChoice:
    """A readout: the paper's PEM (trained) or the exact linear probe (closed form), with its kernel."""

    kind: str = "pem"
    kernel_size: int = 3
    depth: int = 1
    padding: int = 0

    @property
    def label(self) -> str:
        """'pem k3', 'pem k3 d2 p1', 'linear k1'."""
        extra = (f" d{self.depth}" if self.depth != 1 else "") + (f" p{self.padding}" if self.padding else "")
        return f"{self.kind} k{self.kernel_size}{extra}"


@dataclass(frozen=True)
class SweepCell:
    """One unit of work: a readout trained on ``levels`` with one seed (``pattern``), or a measure of one level."""

    setting: BackboneSetting
    train: str  # a training set entry: 'bundled' or a folder
    levels: str  # 'all', a tap name, or tap names joined by '+' (read together)
    readout: ReadoutChoice | None = None
    pattern: str = ""
    seed: int = 0
    measure: str = ""

    @property
    def kind(self) -> str:
        return "measure" if self.measure else self.readout.kind

    @property
    def method(self) -> str:
        """The readout's or the measure's label."""
        return self.measure or self.readout.label

    def describe(self) -> str:
        if self.measure:
            return f"{self.measure} of {self.levels}"
        return f"{self.readout.label} {self.pattern} on {self.levels}, seed {self.seed}"


@dataclass(frozen=True)
class DataSettings:
    train: tuple[str, ...] = (BUNDLED,)
    natural: str = BUNDLED  # the natural test images: the bundled photos or a folder (PASCAL-S)
    test: tuple[str, ...] = (NATURAL,)
    image_size: int = 224
    feat_size: int = 28
    crops_per_photo: int = 8
    rolls: int = 4
    input_norm: str = "paper"


@dataclass(frozen=True)
class Resources:
    """What one Ray task (one group) asks of a node; the local executor ignores them."""

    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 3  # a task whose worker dies is run again this many times


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True
    dir: str | None = None  # None: each node's $POSPROBE_CACHE or ~/.cache/posprobe
    max_gb: float = 32.0


@dataclass(frozen=True)
class SweepSpec:
    name: str
    patterns: tuple[str, ...]
    seeds: tuple[int, ...]
    data: DataSettings
    profile: str
    train: TrainConfig
    device: str
    backbones: tuple[tuple[BackboneSetting, tuple[str, ...]], ...]  # each setting with its layer choices
    readouts: tuple[ReadoutChoice, ...]
    measures: tuple[str, ...]
    resources: Resources = field(default_factory=Resources)
    cache: CacheSettings = field(default_factory=CacheSettings)
    text: str = ""  # the spec file as written
    stamps: dict[str, tuple | None] = field(default_factory=dict)  # folder or checkpoint -> content_stamp, at parse


@dataclass(frozen=True)
class Group:
    """The cells of one backbone setting and training set: one encoder pass per image set, one task."""

    setting: BackboneSetting
    train: str
    cells: tuple[SweepCell, ...]

    @property
    def label(self) -> str:
        return self.setting.label + ("" if self.train == BUNDLED else f" · train {self.train}")


def content_stamp(path: str) -> tuple | None:
    """What a file or an image folder holds, cheaply: (size, mtime) of a file, (images, bytes, newest mtime) of a
    folder; None for a name ('bundled', 'random') or a path this machine does not see (a Ray node may). A
    retrained checkpoint or an image added to a folder then changes the cells that read it."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return (st.st_size, st.st_mtime_ns)
    if not p.is_dir():
        return None
    stats = [f.stat() for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    return (len(stats), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0))


def cell_id(spec: SweepSpec, cell: SweepCell) -> str:
    """16 hex digits hashing everything that determines the cell's numbers and nothing else (a readout's do not
    depend on the seeds or cells beside it: see readouts/engine), so an edited spec reuses exactly the cells it
    still names: a measure reads the training features only (no test set, seed or schedule), the linear probe is
    solved (no schedule), and the natural photos and rolls count only where a test set uses them."""
    d = spec.data
    data: dict[str, Any] = {
        "train": cell.train,
        "image_size": d.image_size,
        "feat_size": d.feat_size,
        "crops_per_photo": d.crops_per_photo,
        "input_norm": d.input_norm,
    }
    identity: dict[str, Any] = {
        "results_format": RESULTS_FORMAT,
        "cell": asdict(cell),
        "content": [spec.stamps.get(p) for p in (cell.train, cell.setting.weights, d.natural) if p],
        "data": data,
        "device": spec.device,  # CPU and GPU kernels round apart
        "cached": spec.cache.enabled,  # the feature cache keeps float16, an in-memory encoding float32
    }
    if not cell.measure:  # scored on every test set: the file holds a row per set
        data["test"] = sorted(d.test)
        if NATURAL in d.test or ROLLED in d.test:
            data["natural"] = d.natural
        if ROLLED in d.test:
            data["rolls"] = d.rolls
    if cell.kind == "pem":
        identity["train"] = asdict(spec.train) | {"seed": cell.seed}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _at(where: str):
    """A PosprobeError raised inside (by a check shared with the CLI) names the place in the spec it concerns."""
    try:
        yield
    except PosprobeError as err:
        raise PosprobeError(f"{where}: {err}") from None


def _table(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise PosprobeError(f"{where} must be a table; given {type(raw).__name__} {raw!r}")
    return raw


def _check_keys(raw: Mapping, valid: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            raise unknown_choice(f"key in {where}", key, valid)


def _as_list(value: Any, where: str, kind: type | tuple[type, ...]) -> list:
    """A scalar or a list of them -> a non-empty list, each of type ``kind``."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise PosprobeError(f"{where} is an empty list; give at least one value")
    for item in items:
        if isinstance(item, bool) and kind is not bool or not isinstance(item, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise PosprobeError(f"{where} expects {names} values; given {item!r}")
    return items


def _scalar(raw: Mapping, key: str, default: Any, kind: type | tuple[type, ...], where: str) -> Any:
    """One value of type ``kind`` (or None when absent and the default is None)."""
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, list):
        raise PosprobeError(f"{where}.{key} takes one value, not a list; given {value!r}")
    return _as_list(value, f"{where}.{key}", kind)[0]


def _positive(value: int, where: str, least: int = 1) -> int:
    if value < least:
        raise PosprobeError(f"{where} must be at least {least}; given {value}")
    return value


def _seeds(raw: Any) -> tuple[int, ...]:
    """seeds = 3 (0, 1, 2) or seeds = [0, 5]."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return tuple(range(_positive(raw, "seeds")))
    seeds = _as_list(raw, "seeds", int)
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise PosprobeError(f"seeds must be distinct non-negative integers; given {seeds}")
    return tuple(seeds)


def _data(raw: Mapping, base: Path) -> DataSettings:
    where = "[data]"
    _check_keys(raw, _DATA_KEYS, where)
    folder = lambda s: s if s == BUNDLED else str((base / Path(s).expanduser()).resolve())  # noqa: E731
    train = tuple(folder(s) for s in _as_list(raw.get("train", BUNDLED), f"{where}.train", str))
    natural = folder(_scalar(raw, "natural", BUNDLED, str, where))
    for key, paths in (("train", train), ("natural", [natural])):
        for path in paths:
            if path != BUNDLED and not Path(path).is_dir():
                raise PosprobeError(f"{where}.{key}: image folder not found: {path} (a folder, or 'bundled')")
            if path != BUNDLED:
                with _at(f"{where}.{key}"):
                    FolderImages(path)  # one without images is refused now, not by every group
    test = tuple(dict.fromkeys(_as_list(raw.get("test", [NATURAL]), f"{where}.test", str)))
    for t in test:
        if t not in TEST_SETS:
            raise unknown_choice(f"test set in {where}.test", t, TEST_SETS)
    image_size = _positive(_scalar(raw, "image_size", 224, int, where), f"{where}.image_size", 8)
    feat_size = _positive(_scalar(raw, "feat_size", 28, int, where), f"{where}.feat_size")
    input_norm = _scalar(raw, "input_norm", "paper", str, where)
    if input_norm not in INPUT_NORMS:
        raise unknown_choice(f"{where}.input_norm", input_norm, INPUT_NORMS)
    return DataSettings(
        train,
        natural,
        test,
        image_size,
        feat_size,
        _positive(_scalar(raw, "crops_per_photo", 8, int, where), f"{where}.crops_per_photo"),
        _positive(_scalar(raw, "rolls", 4, int, where), f"{where}.rolls"),
        input_norm,
    )


def _training(raw: Mapping) -> tuple[str, TrainConfig, str]:
    where = "[training]"
    _check_keys(raw, _TRAINING_KEYS, where)
    profile = _scalar(raw, "profile", "quick", str, where)
    steps, epochs, batch_size, width = (_scalar(raw, k, None, int, where) for k in _COUNTS)
    for key, value in zip(_COUNTS, (steps, epochs, batch_size, width)):
        if value is not None:
            _positive(value, f"{where}.{key}", 0 if key == "readout_width" else 1)
    lr = _scalar(raw, "lr", None, (int, float), where)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise PosprobeError(f"{where}.lr must be a finite number > 0; given {lr}")
    if steps is not None and epochs is not None:
        raise PosprobeError(f"{where} gives steps (SGD updates) and epochs (passes); give one of them")
    with _at(where):
        config = get_profile(profile, width, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size)
    device = _scalar(raw, "device", "cpu", str, where)
    if device not in ("auto", "cpu", "mps") and not device.startswith("cuda"):
        raise PosprobeError(f"{where}.device expects cpu, cuda, cuda:N, mps or auto; given '{device}'")
    return profile, config, device


def _levels_of(setting: BackboneSetting, image_size: int, where: str = "[[backbones]]") -> list[str]:
    """The tap names a setting yields (unknown backbones and taps fail here, with the list)."""
    with _at(f"{where}.name"):
        spec = get_backbone_spec(setting.name, image_size)
    if setting.taps is not None:
        with _at(f"{where}.taps"):
            spec = select_layers(spec, setting.taps)
    return [lv.name for lv in spec.levels]


def _layer_names(value: str, where: str) -> tuple[str, ...]:
    """'layer1, layer3' -> ('layer1', 'layer3'): names read together, each once."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise PosprobeError(f'{where} holds an empty layer list {value!r}; e.g. "layer2,layer4", all or each')
    repeated = [n for n in names if names.count(n) > 1]
    if repeated:
        raise PosprobeError(f"{where} names '{repeated[0]}' twice in {value!r}; name each layer once")
    return names


def _layer_choices(values: list[str], levels: list[str], where: str) -> list[str]:
    """'all' / 'each' / 'layer1,layer3' (read together) -> level keys: 'all', 'layer2', 'layer1+layer3'."""
    out: list[str] = []
    for value in values:
        if value.strip() == ALL:
            out.append(ALL)
        elif value.strip() == EACH:
            out += levels
        else:
            names = _layer_names(value, f"{where}.layers")
            for n in names:
                if n not in levels:
                    raise unknown_choice(f"layer in {where}.layers (a tap of this setting)", n, [*levels, ALL, EACH])
            out.append("+".join(n for n in levels if n in names))  # network order
    return list(dict.fromkeys(out))


def _weights(name: str, weights: str, image_size: int, base: Path, where: str) -> str | None:
    """'default' -> None; 'random' or a name the backbone knows, as given; anything else is a checkpoint path,
    resolved against the spec's folder as image folders are, so that a cell's id names one file wherever the
    sweep is started from (whether it exists is the run's to find: a Ray node may hold it where this one does
    not)."""
    if weights == "default":
        return None
    with _at(f"{where}.name"):
        known = get_backbone_spec(name, image_size).weight_names
    if weights == "random" or weights in known:
        return weights
    if "/" not in weights and not Path(weights).suffix:  # a name, not a file: a typo of a known one
        raise unknown_choice(f"weights of {name} in {where}.weights", weights, [*known, "random", "default"])
    return str((base / Path(weights).expanduser()).resolve())


def _matching(name: str, where: str) -> list[str]:
    """A name, or every model of its family that a shell-style pattern matches: 'timm:convnext_*' (timm's names),
    'tv:resnet*' (torchvision's classification models), in sorted order."""
    if not any(ch in name for ch in "*?["):
        return [name]
    family, _, pattern = name.partition(":")
    if family == "timm":
        try:
            import timm
        except ImportError:
            raise PosprobeError(f"{where} '{name}' needs the timm package: pip install 'posprobe[timm]'") from None
        models = timm.list_models()
    elif family == "tv":
        from ..backbones.tv_models import tv_architectures

        models = tv_architectures()
    else:
        raise PosprobeError(f"{where} '{name}': a pattern needs the tv: or timm: family, e.g. 'timm:convnext_*'")
    found = sorted(fnmatch.filter(models, pattern))
    if not found:
        raise PosprobeError(f"{where} '{name}' matches no {family} model; {family} has {len(models)}")
    return [f"{family}:{m}" for m in found]


def _backbones(raw: Any, image_size: int, base: Path) -> tuple[tuple[BackboneSetting, tuple[str, ...]], ...]:
    entries = raw if isinstance(raw, list) else [raw]
    if raw is None or not entries:
        raise PosprobeError("the spec names no backbone; add a [[backbones]] table with name = ...")
    out, places = [], {}  # each setting and the table that named it first
    for i, entry in enumerate(entries, 1):
        where = f"[[backbones]] {i}"
        entry = _table(entry, where)
        _check_keys(entry, _BACKBONE_KEYS, where)
        if "name" not in entry:
            raise PosprobeError(f'{where} has no name; e.g. name = "tv:resnet18" or a list of names')
        names = [m for n in _as_list(entry["name"], f"{where}.name", str) for m in _matching(n, f"{where}.name")]
        weights = _as_list(entry.get("weights", "default"), f"{where}.weights", str)
        wseeds = _as_list(entry.get("weights_seed", 0), f"{where}.weights_seed", int)
        paddings = _as_list(entry.get("padding", "model"), f"{where}.padding", str)
        pos = _as_list(entry.get("pos_embed", "keep"), f"{where}.pos_embed", str)
        taps = entry.get("taps", ALL)
        if taps == ALL:
            taps = None  # the backbone's own taps
        else:
            with _at(f"{where}.taps"):
                taps = parse_layers(_as_list(taps, f"{where}.taps", str))
        layers = _as_list(entry.get("layers", ALL), f"{where}.layers", str)
        for ws in wseeds:
            _positive(ws, f"{where}.weights_seed", 0)
        for p in paddings:
            if p != "model":
                with _at(f"{where}.padding"):
                    check_padding_mode(p)
        for m in pos:
            with _at(f"{where}.pos_embed"):
                check_pos_embed_mode(m)
        for name in names:
            for w in weights:
                key = _weights(name, w, image_size, base, where)
                for s in wseeds:
                    for p in paddings:
                        for m in pos:
                            setting = BackboneSetting(name, key, s, None if p == "model" else p, m, taps)
                            if setting in places:
                                raise PosprobeError(
                                    f"{where} names the backbone setting '{setting.label}' again (first in "
                                    f"{places[setting]}); give each setting once"
                                )
                            places[setting] = where
                            levels = _levels_of(setting, image_size, where)
                            out.append((setting, tuple(_layer_choices(layers, levels, where))))
    return tuple(out)


def _readouts(raw: Any, feat_size: int) -> tuple[ReadoutChoice, ...]:
    entries = [] if raw is None else raw if isinstance(raw, list) else [raw]
    out = []
    for i, entry in enumerate(entries, 1):
        where = f"[[readouts]] {i}"
        entry = _table(entry, where)
        _check_keys(entry, _READOUT_KEYS, where)
        kind = _scalar(entry, "kind", "pem", str, where)
        if kind not in READOUT_KINDS:
            raise unknown_choice(f"readout kind in {where}", kind, READOUT_KINDS)
        kernels = _as_list(entry.get("kernel_size", 3), f"{where}.kernel_size", int)
        depths = _as_list(entry.get("depth", 1), f"{where}.depth", int)
        paddings = _as_list(entry.get("padding", 0), f"{where}.padding", int)
        if kind == "linear" and depths != [1]:
            raise PosprobeError(f"{where}: the linear probe is one convolution; depth must be 1, given {depths}")
        for k in kernels:
            for d in depths:
                for p in paddings:
                    try:
                        check_readout_config(feat_size, k, d, p)
                    except PosprobeError as err:
                        raise PosprobeError(f"{where}: {err}") from None
                    out.append(ReadoutChoice(kind, k, d, p))
    return tuple(dict.fromkeys(out))


def _measures(raw: Any) -> tuple[str, ...]:
    entries = [] if raw is None else raw if isinstance(raw, list) else [raw]
    out = []
    for i, entry in enumerate(entries, 1):
        where = f"[[measures]] {i}"
        entry = _table(entry, where)
        _check_keys(entry, ("kind",), where)
        kind = _scalar(entry, "kind", None, str, where)
        if kind not in MEASURE_KINDS:
            raise unknown_choice(f"measure kind in {where}", str(kind), MEASURE_KINDS)
        out.append(kind)
    return tuple(dict.fromkeys(out))


def _resources(raw: Mapping) -> Resources:
    where = "[resources]"
    _check_keys(raw, _RESOURCE_KEYS, where)
    cpus = _scalar(raw, "num_cpus", 1, (int, float), where)
    gpus = _scalar(raw, "num_gpus", 0, (int, float), where)
    retries = _scalar(raw, "max_retries", 3, int, where)
    if cpus < 0 or gpus < 0 or retries < 0:
        raise PosprobeError(
            f"{where} values must be non-negative; given num_cpus={cpus}, num_gpus={gpus}, max_retries={retries}"
        )
    return Resources(cpus, gpus, retries)


def _cache(raw: Mapping, base: Path) -> CacheSettings:
    """The feature cache's settings; a relative dir is the spec folder's, as image folders are."""
    where = "[cache]"
    _check_keys(raw, _CACHE_KEYS, where)
    max_gb = _scalar(raw, "max_gb", 32.0, (int, float), where)
    if max_gb <= 0:
        raise PosprobeError(f"{where}.max_gb must be positive; given {max_gb}")
    folder = _scalar(raw, "dir", None, str, where)
    folder = None if folder is None else str((base / Path(folder).expanduser()).resolve())
    return CacheSettings(_scalar(raw, "enabled", True, bool, where), folder, max_gb)


def parse_spec(text: str, base: Path = Path("."), source: str = "the spec") -> SweepSpec:
    """A spec's TOML text -> a checked SweepSpec; folders are relative to ``base`` (the spec's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PosprobeError(f"{source} is not valid TOML: {err}") from None
    _check_keys(raw, _TOP_KEYS, source)
    data = _data(_table(raw.get("data", {}), "[data]"), base)
    profile, config, device = _training(_table(raw.get("training", {}), "[training]"))
    readouts = _readouts(raw.get("readouts"), data.feat_size)
    measures = _measures(raw.get("measures"))
    if not readouts and not measures:
        raise PosprobeError('the spec names no readout or measure; add [[readouts]] kind = "pem" (or a [[measures]])')
    names = _as_list(raw.get("patterns", ["H", "V", "G"]), "patterns", str)
    with _at("patterns"):
        patterns = tuple(resolve_patterns(names))
    name = raw.get("name", "sweep")
    if not isinstance(name, str) or not name.strip():
        raise PosprobeError(f"name must be a non-empty string; given {name!r}")
    backbones = _backbones(raw.get("backbones"), data.image_size, base)
    read = {*data.train, data.natural, *(s.weights for s, _ in backbones if s.weights)}
    return SweepSpec(
        name=name,
        patterns=patterns,
        seeds=_seeds(raw.get("seeds", 1)),
        data=data,
        profile=profile,
        train=config,
        device=device,
        backbones=backbones,
        readouts=readouts,
        measures=measures,
        resources=_resources(_table(raw.get("resources", {}), "[resources]")),
        cache=_cache(_table(raw.get("cache", {}), "[cache]"), base),
        text=text,
        stamps={p: content_stamp(p) for p in read},
    )


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a spec file."""
    path = Path(path)
    if not path.is_file():
        raise PosprobeError(f"sweep spec not found: {path} (a TOML file; see the README's 'Sweeps')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PosprobeError(f"{path} is not UTF-8 text: {err}") from None
    return parse_spec(text, path.resolve().parent, str(path))


def plan(spec: SweepSpec) -> list[Group]:
    """Every cell of the grid, grouped by (backbone setting, training set), in the spec's order."""
    groups = []
    for setting, layer_choices in spec.backbones:
        for train in spec.data.train:
            cells = [
                SweepCell(setting, train, levels, readout, pattern, seed)
                for readout in spec.readouts
                for levels in layer_choices
                for pattern in spec.patterns
                for seed in spec.seeds
            ]
            levels = _levels_of(setting, spec.data.image_size) if spec.measures else []
            cells += [SweepCell(setting, train, lv, measure=m) for m in spec.measures for lv in [*levels, ALL]]
            groups.append(Group(setting, train, tuple(cells)))
    return groups
