"""The ``tokens`` command: how well each patch token's absolute position can be decoded from a ViT, row by row
(the ``embed`` input of block 0, then every block), per position-embedding control (keep / zero / shuffle) and per
input set (natural photos, a folder, black / white / noise); the learned position embedding's similarity map and the
token-norm maps beside it; one run directory.

The measures are in measures/tokens.py (the probe and why it is shrinkage LDA, the extraction and the feature
cache). Every mode builds the same random or named weights (same seed); only the position embedding differs.
An input set of one distinct image (black, white) has no held-out copy that could differ: its probe is trained and
scored on that image, says so (``held_out`` false), and has no interval. Every other set is split by photo.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backbones import POS_EMBEDS, Backbone, create_backbone, get_backbone_spec
from ..data import (
    SYNTHETIC,
    FolderImages,
    TensorImages,
    bundled_train_photos,
    bundled_train_set,
    display_name,
    image_group,
    synthetic_images,
)
from ..errors import PosprobeError, parse_choices
from ..features.cache import FeatureCache, default_cache_dir, encode_images
from ..features.levels import level_views
from ..measures.tokens import (
    METRICS,
    ImageSplit,
    PositionScores,
    TokenLayout,
    TokenNorms,
    TokenSet,
    check_token_backbone_name,
    cosine_similarity_map,
    extract_tokens,
    patch_pos_embed,
    position_chance,
    probe_position,
    split_images,
    token_layout,
    token_norms,
)
from ..output.rundir import atomic_run_dir, environment, markdown_report, write_csv, write_json
from ..output.token_plots import pos_embed_similarity_plot, token_norms_plot, token_position_plot

BUNDLED = "bundled"
IMAGE_CHOICES = (BUNDLED, *SYNTHETIC)
DEFINITIONS = {
    "rows": "embed: the token sequence blocks[0] receives (patch embedding + position embedding + any pre-norm); "
    "blocks.i: the output of block i",
    "probe": "shrinkage LDA from a patch token (standardised) to its patch index (P = h*w classes): Sigma = (1 - lam) "
    "S_within + lam I, lam chosen on validation images by top-1, then refitted on training + validation images; "
    "fitted per image set, mode and row on training images, scored on held-out images (split by photo)",
    "index_top1": "fraction of a test image's patch tokens whose predicted patch index is exact; ties scored in "
    "expectation over a uniform tie-break",
    "row_top1": "fraction whose most probable row (class posteriors summed over columns) is right",
    "col_top1": "fraction whose most probable column (class posteriors summed over rows) is right",
    "distance": "mean Euclidean distance in patches between the true (row, col) and that of the predicted index",
    "interval": "95% percentile bootstrap over held-out test photos (crops of one photo resampled together), 2,000 "
    "resamples; none for a set of one distinct image (black, white: trained and scored on that image)",
    "chance": "1/h, 1/w, 1/P, and the mean distance between a uniform true patch and an independent uniform guess",
    "patch_norm_maps": "(rows, h, w) mean L2 norm of each patch token over the set's images",
    "prefix_norms": "(rows, prefix) mean L2 norm of each class / register token; never part of the probe",
    "pos_embed_similarity": "(h, w, h, w) cosine similarity of each patch's learned position vector with every "
    "patch's, of the embedding as this mode left it (zero: undefined, null)",
}


@dataclass(frozen=True)
class TokenConfig:
    """Everything that determines a tokens run's numbers; saved as config.json."""

    backbone: str = "timm:vit_tiny_patch16_224"
    weights: str | None = None  # None: the backbone's default weights
    pos_embeds: tuple[str, ...] = POS_EMBEDS  # keep, zero, shuffle: one curve each
    images: tuple[str, ...] = (BUNDLED, *SYNTHETIC)  # bundled, black, white, noise, or image folders
    n_images: int = 64  # images per set (bundled photo crops, noise images, a folder's first after a seeded draw)
    image_size: int = 224
    input_norm: str = "paper"
    test_fraction: float = 0.25  # of the photos, held out for scoring
    seed: int = 0  # random weights, the shuffle permutation, crops, noise, the split
    device: str = "cpu"
    batch_size: int = 32
    cache: bool = False  # block grids through the feature cache (the command turns it on)
    cache_dir: str | None = None
    cache_max_gb: float = 32.0

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.cache and self.cache_dir is None:
            out["cache_dir"] = str(default_cache_dir())
        return out

    def feature_cache(self) -> FeatureCache | None:
        return FeatureCache(self.cache_dir, self.cache_max_gb) if self.cache else None


