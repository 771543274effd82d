"""The paper's figures, drawn from a StudyResult (predictions of the first test images of each set)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..data import display_name
from ..output.plots import _show
from ..targets import make_target
from .study import StudyPreset, StudyResult


def _label(preset: StudyPreset, result: StudyResult, key: str) -> str:
    v = next(v for v in preset.variants if v.key == key)
    ran = result.backbones[v.backbone_key]
    return f"{v.label}\n(stand-in: {ran['ran_as']})" if ran.get("substituted") else v.label


def _grid(
    path: Path,
    rows: list[tuple[str, torch.Tensor, list[tuple[str, torch.Tensor | None, str]]]],
    title: str,
    cmap: str = "gray",
    vmax: float = 1.0,
    colorbar: str | None = None,
) -> Figure:
    """rows: (row label, input image (3,H,W), [(column title, map (H,W) or None, annotation)]).

    colorbar: a label for a colour bar at the right, for maps whose colours stand for values (not pictures);
    values above vmax show the top colour, which the bar's arrow says.
    """
    cols = 1 + max(len(r[2]) for r in rows)
    bar_room = 1.2 if colorbar else 0.0  # inches at the right for the bar, its ticks and label
    width = 1.9 * cols + bar_room
    fig = Figure(figsize=(width, 2.3 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    shown = None
    for i, (label, image, cells) in enumerate(rows):
        _show(axes[i][0], image, display_name(label)[:24])
        for j, (name, m, note) in enumerate(cells, start=1):
            if m is None:
                axes[i][j].axis("off")
                continue
            shown = axes[i][j].imshow(m.numpy(), cmap=cmap, vmin=0, vmax=vmax)
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
            axes[i][j].set_title(f"{name}{note}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if colorbar and shown is not None:
        right = 1 - bar_room / width  # tight_layout spread the maps over the whole width: take the strip back
        fig.subplots_adjust(right=right)
        bottom, top = axes[-1][0].get_position().y0, axes[0][0].get_position().y1  # the maps' height
        cax = fig.add_axes((right + 0.15 / width, bottom, 0.18 / width, top - bottom), label="colour bar")
        bar = fig.colorbar(shown, cax=cax, extend="max")
        bar.set_label(colorbar, fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=110)
    return fig


def _spc_note(result: StudyResult, preset: StudyPreset, key: str, pattern: str, test_set: str, i: int) -> str:
    grid = result.per_image.get((preset.name, key, pattern, test_set))
    spc = grid["spc"][0] if grid is not None else None  # seed 0's, whose maps the figures show
    verdicts = result.convergence.get((preset.name, key, pattern))
    flat = " ◌ flat map" if verdicts and verdicts[0].flat else ""  # as the report marks it
    return f"\nSPC {float(spc[i]):.2f}{flat}" if spc is not None and i < len(spc) else ""


def qualitative(result: StudyResult, preset: StudyPreset, out_dir: Path) -> list[Path]:
    """Fig. 4/5: per pattern, rows of test images; columns the target and each variant's prediction."""
    paths = []
    ids, images = result.preview_images["natural"]
    size = images.shape[-1]
    for pattern in preset.patterns:
        target = make_target(pattern, size, size)
        rows = []
        for i, (name, image) in enumerate(zip(ids, images)):
            cells = [(f"target {pattern}", target, "")]
            for v in preset.variants:
                pred = result.previews[(preset.name, v.key, pattern, "natural")][i]
                cells.append(
                    (_label(preset, result, v.key), pred, _spc_note(result, preset, v.key, pattern, "natural", i))
                )
            rows.append((name, image, cells))
        path = out_dir / f"{preset.name}_{pattern}.png"
        _grid(path, rows, f"{preset.title}: pattern {pattern}")
        paths.append(path)
    return paths


def padding(result: StudyResult, preset: StudyPreset, out_dir: Path) -> list[Path]:
    """Fig. 6: the G readout of PosENet with readout padding 0, 1, 2 on photos and content-free inputs."""
    pattern = preset.patterns[0]
    rows = []
    for test_set in preset.test_sets:
        ids, images = result.preview_images[test_set]
        size = images.shape[-1]
        for i, (name, image) in enumerate(zip(ids, images)):
            cells = [(f"target {pattern}", make_target(pattern, size, size), "")]
            for v in preset.variants:
                pred = result.previews[(preset.name, v.key, pattern, test_set)][i]
                cells.append((v.label, pred, _spc_note(result, preset, v.key, pattern, test_set, i)))
            rows.append((name, image, cells))
    path = out_dir / f"{preset.name}.png"
    _grid(path, rows, preset.title)
    return [path]


LOSS_VMAX = 0.5  # L lies in [0, 1] for maps in [0, 1]; the colours stop at .5 so the small losses stay apart
LOSS_BAR = "absolute error L\n= mean |target - prediction|\n0 = exact; ≥ .5 drawn as .5"


def content_loss(result: StudyResult, preset: StudyPreset, out_dir: Path) -> list[Path]:
    """Fig. 7: per-image L = (|G_H - P_H| + |G_V - P_V| + |G_G - P_G|) / 3 for each backbone (bright = lost)."""
    ids, images = result.preview_images["natural"]
    size = images.shape[-1]
    targets = {p: make_target(p, size, size) for p in ("H", "V", "G")}
    rows = []
    for i, (name, image) in enumerate(zip(ids, images)):
        cells = []
        for v in preset.variants:
            loss = (
                sum(
                    (result.previews[(preset.name, v.key, p, "natural")][i] - targets[p]).abs() for p in ("H", "V", "G")
                )
                / 3
            )  # (H, W)
            cells.append((_label(preset, result, v.key), loss, f"\nmean L {float(loss.mean()):.3f}"))
        rows.append((name, image, cells))
    path = out_dir / f"{preset.name}.png"
    _grid(path, rows, preset.title, cmap="magma", vmax=LOSS_VMAX, colorbar=LOSS_BAR)
    return [path]


FIGURE_MAKERS = {"qualitative": qualitative, "padding": padding, "content_loss": content_loss}


def draw(result: StudyResult, preset: StudyPreset, out_dir: Path) -> list[Path]:
    return FIGURE_MAKERS[preset.figure](result, preset, out_dir)
