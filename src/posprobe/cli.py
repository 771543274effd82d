"""The ``posprobe`` command: a thin layer over the library.

Every user error is a PosprobeError, printed as one line on stderr with exit code 2.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .errors import PosprobeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Measure how much absolute position information a vision network encodes, and where.",
)  # fmt: skip


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
    print("\nweights: the default, 'random' (seeded by --seed) or a local checkpoint path; "
          "strides are nominal (vgg16_nopad loses border pixels)")  # fmt: skip


@app.command("probe")
def probe_cmd(
    out: Path = typer.Option(..., "--out", help="Run directory to create (refused if it exists)."),
    backbone: str = typer.Option("vgg16", help="Backbone name (see 'posprobe backbones')."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights: its default, 'random' or a checkpoint path."),
    pattern: str = typer.Option("all", help="H, V, G, HS, VS, a comma list, or 'all'."),
    target_image: list[Path] = typer.Option([], help="Extra target map from an image file (repeatable)."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training image folder (default: bundled photos)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Natural test image folder (default: bundled photos)."),
    synthetic: str = typer.Option("black,white,noise", help="Synthetic test inputs, comma list, or 'none'."),
    kernel_size: int = typer.Option(3, help="Readout kernel size."),
    depth: int = typer.Option(1, help="Readout conv layers."),
    readout_padding: int = typer.Option(0, help="Readout zero padding."),
    feat_size: int = typer.Option(28, help="Side every level is resized to before the readout."),
    image_size: int = typer.Option(224, help="Input and target side in pixels."),
    input_norm: str = typer.Option("none", help="none (the authors' code), imagenet, or weights (the backbone's own)."),
    profile: str = typer.Option("official", help="Training profile: official (the authors') or quick."),
    epochs: Optional[int] = typer.Option(None, help="Override the profile's epochs (lr decay rescaled)."),
    lr: Optional[float] = typer.Option(None, help="Override the profile's learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Override the profile's batch size."),
    seed: int = typer.Option(0, help="Seed for readout init, batch order, random weights and crops."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    crops_per_photo: int = typer.Option(8, help="Random crops per bundled training photo."),
    strict: bool = typer.Option(False, help="Fail on an unreadable image instead of skipping it."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train a readout per position pattern on a frozen backbone's features and score it on every test set."""
    from .data import parse_synthetic
    from .rundir import check_out_dir, resolve_device
    from .run import ProbeRunConfig, execute, format_table, write
    from .targets import resolve_patterns
    from .train import get_profile

    check_out_dir(out, overwrite)
    patterns = resolve_patterns(pattern) if pattern.strip() or not target_image else []
    config = ProbeRunConfig(
        backbone=backbone, weights=weights, input_norm=input_norm, patterns=tuple(patterns),
        target_images=tuple(str(p) for p in target_image), kernel_size=kernel_size, depth=depth,
        readout_padding=readout_padding, feat_size=feat_size, image_size=image_size, profile=profile,
        train=get_profile(profile, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed), seed=seed,
        device=resolve_device(device), train_dir=str(train) if train else None,
        test_dir=str(test) if test else None, synthetic=tuple(parse_synthetic(synthetic)),
        crops_per_photo=crops_per_photo, strict=strict,
    )  # fmt: skip
    run = execute(config, progress=not quiet)
    write(run, out, overwrite)
    print(f"{backbone} ({run.backbone.weights_label}), readout k={kernel_size} depth={depth} "
          f"padding={readout_padding}, {len(run.train)} training images, profile {profile}")  # fmt: skip
    print(format_table(run.metric_rows()))
    print(f"wrote {out}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("posprobe-demo"), "--out", help="Report directory to create."),
    profile: str = typer.Option("quick", help="Training profile: quick (the demo's) or official."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    overwrite: bool = typer.Option(False, help="Replace an existing report directory."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Tables 1, 2(b), 4 and Figs. 4-7 on the bundled photos, with bundled stand-ins for the paper's CNNs."""
    from .demo import run_demo
    from .rundir import check_out_dir, resolve_device

    check_out_dir(out, overwrite)
    report = run_demo(out, profile=profile, device=resolve_device(device), overwrite=overwrite,
                      progress=not quiet)  # fmt: skip
    print(report)
    print(f"wrote {out}")


@app.command("reproduce")
def reproduce_cmd(
    table: str = typer.Argument(..., help="table1, table2a, table2b, table3, table4, fig-qualitative, fig-padding, "
                                "fig-content-loss, a comma list, or all."),
    out: Path = typer.Option(..., "--out", help="Report directory to create (refused if it exists)."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training folder, e.g. DUT-S train (default: bundled photos)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Natural test folder, e.g. PASCAL-S (default: bundled photos)."),
    profile: str = typer.Option("official", help="Training profile: official (the authors') or quick."),
    seeds: int = typer.Option(1, help="Repeat every readout with seeds 0..N-1 and report the spread."),
    backbone_map: list[str] = typer.Option([], help="PAPER=BACKBONE[:WEIGHTS], e.g. vgg16=vgg16_hed (repeatable), "
                                           "or 'auto': bundled stand-ins where the paper's weights are missing."),
    epochs: Optional[int] = typer.Option(None, help="Override the profile's epochs."),
    crops_per_photo: int = typer.Option(8, help="Random crops per bundled training photo."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    overwrite: bool = typer.Option(False, help="Replace an existing report directory."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Reproduce the paper's tables and figures, our numbers beside the paper's, in one report."""
    from .reproduce import build_image_sets, describe_data, resolve_presets, run_reproduce
    from .rundir import check_out_dir, resolve_device
    from .study import parse_backbone_map
    from .train import get_profile

    check_out_dir(out, overwrite)
    if seeds < 1:
        raise PosprobeError(f"--seeds must be at least 1; given {seeds}")
    presets = resolve_presets([t.strip() for t in table.split(",") if t.strip()])
    auto = any(m.strip() == "auto" for m in backbone_map)
    mapping = parse_backbone_map([m for m in backbone_map if m.strip() != "auto"])
    config = get_profile(profile, epochs=epochs)
    train_set, test_sets = build_image_sets(str(train) if train else None, str(test) if test else None, presets,
                                            crops_per_photo=crops_per_photo)  # fmt: skip
    report, _ = run_reproduce(presets, out, config, profile, train_set, test_sets, seeds, mapping, auto,
                              resolve_device(device), overwrite, not quiet,
                              describe_data(train, test))  # fmt: skip
    print(report)
    print(f"wrote {out}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"posprobe: warning: {message}", file=sys.stderr)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    warnings.showwarning = _one_line_warning
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    try:
        app()
    except PosprobeError as err:
        print(f"posprobe: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("posprobe: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