def parse_pos_embeds(text: str) -> tuple[str, ...]:
    """'keep,zero,shuffle' -> validated tuple, in the order given."""
    return parse_choices(text, "--pos-embed", "--pos-embed mode", POS_EMBEDS)


def parse_images(text: str) -> tuple[str, ...]:
    """'bundled,black,white,noise' or folder paths -> validated tuple; a name that is no keyword is a folder."""
    items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items:
        raise PosprobeError(f"--images needs {', '.join(IMAGE_CHOICES)} or an image folder; given '{text}'")
    for item in items:
        if item not in IMAGE_CHOICES and not Path(item).expanduser().is_dir():
            raise PosprobeError(
                f"--images: '{display_name(item)}' is neither an image folder nor one of {', '.join(IMAGE_CHOICES)}"
            )
    return items


@dataclass
class ImageSet:
    """One input set, decoded: (N, 3, S, S) images in [0, 1], their ids and the photo each belongs to."""

    name: str
    images: TensorImages
    groups: list[str]
    description: str
    skipped: list[str] = field(default_factory=list)


def _bundled(config: TokenConfig) -> ImageSet:
    """``n_images`` seeded crops of the bundled interior photos: first one crop of every photo, then a second..."""
    crops = max(1, math.ceil(config.n_images / len(bundled_train_photos())))
    full = bundled_train_set(config.image_size, crops, config.seed)
    order = sorted(range(len(full.ids)), key=lambda i: (int(full.ids[i].rsplit("#crop", 1)[1]), i))[: config.n_images]
    ids = [full.ids[i] for i in order]
    photos = len({image_group(i) for i in ids})
    desc = f"{len(ids)} seeded crops (seed {config.seed}) of {photos} bundled interior photos"
    images = TensorImages(full.images[order], ids, BUNDLED, desc)
    return ImageSet(BUNDLED, images, [image_group(i) for i in ids], desc)


def _folder(path: str, config: TokenConfig) -> ImageSet:
    folder = FolderImages(path, config.image_size)
    picks = list(range(len(folder)))
    if len(picks) > config.n_images:
        gen = torch.Generator().manual_seed(config.seed)
        picks = sorted(torch.randperm(len(picks), generator=gen)[: config.n_images].tolist())
    images, ids, skipped = [], [], []
    for i in picks:
        x = folder[i]
        if x is None:
            skipped.append(display_name(folder.ids[i]))
            continue
        images.append(x)
        ids.append(folder.ids[i])
    if not images:
        raise PosprobeError(f"--images {display_name(path)}: none of its {len(picks)} images could be read")
    desc = f"{len(ids)} images of {folder.description}" + (f", {len(skipped)} unreadable skipped" if skipped else "")
    name = display_name(path)
    return ImageSet(name, TensorImages(torch.stack(images), ids, folder.name, desc), list(ids), desc, skipped)


def _synthetic(kind: str, config: TokenConfig) -> ImageSet:
    if kind in ("black", "white"):  # one distinct image: copies would add nothing
        one = synthetic_images(kind, config.image_size)
        return ImageSet(kind, one, list(one.ids), f"one {one.description} (trained and scored on it)")
    seeds = [config.seed * 100_003 + k for k in range(config.n_images)]
    stack = torch.cat([synthetic_images("noise", config.image_size, seed=s).images for s in seeds])
    ids = [f"noise-{s}" for s in seeds]
    desc = f"{len(ids)} Gaussian noise images N(0.5, 0.25^2) clipped to [0, 1], seeds {seeds[0]}..{seeds[-1]}"
    return ImageSet("noise", TensorImages(stack, ids, "noise", desc), ids, desc)


def load_image_set(spec: str, config: TokenConfig) -> ImageSet:
    """The input set named ``spec`` (bundled, black, white, noise, or a folder)."""
    if spec == BUNDLED:
        return _bundled(config)
    if spec in SYNTHETIC:
        return _synthetic(spec, config)
    return _folder(spec, config)


