"""The ``posprobe`` command: a thin layer over the library.

Every user error is a PosprobeError, printed as one line on stderr with exit code 2, and so is every OS error
(a full disk, a read-only folder, a name too long); SIGINT and SIGTERM print one line and exit 130 and 143
after the run directory's temporary folder is removed.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer

from .errors import PosprobeError, describe_os_error

if TYPE_CHECKING:
    from .features.cache import FeatureCache

# Options that several commands share, declared once.
OutDir = Annotated[Path, typer.Option("--out", help="Directory to create for the results (refused if it exists).")]
TrainDir = Annotated[
    Optional[Path], typer.Option("--train", help="Training image folder, e.g. DUT-S train (default: bundled photos).")
]
TestDir = Annotated[
    Optional[Path], typer.Option("--test", help="Natural test image folder, e.g. PASCAL-S (default: bundled photos).")
]
KernelSize = Annotated[int, typer.Option(help="Readout kernel size.")]
Depth = Annotated[int, typer.Option(help="Readout conv layers.")]
ReadoutPadding = Annotated[int, typer.Option(help="Readout zero padding.")]
FeatSize = Annotated[int, typer.Option(help="Side every level is resized to (what a readout reads, the cache stores).")]
ImageSize = Annotated[int, typer.Option(help="Input and target side in pixels.")]
InputNorm = Annotated[
    str,
    typer.Option(
        help="paper: the input the authors' code gives an ImageNet network ([0,1]; "
        "weights trained with another normalisation get the same mismatch), none "
        "([0,1] for any weights), imagenet, or weights (the backbone's own)."
    ),
]
Profile = Annotated[
    str,
    typer.Option(
        help="Training profile: official (the paper's 4,950 SGD updates, the authors' "
        "optimiser), quick (1,000 updates, deep readouts at most 32 wide) or demo (500 updates)."
    ),
]
Epochs = Annotated[
    Optional[int],
    typer.Option(
        help="Exactly this many passes over the training set, as the authors' "
        "code (instead of the profile's update count; lr decay at 2/3)."
    ),
]
Steps = Annotated[
    Optional[int],
    typer.Option(
        help="Exactly this many SGD updates instead of the profile's (a small "
        "training set is cycled, reshuffled every pass; lr decay at 2/3)."
    ),
]
Lr = Annotated[Optional[float], typer.Option(help="Override the profile's learning rate.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Override the profile's batch size.")]
ReadoutWidth = Annotated[
    Optional[int],
    typer.Option(
        help="Channels of a deep readout's intermediate layers, at "
        "most C; 0: C -> C as the authors (default: the profile's)."
    ),
]
Seed = Annotated[int, typer.Option(help="Seed for readout init, batch order, random weights, crops and rolls.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
CropsPerPhoto = Annotated[int, typer.Option(help="Random crops per bundled training photo.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output directory.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars.")]
UseCache = Annotated[
    bool,
    typer.Option(
        "--cache/--no-cache",
        help="Keep each image set's features in the feature "
        "cache (float16, reused by later runs); --no-cache encodes in memory.",
    ),
]
CacheDir = Annotated[
    Optional[Path], typer.Option(help="Feature cache folder (default: $POSPROBE_CACHE or ~/.cache/posprobe).")
]
CacheMaxGb = Annotated[
    float,
    typer.Option(
        help="A set whose features would exceed this many GB is streamed (encoder re-run every pass) instead of cached."
    ),
]


def _train_config(profile: str, epochs=None, lr=None, batch_size=None, seed: int = 0, readout_width=None, steps=None):
    """The profile with the command line's overrides (``readouts.train.get_profile``)."""
    from .readouts.train import get_profile

    return get_profile(profile, readout_width, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, seed=seed)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Measure how much absolute position information a vision network encodes, and where.",
)


@app.command("backbones")
def backbones_cmd() -> None:
    """List registered backbones: tapped levels (name:channels/stride), default weights, availability here."""
    from .backbones import get_backbone_spec, list_backbones

    print(f"{'name':<20}{'channels':>9}  {'default weights':<16}{'available':<10}levels")
    for name in list_backbones():
        spec = get_backbone_spec(name)
        levels = " ".join(f"{lv.name}:{lv.channels}/{lv.stride}" for lv in spec.levels)
        avail = "yes" if spec.weights_available() else "no"
        print(f"{name:<20}{spec.channels:>9}  {spec.default_weights:<16}{avail:<10}{levels}")
    print(
        "\nweights: the default, 'random' (seeded by --seed) or a local checkpoint path; "
        "strides are nominal (vgg16_nopad loses border pixels)"
    )