@dataclass
class TokenResult:
    """Per (image set, mode): one PositionScores per row and the token norms; per mode the similarity map."""

    config: TokenConfig
    backbone: Backbone  # the first mode's (the others differ only in the position embedding)
    layout: TokenLayout
    sets: dict[str, dict]
    splits: dict[str, ImageSplit]
    scores: dict[tuple[str, str], list[PositionScores]]
    norms: dict[tuple[str, str], TokenNorms]
    similarity: dict[str, torch.Tensor | None]
    pos_notes: dict[str, str | None]
    features: dict[str, str]  # per mode: where the block tokens came from
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rows_names(self) -> list[str]:
        return self.layout.rows

    def chance(self) -> dict[str, float]:
        return position_chance(self.layout.grid)

    def rows(self) -> list[dict]:
        """tokens.csv: one row per image set x mode x row (embed, blocks)."""
        chance = self.chance()
        out = []
        for (images, mode), per_row in self.scores.items():
            peaks = self.norms[(images, mode)].peaks()
            split = self.splits[images]
            for i, (s, peak) in enumerate(zip(per_row, peaks)):
                row = {"images": images, "mode": mode, "row": s.row, "index": i}
                for m in METRICS:
                    iv = getattr(s, m)
                    row.update({m: iv.mean, f"{m}_lo": _csv(iv.lo), f"{m}_hi": _csv(iv.hi)})
                for m in METRICS:
                    row[f"chance_{m}"] = chance[m]
                row.update(
                    shrinkage=s.shrinkage,
                    n_train=len(split.train) + len(split.val),
                    n_test=s.n_test_images,
                    held_out=split.held_out,
                    patch_norm_mean=peak["patch_mean"],
                    patch_norm_max=peak["patch_max"],
                    patch_norm_max_row=peak["patch_max_at"][0],
                    patch_norm_max_col=peak["patch_max_at"][1],
                    patch_norm_max_over_median=peak["patch_max_over_median"],
                )
                row.update({f"{name}_norm": v for name, v in peak["prefix"].items()})
                out.append(row)
        return out

    @property
    def drawn_mode(self) -> str:
        """The mode whose similarity map is drawn and saved in full: keep when run, else the first."""
        return "keep" if "keep" in self.similarity else self.config.pos_embeds[0]

    def to_dict(self) -> dict:
        drawn = self.similarity[self.drawn_mode]
        matrix = None
        if drawn is not None:
            matrix = [[round(v, 5) if math.isfinite(v) else None for v in r] for r in _sq(drawn).tolist()]
        similarity = {
            "mode": self.drawn_mode,
            "matrix": matrix,  # (P, P), row-major patches
            "summary": {m: _similarity_summary(s) for m, s in self.similarity.items()},
        }
        return {
            "definitions": DEFINITIONS,
            "grid": list(self.layout.grid),
            "prefix_tokens": list(self.layout.prefix_names),
            "rows": self.layout.rows,
            "chance": self.chance(),
            "image_sets": {k: {**v, "split": self.splits[k].to_dict()} for k, v in self.sets.items()},
            "probe": [
                {"images": images, "mode": mode, "rows": [s.to_dict() for s in per_row]}
                for (images, mode), per_row in self.scores.items()
            ],
            "token_norms": [
                {"images": images, "mode": mode, **n.to_dict()} for (images, mode), n in self.norms.items()
            ],
            "pos_embed": {m: self.pos_notes[m] or "position embedding kept" for m in self.similarity},
            "pos_embed_similarity": similarity,
            "features": self.features,
            "seconds": self.seconds,
        }


def _similarity_summary(sim: torch.Tensor | None) -> dict | None:
    """Mean cosine similarity of each patch's vector with its 4-neighbours' and with every other patch's: a smooth
    (learned, 2-D) embedding has the first well above the second; a random or shuffled one has both near 0."""
    if sim is None or bool(torch.isnan(sim).all()):
        return None
    h, w = sim.shape[:2]
    flat = _sq(sim).double()
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    d = (coords[:, None] - coords[None]).abs().sum(-1)  # (P, P) city-block distance
    return {"neighbours": float(flat[d == 1].nanmean()), "others": float(flat[d > 1].nanmean())}


def _sq(s: torch.Tensor) -> torch.Tensor:
    h, w = s.shape[:2]
    return s.reshape(h * w, h * w)  # (h, w, h, w) -> (P, P)


def _csv(v: float):
    return "" if isinstance(v, float) and math.isnan(v) else v


def prepare(config: TokenConfig) -> None:
    """Validate the settings before any heavy work."""
    check_token_backbone_name(config.backbone)
    get_backbone_spec(config.backbone, config.image_size)  # an unknown name fails here, with the list
    if config.image_size < 16:
        raise PosprobeError(f"--image-size must be at least 16; given {config.image_size}")
    if config.n_images < 1:
        raise PosprobeError(f"--n-images must be at least 1; given {config.n_images}")
    if not 0 < config.test_fraction < 1:
        raise PosprobeError(f"the test fraction must be in (0, 1); given {config.test_fraction}")
    parse_pos_embeds(",".join(config.pos_embeds))
    parse_images(",".join(config.images))


def _block_reader(backbone: Backbone, image_set: ImageSet, layout: TokenLayout, config: TokenConfig, cache, progress):
    """A function i -> (N, P, D) patch tokens of block i, from the feature cache; None where it cannot serve them."""
    h, w = layout.grid
    if h != w:
        return None
    encoded = encode_images(
        backbone, image_set.images, h, config.batch_size, config.device, progress=progress, cache=cache,
        allow_stream=False,
    )  # fmt: skip
    if list(encoded.ids) != list(image_set.images.ids):
        return None
    views = level_views(encoded, backbone.levels)
    if any(v.size != (h, w) for v in views):
        return None

    def read(i: int) -> torch.Tensor:
        v = views[i]
        grid = v.data.float() * v.scale  # (N, D, h, w)
        return grid.permute(0, 2, 3, 1).reshape(grid.shape[0], h * w, grid.shape[1])  # -> (N, h, w, D) -> (N, P, D)

    return read


def run_tokens(config: TokenConfig, progress: bool = True) -> TokenResult:
    """Every token measure of one ViT (module doc); the library entry point of ``posprobe tokens``."""
    prepare(config)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    cache = config.feature_cache()

    def build(mode: str) -> Backbone:
        return create_backbone(
            config.backbone,
            config.weights,
            config.seed,
            config.input_norm,
            layers=("all",),
            pos_embed=mode,
            image_size=config.image_size,
        )

    first = build(config.pos_embeds[0])
    layout = token_layout(first, config.image_size)  # refuses a CNN or a hierarchical model before the images load
    seconds["build"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    image_sets = [load_image_set(spec, config) for spec in config.images]
    splits = {
        s.name: split_images(s.groups, config.seed, config.test_fraction, what=f"--images {s.name}") for s in image_sets
    }
    seconds["images"] = time.perf_counter() - t1
    scores, norms, similarity, notes, features = {}, {}, {}, {}, {}
    for mode in config.pos_embeds:
        backbone = first if mode == config.pos_embeds[0] else build(mode)  # one at a time: same weights, same seed
        lay = token_layout(backbone, config.image_size)
        pos = patch_pos_embed(lay)
        similarity[mode] = None if pos is None else cosine_similarity_map(pos, lay.grid)
        notes[mode] = backbone.pos_embed_note
        for image_set in image_sets:
            t = time.perf_counter()
            read = _block_reader(backbone, image_set, lay, config, cache, progress) if cache is not None else None
            tokens: TokenSet = extract_tokens(
                backbone, image_set.images.images, config.image_size, read is None, config.batch_size, config.device
            )
            tokens.block_tokens = read
            features[mode] = (
                "blocks from the feature cache (float16), embed and norms from one hooked pass (float32)"
                if read is not None
                else "one hooked forward pass (float32)"
            )
            seconds[f"encode {image_set.name} {mode}"] = time.perf_counter() - t
            t = time.perf_counter()
            per_row = []
            for r, row in enumerate(lay.rows):
                per_row.append(
                    probe_position(tokens.tokens(r), lay.grid, splits[image_set.name], image_set.groups, row,
                                   config.seed)
                )  # fmt: skip
            scores[(image_set.name, mode)] = per_row
            norms[(image_set.name, mode)] = token_norms(tokens.norms, lay)
            seconds[f"probe {image_set.name} {mode}"] = time.perf_counter() - t
            if progress:
                best = max(s.index_top1.mean for s in per_row)
                print(f"  {image_set.name} / {mode}: best top-1 {best:.3f}", flush=True)
    seconds["total"] = time.perf_counter() - t0
    sets = {
        s.name: {"description": s.description, "n": len(s.images), "photos": len(set(s.groups)), "skipped": s.skipped}
        for s in image_sets
    }
    return TokenResult(config, first, layout, sets, splits, scores, norms, similarity, notes, features, seconds)


def format_token_table(result: TokenResult) -> str:
    """Per image set, one line per row: each mode's top-1 patch index [95% interval] and distance error."""
    modes = list(result.config.pos_embeds)
    chance = result.chance()
    lines = [
        f"top-1 patch index [95%] and mean distance error (patches); chance: top-1 {chance['index_top1']:.4f}, "
        f"distance {chance['distance']:.2f}; grid {result.layout.grid[0]}x{result.layout.grid[1]}"
    ]
    for name, info in result.sets.items():
        split = result.splits[name]
        how = "scored on its training image" if not split.held_out else f"{len(split.test)} held-out test images"
        lines.append(f"images {name}: {info['description']}; {how}")
        lines.append(f"{'row':<11}" + "".join(f"{m + ' top-1':<24}{'dist':>6}   " for m in modes))
        for i, row in enumerate(result.layout.rows):
            cells = []
            for m in modes:
                s = result.scores[(name, m)][i]
                iv = s.index_top1
                text = f"{iv.mean:.3f}" + ("" if math.isnan(iv.lo) else f" [{iv.lo:.3f}, {iv.hi:.3f}]")
                cells.append(f"{text:<24}{s.distance.mean:>6.2f}   ")
            lines.append(f"{row:<11}" + "".join(cells))
    return "\n".join(lines)


def write_tokens(result: TokenResult, out: Path, overwrite: bool = False) -> Path:
    """The run directory, atomically: config.json, tokens.json, tokens.csv, environment.json, report.md,
    token_position.png, pos_embed_similarity.png and token_norms.png."""
    cfg = result.config
    with atomic_run_dir(out, overwrite) as tmp:
        write_json(tmp / "config.json", {**cfg.to_dict(), "resolved": _resolved(result)})
        write_json(tmp / "tokens.json", result.to_dict())
        write_csv(tmp / "tokens.csv", result.rows())
        write_json(tmp / "environment.json", environment(cfg.device))
        figures = ["token_position.png", "pos_embed_similarity.png", "token_norms.png"]
        facts = [
            f"Backbone: {result.backbone.name} ({result.backbone.weights_label}); {cfg.image_size} px, "
            f"grid {result.layout.grid[0]}x{result.layout.grid[1]}",
            f"Position embedding: {', '.join(cfg.pos_embeds)}",
            *(f"Images {name}: {s.get('description', '')}" for name, s in result.sets.items()),
        ]
        notes = [f"**{k}**: {v}" for k, v in DEFINITIONS.items()]
        report = markdown_report("ViT token position", facts, [format_token_table(result)], notes, figures)
        (tmp / "report.md").write_text(report, encoding="utf-8")
        label = f"{result.backbone.name} ({result.backbone.weights_label}), {cfg.image_size} px"
        curves = {
            name: {
                mode: {
                    m: [(getattr(s, m).mean, getattr(s, m).lo, getattr(s, m).hi) for s in result.scores[(name, mode)]]
                    for m in ("index_top1", "distance")
                }
                for mode in cfg.pos_embeds
            }
            for name in result.sets
        }
        token_position_plot(
            tmp / "token_position.png", result.layout.rows, curves, result.chance(), f"Token position: {label}"
        )
        mode = result.drawn_mode
        note = f"--pos-embed {mode}: {result.pos_notes[mode] or 'position embedding kept'}"
        if result.similarity[mode] is None:
            note = f"{result.backbone.name} has no learned absolute position embedding"
        pos_embed_similarity_plot(
            tmp / "pos_embed_similarity.png", result.similarity[mode], f"Position-embedding similarity: {label}", note
        )
        maps, lines = {}, {}  # the drawn mode only: one row per image set stays readable (every mode in tokens.json)
        for (name, m), n in result.norms.items():
            if m != mode:
                continue
            key = f"{name} / {m}"
            maps[key] = n.patch
            flat = n.patch.flatten(1)  # (R, h, w) -> (R, P)
            lines[key] = {"patch mean": flat.mean(1).tolist(), "patch max": flat.max(1).values.tolist()}
            lines[key].update({p: n.prefix[:, j].tolist() for j, p in enumerate(n.prefix_names)})
        token_norms_plot(tmp / "token_norms.png", result.layout.rows, maps, lines, f"Token norms ({mode}): {label}")
    return out


def _resolved(result: TokenResult) -> dict:
    """What the settings resolved to: weights, input, token layout, the controls, the sets and their splits."""
    b = result.backbone
    return {
        "backbone_weights": b.weights_label,
        "input_norm": b.input_norm,
        "input": b.input_description,
        "grid": list(result.layout.grid),
        "dim": result.layout.dim,
        "prefix_tokens": list(result.layout.prefix_names),
        "rows": result.layout.rows,
        "pos_embed": {m: result.pos_notes[m] or "position embedding kept" for m in result.similarity},
        "features": result.features,
        "image_sets": {k: {**v, "split": result.splits[k].to_dict()} for k, v in result.sets.items()},
    }