@app.command("probe")
def probe_cmd(
    out: OutDir,
    backbone: str = typer.Option("vgg16", help="Backbone name (see 'posprobe backbones')."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights: its default, 'random' or a checkpoint path."),
    pattern: str = typer.Option("all", help="H, V, G, HS, VS, a comma list, or 'all'."),
    target_image: list[Path] = typer.Option([], help="Extra target map from an image file (repeatable)."),
    train: TrainDir = None,
    test: TestDir = None,
    synthetic: str = typer.Option("black,white,noise", help="Synthetic test inputs, comma list, or 'none'."),
    kernel_size: KernelSize = 3,
    depth: Depth = 1,
    readout_padding: ReadoutPadding = 0,
    readout_width: ReadoutWidth = None,
    feat_size: FeatSize = 28,
    image_size: ImageSize = 224,
    input_norm: InputNorm = "paper",
    profile: Profile = "official",
    epochs: Epochs = None,
    steps: Steps = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    seed: Seed = 0,
    device: Device = "auto",
    crops_per_photo: CropsPerPhoto = 8,
    strict: bool = typer.Option(False, help="Fail on an unreadable image instead of skipping it."),
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    layers: Optional[str] = typer.Option(
        None, help="Layers to tap, comma list or 'all' (see 'posprobe layers MODEL'); default: the backbone's own taps."
    ),
    backbone_padding: Optional[str] = typer.Option(
        None,
        help="Re-pad every conv and pool of the backbone: zeros, "
        "reflect, replicate, circular or valid (default: as built).",
    ),
    pos_embed: str = typer.Option("keep", help="A ViT's learned position embedding: keep, zero or shuffle."),
    readout: str = typer.Option(
        "pem",
        help="pem (the paper's readout), or linear: also the exact best linear "
        "k x k readout (closed-form ridge), reported beside it.",
    ),
    controls: str = typer.Option(
        "pixels,rolled",  # studies.controls.DEFAULT_CONTROLS (the CLI imports no torch at startup)
        help="Controls, comma list, 'all' or 'none': pixels (PosENet on the raw image; seconds), rolled (score on "
        "rolled test images; rolls x test images of encoding), random (same architecture, random weights; about "
        "the run again), rolled-train (train again on rolled images; the training set again). "
        "Selectivity = SPC - the best control's SPC.",
    ),
    rolls: int = typer.Option(4, help="Rolled copies of each natural test image for the rolled controls."),
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
) -> None:
    """Train a readout per position pattern on a frozen backbone's features and score it on every test set."""
    from .data import parse_synthetic
    from .output.rundir import check_out_dir
    from .readouts.train import is_official
    from .studies.controls import parse_controls
    from .studies.probe_run import ProbeRunConfig, execute, format_selectivity, format_table, write
    from .targets import resolve_patterns

    check_out_dir(out, overwrite)
    patterns = resolve_patterns(pattern) if pattern.strip() or not target_image else []
    config = ProbeRunConfig(
        backbone=backbone,
        patterns=tuple(patterns),
        target_images=tuple(str(p) for p in target_image),
        synthetic=tuple(parse_synthetic(synthetic)),
        strict=strict,
        backbone_padding=backbone_padding,
        pos_embed=pos_embed,
        readout=readout,
        controls=parse_controls(controls),
        rolls=rolls,
        **_shared_settings(locals()),
    )
    run = execute(config, progress=not quiet)
    write(run, out, overwrite)
    print(
        f"{backbone} ({run.backbone.weights_label}), readout k={kernel_size} depth={depth} "
        f"padding={readout_padding}, profile {profile}"
        + ("" if is_official(config.train) else f" ({config.train.describe(deep=depth > 1)})")
    )
    print(f"input: {run.backbone.input_description}")
    print(f"training: {run.probe.schedule_.describe()}")
    for line in _surgery_lines(run.backbone, image_size):
        print(line)
    print(format_table(run.metric_rows()))
    if run.controls is not None:
        print("selectivity = SPC - max(0, the best control's SPC); content share = SPC on the photos - on them rolled")
        print(format_selectivity(run.controls.selectivity))
        for note in run.controls.notes:
            print(f"control {note}")
    _warn_unconverged(
        {
            f"readout {k}"
            + ("" if a.encoder == "network" else f" ({a.encoder})")
            + (" trained on rolled images" if a.training == "rolled" else ""): c
            for a in run.arms()
            for k, c in a.probe.convergence_.items()
        }
    )
    if run.linear is not None:
        print(run.linear.describe())
    print(f"wrote {out}")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Report directory to create.")] = Path("posprobe-demo"),
    profile: Annotated[
        str, typer.Option(help="Training profile: demo (500 updates, 15 minutes on 2 cores), quick or official.")
    ] = "demo",
    seeds: int = typer.Option(3, help="Seeds per readout (intervals and verdicts over images and seeds)."),
    device: Device = "auto",
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Tables 1, 2(b), 4 and Figs. 4-7 on the bundled photos, 3 seeds, with bundled stand-ins for the paper's CNNs."""
    from .output.rundir import check_out_dir, resolve_device
    from .studies.demo import run_demo

    check_out_dir(out, overwrite)
    if seeds < 1:
        raise PosprobeError(f"--seeds must be at least 1; given {seeds}")
    report, result = run_demo(
        out,
        profile=profile,
        device=resolve_device(device),
        overwrite=overwrite,
        progress=not quiet,
        cache=_feature_cache(cache, cache_dir, cache_max_gb),
        seeds=seeds,
    )
    print(report)
    _warn_unconverged(_study_verdicts(result))
    _warn_unsettled(result)
    print(f"wrote {out}")


@app.command("reproduce")
def reproduce_cmd(
    table: str = typer.Argument(
        ...,
        help="table1, table2a, table2b, table3, table4, fig-qualitative, fig-padding, "
        "fig-content-loss, a comma list, or all.",
    ),
    out: OutDir = ...,
    train: TrainDir = None,
    test: TestDir = None,
    profile: Profile = "official",
    seeds: int = typer.Option(
        1,
        help="Repeat every readout with seeds 0..N-1: intervals and verdicts over images "
        "and seeds (use 3 or more when a direction matters).",
    ),
    backbone_map: list[str] = typer.Option(
        [],
        help="PAPER=BACKBONE[:WEIGHTS], e.g. vgg16=vgg16_hed (repeatable), "
        "or 'auto': bundled stand-ins where the paper's weights are missing.",
    ),
    epochs: Epochs = None,
    steps: Steps = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    readout_width: ReadoutWidth = None,
    input_norm: InputNorm = "paper",
    crops_per_photo: CropsPerPhoto = 8,
    device: Device = "auto",
    controls: str = typer.Option(
        "pixels,rolled",
        help="Controls of every table row, comma list or 'none': pixels (PosENet with the row's readout; seconds), "
        "rolled (scored on rolled test photos; rolls x test images of encoding per backbone).",
    ),
    rolls: int = typer.Option(4, help="Rolled copies of each natural test image for the rolled control."),
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Reproduce the paper's tables and figures, our numbers beside the paper's, in one report."""
    from .output.rundir import check_out_dir, resolve_device
    from .studies.controls import check_rolls, parse_controls, study_controls
    from .studies.reproduce import build_image_sets, describe_data, resolve_presets, run_reproduce
    from .studies.study import parse_backbone_map_option

    check_out_dir(out, overwrite)
    if seeds < 1:
        raise PosprobeError(f"--seeds must be at least 1; given {seeds}")
    presets = resolve_presets([t.strip() for t in table.split(",") if t.strip()])
    mapping, auto = parse_backbone_map_option(backbone_map)
    config = _train_config(
        profile, epochs=epochs, lr=lr, batch_size=batch_size, readout_width=readout_width, steps=steps
    )
    chosen = study_controls(parse_controls(controls))
    check_rolls(rolls)
    train_set, test_sets = build_image_sets(
        str(train) if train else None,
        str(test) if test else None,
        presets,
        crops_per_photo=crops_per_photo,
    )
    report, result = run_reproduce(
        presets,
        out,
        config,
        profile,
        train_set,
        test_sets,
        seeds,
        mapping,
        auto,
        resolve_device(device),
        overwrite,
        not quiet,
        describe_data(train, test),
        cache=_feature_cache(cache, cache_dir, cache_max_gb),
        input_norm=input_norm,
        controls=chosen,
        rolls=rolls,
    )
    print(report)
    _warn_unconverged(_study_verdicts(result))
    _warn_unsettled(result)
    print(f"wrote {out}")


def _study_verdicts(result) -> dict:
    """'vgg16/k7 G' -> each seed's Convergence, once per trained readout (rows sharing it named together)."""
    from .studies.study import distinct_trainings

    out = {}
    for places, pattern, verdicts in distinct_trainings(result):
        rows = list(dict.fromkeys(row for _, row in places))
        out[f"{rows[0]} {pattern}" + (f" (= {', '.join(rows[1:])})" if len(rows) > 1 else "")] = verdicts
    return out


def _warn_unconverged(verdicts: dict) -> None:
    """One line on stderr per readout that did not finish training or draws a flat map (convergence.RULE), so
    no such score passes unread. verdicts: name -> Convergence, or name -> each seed's Convergence."""
    from .readouts.convergence import RULE

    told = False
    for name, cs in verdicts.items():
        cs = cs if isinstance(cs, list) else [cs]
        odd = [(i, c) for i, c in enumerate(cs) if c.status != "converged"]
        if odd:
            seeds = f" (seed {', '.join(str(i) for i, _ in odd)} of {len(cs)})" if len(cs) > 1 else ""
            print(f"posprobe: warning: {name}{seeds}: {odd[0][1].describe()}", file=sys.stderr)
            told = True
    if told:
        print(f"posprobe: the rule: {RULE}; the loss curves are in the run directory", file=sys.stderr)


def _warn_unsettled(result) -> None:
    """One stderr line per trained readout and test set whose finished seeds still disagree (± in the report);
    table rows that share the readout are named together."""
    from .intervals import SEED_SPREAD_LIMIT
    from .studies.study import unsettled_seeds

    shared: dict[tuple, tuple[list[str], float]] = {}
    for (study, row, pattern, test_set), sd in sorted(unsettled_seeds(result).items()):
        readout = tuple(id(c) for c in result.convergence[(study, row, pattern)])  # shared readouts: same objects
        shared.setdefault((readout, pattern, test_set), ([], sd))[0].append(f"{study} {row}")
    for (_, pattern, test_set), (rows, sd) in shared.items():
        print(
            f"posprobe: warning: {' = '.join(rows)} {pattern} ({test_set}): seeds disagree, SPC sd {sd:.3f} > "
            f"{SEED_SPREAD_LIMIT} (± in the report; a longer schedule settles it)",
            file=sys.stderr,
        )


def _feature_cache(use: bool, cache_dir: Optional[Path], max_gb: float) -> FeatureCache | None:
    """The FeatureCache the options ask for, or None (--no-cache: features in memory)."""
    from .features.cache import FeatureCache

    return FeatureCache(cache_dir, max_gb) if use else None


def _shared_settings(options: dict) -> dict:
    """The ``ReadoutSettings`` fields that ``probe`` and ``layer-curve`` take from the same options."""
    from .output.rundir import resolve_device

    o = options
    return {
        "weights": o["weights"],
        "input_norm": o["input_norm"],
        "layers": _layer_list(o["layers"]),
        "kernel_size": o["kernel_size"],
        "depth": o["depth"],
        "readout_padding": o["readout_padding"],
        "feat_size": o["feat_size"],
        "image_size": o["image_size"],
        "profile": o["profile"],
        "train": _train_config(
            o["profile"], o["epochs"], o["lr"], o["batch_size"], o["seed"], o["readout_width"], o["steps"]
        ),
        "seed": o["seed"],
        "device": resolve_device(o["device"]),
        "train_dir": str(o["train"]) if o["train"] else None,
        "test_dir": str(o["test"]) if o["test"] else None,
        "crops_per_photo": o["crops_per_photo"],
        "cache": o["cache"],
        "cache_dir": str(o["cache_dir"]) if o["cache_dir"] else None,
        "cache_max_gb": o["cache_max_gb"],
    }


def _layer_list(layers: Optional[str]) -> Optional[tuple[str, ...]]:
    from .backbones import parse_layers

    return parse_layers(layers) if layers is not None else None


def _surgery_lines(backbone, image_size: int) -> list[str]:
    """What --backbone-padding / --pos-embed changed, and each level's resulting size."""
    lines = []
    if backbone.padding_report is not None:
        lines.append(backbone.padding_report.describe())
        shapes = backbone.level_shapes(image_size)
        sizes = ", ".join(f"{lv.name} {h}x{w}" for lv, (_, h, w) in zip(backbone.levels, shapes))
        lines.append(f"level sizes at {image_size}x{image_size}: {sizes}")
    if backbone.pos_embed_note:
        lines.append(backbone.pos_embed_note)
    return lines


@app.command("layers")
def layers_cmd(
    model: str = typer.Argument(..., help="A backbone: a preset (vgg16), tv:NAME (torchvision) or timm:NAME."),
    image_size: int = typer.Option(224, help="Input side at which map sizes are shown."),
    backbone_padding: Optional[str] = typer.Option(
        None, help="Show sizes after re-padding: zeros, reflect, replicate, circular or valid."
    ),
) -> None:
    """List the layers a backbone can tap (--layers names) with channels, nominal stride and size; * = default."""
    from .backbones import get_backbone_spec, layer_table

    rows = layer_table(model, image_size, backbone_padding)
    spec = get_backbone_spec(model, image_size)
    width = max([len(r.name) for r in rows] + [5]) + 2
    print(f"  {'layer':<{width}}{'channels':>9}{'stride':>8}{'size':>11}  also")
    for r in rows:
        mark = "*" if r.default else " "
        size = f"{r.size[0]}x{r.size[1]}"
        print(f"{mark} {r.name:<{width}}{r.channels:>9}{r.stride:>8}{size:>11}  {' '.join(r.aliases)}")
    fixed = f"; built for {spec.input_size}x{spec.input_size} inputs" if spec.input_size else ""
    print(
        f"\n{len(rows)} layers of {model} at {image_size}x{image_size}{fixed}; * = default taps; stride is "
        f"nominal; weights: {', '.join(spec.weight_names[:6])}{', ...' if len(spec.weight_names) > 6 else ''} "
        "or a checkpoint path"
    )


@app.command("layer-curve")
def layer_curve_cmd(
    out: OutDir,
    backbone: list[str] = typer.Option(..., help="NAME or NAME@LAYER,LAYER (repeatable: one line each)."),
    layers: Optional[str] = typer.Option(None, help="Layers for every --backbone without '@' (default: its taps)."),
    weights: Optional[str] = typer.Option(None, help="Weights for every backbone: default, 'random' or a path."),
    backbone_padding: Optional[str] = typer.Option(
        None, help="Comma list of zeros, reflect, replicate, circular, valid: one line per backbone and padding."
    ),
    pos_embed: str = typer.Option("keep", help="Comma list of keep, zero, shuffle: one line per setting."),
    pattern: str = typer.Option("H,G", help="H, V, G, HS, VS, a comma list, or 'all'."),
    train: TrainDir = None,
    test: TestDir = None,
    kernel_size: KernelSize = 3,
    depth: Depth = 1,
    readout_padding: ReadoutPadding = 0,
    readout_width: ReadoutWidth = None,
    feat_size: FeatSize = 28,
    image_size: ImageSize = 224,
    input_norm: InputNorm = "paper",
    include_all: bool = typer.Option(
        True, "--all/--no-all", help="Also train one readout over all levels together (the paper's last column)."
    ),
    controls: str = typer.Option(
        "pixels,rolled",
        help="Controls of every level, comma list or 'none': pixels (PosENet with the same readout: selectivity), "
        "rolled (scored on rolled test photos: content share).",
    ),
    rolls: int = typer.Option(4, help="Rolled copies of each test image for the rolled control."),
    pvf: bool = typer.Option(
        True,
        "--pvf/--no-pvf",
        help="Each level's readout-free position-variance fraction with its interval (an N x N Gram matrix over "
        "the training images: seconds for the bundled 312, hours on CPU for DUT-S's 10,553).",
    ),
    profile: Profile = "official",
    epochs: Epochs = None,
    steps: Steps = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    seed: Seed = 0,
    device: Device = "auto",
    crops_per_photo: CropsPerPhoto = 8,
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Where position lives: probe every tapped level on its own and plot SPC against depth (Table 3, any network)."""
    from .output.rundir import check_out_dir
    from .studies.controls import parse_controls
    from .studies.layer_curve import LayerCurveConfig, format_curve_table, run_layer_curve, write_layer_curve
    from .targets import resolve_patterns

    check_out_dir(out, overwrite)
    paddings = tuple(p.strip() for p in backbone_padding.split(",") if p.strip()) if backbone_padding else (None,)
    config = LayerCurveConfig(
        backbones=tuple(backbone),
        paddings=paddings,
        pos_embeds=tuple(p.strip() for p in pos_embed.split(",") if p.strip()) or ("keep",),
        patterns=tuple(resolve_patterns(pattern)),
        include_all=include_all,
        controls=parse_controls(controls),
        rolls=rolls,
        position_variance=pvf,
        **_shared_settings(locals()),
    )
    curve = run_layer_curve(config, progress=not quiet)
    write_layer_curve(curve, out, overwrite)
    for label, facts in curve.resolved.items():
        extra = [facts["backbone_padding"]["description"]] if facts["backbone_padding"] else []
        extra += [facts["pos_embed"]] if facts["pos_embed"] else []
        print(f"{label}: {facts['weights']}" + "".join(f"; {e}" for e in extra))
    print(format_curve_table(curve.rows))
    _warn_unconverged(curve.convergence)
    print(f"wrote {out}")


@app.command("channels")
def channels_cmd(
    out: OutDir,
    backbone: str = typer.Option(..., help="Backbone name (see 'posprobe backbones'), tv:NAME or timm:NAME."),
    level: Optional[str] = typer.Option(
        None, help="The layer whose channels are ranked (see 'posprobe layers MODEL'); default: the deepest tap."
    ),
    weights: Optional[str] = typer.Option(None, help="Backbone weights: its default, 'random' or a checkpoint path."),
    backbone_padding: Optional[str] = typer.Option(
        None, help="Re-pad every conv and pool: zeros, reflect, replicate, circular or valid (default: as built)."
    ),
    pos_embed: str = typer.Option("keep", help="A ViT's learned position embedding: keep, zero or shuffle."),
    rankers: str = typer.Option("linear,pvf,flip,border", help="Channel rankers, comma list (README: Channels)."),
    ablation: str = typer.Option(
        "mean",
        help="mean: set to the training mean; zero: set to 0; comma list (README: Channels, on when they differ).",
    ),
    k: str = typer.Option("1,2,5,10,20,50", help="Channels to ablate, percent of the level, comma list."),
    draws: int = typer.Option(5, help="Random k-channel draws per k (the comparison for every ranker)."),
    readouts: str = typer.Option("pem,linear", help="Readouts re-scored: pem (trained, per seed), linear (exact)."),
    seeds: int = typer.Option(1, help="PEM readout seeds (--seed, --seed + 1, ...)."),
    pattern: str = typer.Option("H,V,G", help="H, V, G, HS, VS, a comma list, or 'all'."),
    train: TrainDir = None,
    test: TestDir = None,
    kernel_size: KernelSize = 3,
    depth: Depth = 1,
    readout_padding: ReadoutPadding = 0,
    readout_width: ReadoutWidth = None,
    feat_size: FeatSize = 28,
    image_size: ImageSize = 224,
    input_norm: InputNorm = "paper",
    profile: Profile = "official",
    epochs: Epochs = None,
    steps: Steps = None,
    lr: Lr = None,
    batch_size: BatchSize = None,
    seed: Seed = 0,
    device: Device = "auto",
    crops_per_photo: CropsPerPhoto = 8,
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Which channels carry position: rank a level's channels, ablate the top k, compare with random k."""
    from .errors import parse_choices
    from .measures.channels import ABLATIONS, RANKERS
    from .output.rundir import check_out_dir
    from .studies.channel_run import (
        READOUTS,
        ChannelConfig,
        format_channel_table,
        parse_k_percent,
        run_channels,
        write_channels,
    )
    from .targets import resolve_patterns

    check_out_dir(out, overwrite)
    config = ChannelConfig(
        backbone=backbone,
        level=level,
        backbone_padding=backbone_padding,
        pos_embed=pos_embed,
        rankers=parse_choices(rankers, "--rankers", "ranker", RANKERS),
        ablations=parse_choices(ablation, "--ablation", "ablation", ABLATIONS),
        k_percent=parse_k_percent(k),
        draws=draws,
        seeds=seeds,
        readouts=parse_choices(readouts, "--readouts", "readout", READOUTS),
        patterns=tuple(resolve_patterns(pattern)),
        **_shared_settings({**locals(), "layers": None}),
    )
    result = run_channels(config, progress=not quiet)
    write_channels(result, out, overwrite)
    print(f"{result.backbone.name} ({result.backbone.weights_label}); input: {result.backbone.input_description}")
    for line in _surgery_lines(result.backbone, image_size):
        print(line)
    for mode in config.ablations:
        print(format_channel_table(result, mode))
    _warn_unconverged(result.convergence)
    print(f"({result.seconds['total']:.1f} s)")
    print(f"wrote {out}")


cache_app = typer.Typer(no_args_is_help=True, help="The feature cache: list entries, total size, verify, clear.")


@app.command("measure")
def measure_cmd(
    out: OutDir,
    backbone: str = typer.Option(..., help="Backbone name (see 'posprobe backbones'), tv:NAME or timm:NAME."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights: its default, 'random' or a checkpoint path."),
    layers: Optional[str] = typer.Option(
        None, help="Layers to tap, comma list or 'all' (see 'posprobe layers MODEL'); default: the backbone's own taps."
    ),
    backbone_padding: Optional[str] = typer.Option(
        None, help="Re-pad every conv and pool: zeros, reflect, replicate, circular or valid (default: as built)."
    ),
    pos_embed: str = typer.Option("keep", help="A ViT's learned position embedding: keep, zero or shuffle."),
    input_norm: InputNorm = "paper",
    train: TrainDir = None,
    test: TestDir = None,
    rolled: bool = typer.Option(
        False, "--rolled", help="Also measure the training images circularly rolled by a seeded uniform shift."
    ),
    interval: bool = typer.Option(
        True,
        "--interval/--no-interval",
        help="The PVF's 95% interval over photos (an N x N Gram matrix: seconds for the bundled 312 images, hours "
        "on CPU for DUT-S's 10,553); without it, the point values only.",
    ),
    shifts: Optional[str] = typer.Option(
        None, help="EQ-T shifts in input pixels, comma list (default: 1, 2 and 4 x the deepest level's stride)."
    ),
    image_size: ImageSize = 224,
    feat_size: FeatSize = 28,
    seed: Seed = 0,
    device: Device = "auto",
    crops_per_photo: CropsPerPhoto = 8,
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Readout-free measures per level: position-variance fraction, mean and blank-input maps, EQ-T equivariance."""
    from .output.rundir import check_out_dir, resolve_device
    from .studies.measure_run import MeasureConfig, format_measure_table, parse_shifts, run_measures, write_measures

    check_out_dir(out, overwrite)
    config = MeasureConfig(
        backbone=backbone,
        weights=weights,
        layers=_layer_list(layers),
        backbone_padding=backbone_padding,
        pos_embed=pos_embed,
        input_norm=input_norm,
        train_dir=str(train) if train else None,
        test_dir=str(test) if test else None,
        rolled=rolled,
        interval=interval,
        shifts=parse_shifts(shifts),
        image_size=image_size,
        feat_size=feat_size,
        seed=seed,
        device=resolve_device(device),
        crops_per_photo=crops_per_photo,
        cache=cache,
        cache_dir=str(cache_dir) if cache_dir else None,
        cache_max_gb=cache_max_gb,
    )
    result = run_measures(config, progress=not quiet)
    write_measures(result, out, overwrite)
    print(f"{backbone} ({result.backbone.weights_label}); input: {result.backbone.input_description}")
    for line in _surgery_lines(result.backbone, image_size):
        print(line)
    print(format_measure_table(result))
    print(f"({result.seconds['total']:.1f} s)")
    print(f"wrote {out}")


app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls_cmd(cache_dir: CacheDir = None) -> None:
    """One line per entry: key, state, backbone, weights, image set, images x channels x size, GB."""
    from .features.cache import GB, FeatureCache

    cache = FeatureCache(cache_dir)
    entries = cache.entries()
    print(f"{cache.root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    head = ("key", "state", "backbone", "weights", "image set", "shape", "GB")
    rows = []
    for e in entries:
        m = e.manifest or {}
        state = (
            f"damaged ({e.damage})"
            if e.damage
            else "old format"
            if e.outdated
            else "complete"
            if e.complete
            else f"partial {e.rows_done}"
        )
        shape = f"{m['rows']}x{m['channels']}x{m['feat_size']}^2" if m else "-"
        rows.append(
            (
                e.key[:12],
                state,
                str(m.get("backbone", "-")),
                str(m.get("weights", "-")),
                str(m.get("image_set", "-")),
                shape,
                f"{e.bytes / GB:.2f}",
            )
        )
    if not rows:
        return
    # every column as wide as its longest value: a weights label ("... stand-in, not ImageNet VGG16") is read whole
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1].rjust(widths[-1]))


@cache_app.command("du")
def cache_du_cmd(cache_dir: CacheDir = None) -> None:
    """Total size on disk of the cache, complete and partial entries apart, and the free space left."""
    import shutil

    from .features.cache import GB, FeatureCache

    cache = FeatureCache(cache_dir)
    entries = cache.entries()
    done = [e for e in entries if e.complete and not e.outdated]
    partial = [e for e in entries if not e.complete and not e.damage]
    outdated = [e for e in entries if e.outdated]
    damaged = [e for e in entries if e.damage]
    existing = next(p for p in (cache.root, *cache.root.parents) if p.exists())
    free = shutil.disk_usage(existing).free / GB
    print(
        f"{sum(e.bytes for e in entries) / GB:.2f} GB in {cache.root}: {len(done)} complete entries "
        f"({sum(e.bytes for e in done) / GB:.2f} GB), {len(partial)} partial "
        f"({sum(e.bytes for e in partial) / GB:.2f} GB)"
        + (
            f", {len(outdated)} of an older format, never read ({sum(e.bytes for e in outdated) / GB:.2f} GB; "
            "'posprobe cache clear --partial' removes them)"
            if outdated
            else ""
        )
        + (
            f", {len(damaged)} damaged ({sum(e.bytes for e in damaged) / GB:.2f} GB; 'posprobe cache clear "
            "--damaged' removes them)"
            if damaged
            else ""
        )
        + f"; {free:.1f} GB free"
    )


@cache_app.command("verify")
def cache_verify_cmd(
    keys: Optional[list[str]] = typer.Argument(
        None, help="Key prefixes to verify (as 'cache ls' shows them); default: every complete entry."
    ),
    cache_dir: CacheDir = None,
) -> None:
    """Read every complete entry whole against its checksums; damaged ones are moved aside (exit 1 if any)."""
    from .features.cache import GB, FeatureCache

    cache = FeatureCache(cache_dir, log=None)
    _known_keys(cache, keys)
    results = cache.verify(keys or None)
    for e, damage in results:
        print(f"{e.key[:12]}  {'DAMAGED: ' + damage if damage else 'ok'}  ({e.bytes / GB:.2f} GB)")
    bad = [e for e, damage in results if damage is not None]
    stuck = [e for e in bad if e.path.exists()]  # a read-only cache: damaged, but still in place
    where = f"moved to {cache.root / 'damaged'}" if not stuck else f"{len(stuck)} could not be moved aside"
    print(
        f"verified {len(results)} entr{'y' if len(results) == 1 else 'ies'} in {cache.root}: "
        + (
            f"{len(bad)} damaged, {where} ('posprobe cache clear --damaged' removes them)"
            if bad
            else "all match their checksums"
        )
    )
    if bad:
        raise typer.Exit(1)


def _known_keys(cache, keys: Optional[list[str]]) -> None:
    """Refuse a key prefix that matches no entry, naming where to look."""
    known = [e.key for e in cache.entries()]
    for k in keys or []:
        if not any(key.startswith(k) for key in known):
            raise PosprobeError(f"no cache entry starts with '{k}'; run 'posprobe cache ls' to list them")


@cache_app.command("clear")
def cache_clear_cmd(
    keys: Optional[list[str]] = typer.Argument(
        None, help="Key prefixes to remove (as 'cache ls' shows them); default: every entry."
    ),
    partial: bool = typer.Option(
        False,
        "--partial",
        help="Only entries that cannot be used: extractions that did "
        "not finish, damaged entries, and entries of an older cache format.",
    ),
    damaged: bool = typer.Option(
        False,
        "--damaged",
        help="Only damaged entries (moved aside, or whose manifest "
        "or file size is wrong; 'cache verify' checks the data itself).",
    ),
    cache_dir: CacheDir = None,
) -> None:
    """Remove cache entries (entries another process is writing are left alone)."""
    from .features.cache import GB, FeatureCache

    cache = FeatureCache(cache_dir)
    _known_keys(cache, keys)
    removed, freed, busy = cache.clear(keys or None, incomplete_only=partial, damaged_only=damaged)
    print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} ({freed / GB:.2f} GB) from {cache.root}")
    if busy:
        print(
            f"left {len(busy)} entr{'y' if len(busy) == 1 else 'ies'} in use by another process: "
            + ", ".join(k[:12] for k in busy)
        )


@app.command("canvas")
def canvas_cmd(
    out: OutDir,
    backbone: str = typer.Option(..., help="Backbone name (see 'posprobe backbones'), tv:NAME or timm:NAME."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights: its default, 'random' or a checkpoint path."),
    layers: Optional[str] = typer.Option(
        None, help="Layers to tap, comma list or 'all' (see 'posprobe layers MODEL'); default: the backbone's own taps."
    ),
    backbone_padding: Optional[str] = typer.Option(
        None,
        help="Comma list of zeros, reflect, replicate, circular, valid: one backbone each (default: as built).",
    ),
    canvas: str = typer.Option("black", help="Canvas colours, comma list of black, white, mean (the content's mean)."),
    placement: str = typer.Option("grid", help="grid (every content at every cell) or continuous (uniform)."),
    grid: int = typer.Option(3, help="Cells per side of the grid the cell classifier names."),
    jitter: int = typer.Option(0, help="Grid placements: uniform offset of up to this many px per axis."),
    positions: Optional[int] = typer.Option(None, help="Continuous placements per content (default: grid^2)."),
    content: int = typer.Option(64, help="Side of the pasted photo crop in px."),
    image_size: int = typer.Option(224, help="Canvas side in px (the network's input)."),
    per_photo: int = typer.Option(4, help="Random square crops (contents) per photo."),
    distance_bins: Optional[str] = typer.Option(
        None, help="Bin edges of the distance to the border in px, comma list (default: 0,1,2,4,8,...)."
    ),
    feat_size: Optional[int] = typer.Option(
        None, help="Side levels are cached at (default: the largest level's, so every pooled level is exact)."
    ),
    train: TrainDir = None,
    test: Optional[Path] = typer.Option(
        None,
        "--test",
        help="Test photo folder (default: the bundled test photos; with --train alone, a seeded "
        "quarter of its photos, split by photo).",
    ),
    input_norm: InputNorm = "paper",
    seed: Seed = 0,
    device: Device = "auto",
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Where on a canvas is the content? Linear probes of pooled features, by padding, canvas and border distance."""
    from .measures.canvas import parse_colours
    from .output.rundir import check_out_dir, resolve_device
    from .studies.canvas_run import (
        CanvasConfig,
        format_canvas_table,
        parse_edges,
        parse_paddings,
        run_canvas,
        write_canvas,
    )

    check_out_dir(out, overwrite)
    config = CanvasConfig(
        backbone=backbone,
        weights=weights,
        layers=_layer_list(layers),
        paddings=parse_paddings(backbone_padding),
        canvases=parse_colours(canvas),
        placement=placement,
        grid=grid,
        jitter=jitter,
        positions=positions,
        content=content,
        image_size=image_size,
        per_photo=per_photo,
        distance_edges=parse_edges(distance_bins),
        feat_size=feat_size,
        input_norm=input_norm,
        train_dir=str(train) if train else None,
        test_dir=str(test) if test else None,
        seed=seed,
        device=resolve_device(device),
        cache=cache,
        cache_dir=str(cache_dir) if cache_dir else None,
        cache_max_gb=cache_max_gb,
    )
    result = run_canvas(config, progress=not quiet)
    write_canvas(result, out, overwrite)
    for label, b in result.backbones.items():
        print(f"{backbone} ({b.weights_label}), padding {label}; input: {b.input_description}")
        for line in _surgery_lines(b, image_size):
            print(line)
    print(format_canvas_table(result))
    print(f"({result.seconds['total']:.1f} s)")
    print(f"wrote {out}")


@app.command("sweep")
def sweep_cmd(
    spec: Path = typer.Argument(..., help="The grid: a TOML file (see the README's 'Sweeps')."),
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Sweep folder: a new one, or an earlier run's to resume it (finished cells are kept)."
        ),
    ] = ...,
    dry_run: bool = typer.Option(
        False, help="List the groups, their cells, estimated cost and cache size; run nothing."
    ),
    executor: str = typer.Option("local", help="local (this process) or ray (one task per group on a Ray cluster)."),
    ray_address: str = typer.Option(
        "auto",
        help="With --executor ray: auto (the cluster this machine joined), HOST:PORT, or local (start one here).",
    ),
    fail_fast: bool = typer.Option(False, help="Stop at the first failed cell (default: record it and go on)."),
    quiet: Quiet = False,
) -> None:
    """Run a grid of backbones x readouts/measures x layers x patterns x seeds from one spec; resumable; writes
    results.csv/.parquet, summary.csv and a self-contained report.html. Exit code 1 when any cell failed."""
    from .studies.sweep import EXECUTORS, run_sweep
    from .studies.sweep_group import plural
    from .studies.sweep_spec import load_spec, plan

    if executor not in EXECUTORS:
        from .errors import unknown_choice

        raise unknown_choice("--executor", executor, EXECUTORS)
    config = load_spec(spec)
    if dry_run:
        from .studies.sweep_cost import describe_costs
        from .studies.sweep_store import CellStore

        print(describe_costs(config, plan(config), CellStore(out, create=False) if out.is_dir() else None))
        return
    outcome = run_sweep(config, out, executor, ray_address, fail_fast, progress=not quiet)
    for note in outcome["notes"]:
        print(f"posprobe: note: {note}", file=sys.stderr)
    ran, failed = outcome["cells"] - outcome["done_before"], outcome["failed"]
    print(
        f"{plural(ran, 'cell')} run in {outcome['seconds']:.0f} s, {outcome['done_before']} done before; "
        f"{failed} failed. Wrote {out / 'report.html'}, results.csv, summary.csv"
    )
    if failed:
        print(
            f"posprobe: {plural(failed, 'cell')} failed (errors in results.csv and report.html); "
            "run the same command again to retry them",
            file=sys.stderr,
        )
        raise typer.Exit(1)


@app.command("sweep-report")
def sweep_report_cmd(
    folder: Path = typer.Argument(..., help="A sweep folder (posprobe sweep --out)."),
) -> None:
    """Write a sweep folder's tables and report.html again from its finished cells (e.g. while it still runs)."""
    from .studies.sweep import write_report

    if not folder.is_dir():
        raise PosprobeError(f"sweep folder not found: {folder}")
    summary = write_report(folder)
    for note in summary["notes"]:
        print(f"posprobe: note: {note}", file=sys.stderr)
    print(f"wrote {folder / 'report.html'}, results.csv, summary.csv ({len(summary['results'])} cells)")


@app.command("tokens")
def tokens_cmd(
    out: OutDir,
    backbone: str = typer.Option(..., help="A timm vision transformer, timm:NAME (e.g. timm:vit_tiny_patch16_224)."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights: its default, 'random' or a checkpoint path."),
    pos_embed: str = typer.Option(
        "keep,zero,shuffle", help="Position-embedding controls, comma list of keep, zero, shuffle: one curve each."
    ),
    images: str = typer.Option(
        "bundled,black,white,noise",
        help="Input sets, comma list: bundled (crops of the bundled photos), black, white, noise, or image folders.",
    ),
    n_images: int = typer.Option(64, help="Images per set (bundled crops, noise images, a folder's seeded draw)."),
    input_norm: InputNorm = "paper",
    image_size: ImageSize = 224,
    seed: Seed = 0,
    device: Device = "auto",
    cache: UseCache = True,
    cache_dir: CacheDir = None,
    cache_max_gb: CacheMaxGb = 32.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """ViT token position per block: a position probe (top-1 row / column / patch, distance error), the position-
    embedding similarity map and the token-norm maps, per --pos-embed control and input set."""
    from .output.rundir import check_out_dir, resolve_device
    from .studies.token_run import (
        TokenConfig,
        format_token_table,
        parse_images,
        parse_pos_embeds,
        run_tokens,
        write_tokens,
    )

    check_out_dir(out, overwrite)
    config = TokenConfig(
        backbone=backbone,
        weights=weights,
        pos_embeds=parse_pos_embeds(pos_embed),
        images=parse_images(images),
        n_images=n_images,
        image_size=image_size,
        input_norm=input_norm,
        seed=seed,
        device=resolve_device(device),
        cache=cache,
        cache_dir=str(cache_dir) if cache_dir else None,
        cache_max_gb=cache_max_gb,
    )
    result = run_tokens(config, progress=not quiet)
    write_tokens(result, out, overwrite)
    print(f"{backbone} ({result.backbone.weights_label}); input: {result.backbone.input_description}")
    print(format_token_table(result))
    print(f"({result.seconds['total']:.1f} s)")
    print(f"wrote {out}")


@app.command("bench")
def bench_cmd(
    backbone: list[str] = typer.Option(["vgg16"], "--backbone", help="Backbone to time (repeatable)."),
    weights: str = typer.Option("random", help="Weights: random is fine for timing; or the backbone's named ones."),
    n_train: int = typer.Option(64, help="Training images (bundled photo crops in memory, else seeded noise)."),
    n_test: int = typer.Option(12, help="Natural test images (plus black, white and noise)."),
    synthetic_dataset: Optional[int] = typer.Option(
        None,
        help="Time on N JPEG files at DUT-S's sizes, split as DUT-S : PASCAL-S (11403 = the paper's 10,553 + 850), "
        "decoded from disk every pass; replaces --n-train / --n-test.",
    ),
    dataset_dir: Optional[Path] = typer.Option(
        None, help="Keep the --synthetic-dataset JPEGs here and reuse them next time (default: a temporary folder)."
    ),
    image_size: int = typer.Option(224, help="Input side in pixels."),
    profile: str = typer.Option("official", help="Training profile of the Table 1 column: official, quick or demo."),
    steps: Optional[int] = typer.Option(None, help="Exactly this many SGD updates instead of the profile's."),
    epochs: Optional[int] = typer.Option(None, help="Exactly this many passes, as the authors' code counts them."),
    authors_batches: int = typer.Option(20, help="Updates of the authors' protocol actually run, then extrapolated."),
    authors_patterns: int = typer.Option(1, help="Patterns of the authors' protocol actually run (1-5)."),
    repeats: int = typer.Option(2, help="Runs of (d), (a) and (b), interleaved; the fastest of each is reported."),
    device: Device = "auto",
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements as JSON."),
    quiet: bool = typer.Option(False, help="No progress lines."),
) -> None:
    """Time a Table 1 column: (d) decoding, (a) decoding + one encoder pass (the floor), (b) posprobe, (c) the
    authors' protocol."""
    import json

    from .output.rundir import resolve_device
    from .readouts.train import get_profile
    from .studies.bench import run_bench

    get_profile(profile, steps=steps, epochs=epochs)  # a bad profile or count fails before any image is written
    results = []
    for name in backbone:
        result = run_bench(
            name,
            weights,
            n_train,
            n_test,
            image_size,
            profile=profile,
            steps=steps,
            epochs=epochs,
            authors_batches=authors_batches,
            authors_patterns=authors_patterns,
            device=resolve_device(device),
            repeats=repeats,
            synthetic_dataset=synthetic_dataset,
            dataset_dir=dataset_dir,
            log=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)),
        )
        print(result.report())
        results.append(result.to_dict())
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_out}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"posprobe: warning: {message}", file=sys.stderr)


def _interrupted_line() -> str:
    """What an interrupted command leaves: OUT untouched (or written whole), and what the feature cache kept."""
    rundir = sys.modules.get("posprobe.output.rundir")  # not imported: the command had no --out to write yet
    line = "posprobe: interrupted"
    active = rundir.active_out() if rundir is not None else None
    if active is not None:
        out, written = active
        line += f": {out} was written whole" if written else f": nothing written to {out}"
    sweep = sys.modules.get("posprobe.studies.sweep")
    sweeping = getattr(sweep, "active_sweep", lambda: None)()
    if sweeping is not None:
        kept = len(list((sweeping / "cells").glob("*.json")))
        line += f": {sweeping} keeps the {kept} cells written so far; the same command resumes (sweep-report: tables)"
    cache = sys.modules.get("posprobe.features.cache")  # never imported for a command that had no features to cache
    progress = getattr(cache, "extraction_in_progress", lambda: None)()
    if progress is not None:
        done, total, _ = progress
        joint = "; t" if active is not None or sweeping is not None else ": t"
        line += f"{joint}he feature cache keeps {done} of {total} images and resumes"
    return line


def _on_signal(received: list):
    """A SIGINT / SIGTERM handler that raises KeyboardInterrupt, so every ``finally`` and context manager cleans
    up (atomic_run_dir removes its temporary folder, the cache records its progress) as for Ctrl-C."""

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    return handler


def main() -> None:
    """Console entry point: user errors and OS errors become one line on stderr and exit code 2; SIGINT and SIGTERM
    one line and exit 130 / 143, after the run directory's temporary folder is removed."""
    warnings.showwarning = _one_line_warning
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    if "posprobe.output.rundir" in sys.modules:  # called again in one process (tests): no previous command's --out
        sys.modules["posprobe.output.rundir"]._ACTIVE.clear()
    if "posprobe.studies.sweep" in sys.modules:  # nor a previous command's interrupted sweep
        sys.modules["posprobe.studies.sweep"]._ACTIVE.clear()
    received: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread (an embedding caller): leave them
            previous[sig] = signal.signal(sig, _on_signal(received))

    def interrupted() -> NoReturn:
        for sig, old in previous.items():  # a second signal while reporting ends the process as usual
            signal.signal(sig, old if sig == signal.SIGINT else signal.SIG_DFL)
        print(_interrupted_line(), file=sys.stderr)
        sys.exit(128 + (received[0] if received else signal.SIGINT))

    try:
        try:
            app()  # Typer turns KeyboardInterrupt into exit 130 without a word: `received` says which signal came
        except PosprobeError as err:
            if received:
                interrupted()
            print(f"posprobe: error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:  # a full disk, a read-only or unwritable folder, a name too long: the user's to fix
            if received:
                interrupted()
            print(f"posprobe: error: {describe_os_error(err)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # raised outside Typer's own handling (while importing, say)
            interrupted()
        except SystemExit:
            if received:
                interrupted()
            raise
    finally:
        for sig, old in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old)


if __name__ == "__main__":
    main()
