"""Figures of the canvas location study (``studies.canvas_run``): accuracy against the content's distance to the
canvas border, and a few example canvases with their placements.

Like ``plots.py``, they build ``matplotlib.figure.Figure`` objects without pyplot: no backend is chosen at import
and no figure is left registered anywhere."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..data import display_name


def location_by_distance_plot(path: Path, rows: Sequence[Mapping], chance: float, title: str = "") -> Figure:
    """One panel per level: cell accuracy against the distance bin (its centre in px, log-spaced), a line per
    padding x canvas with its 95% interval as a band, chance dashed (per bin where it differs by bin).
    ``rows``: canvas.csv's rows ('all' bins are left out; each bin row has border_lo, border_hi, accuracy,
    accuracy_lo, accuracy_hi, chance_accuracy)."""
    levels = list(dict.fromkeys(r["level"] for r in rows))
    lines = list(dict.fromkeys((r["padding"], r["canvas"]) for r in rows))
    cols = min(3, len(levels))
    nrows = math.ceil(len(levels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, level in zip(axes, levels):
        for k, (padding, canvas) in enumerate(lines):
            pts = [r for r in rows if (r["level"], r["padding"], r["canvas"]) == (level, padding, canvas)]
            pts = [r for r in pts if r["bin"] != "all"]
            if not pts:
                continue
            x = np.array([max(0.5, (r["border_lo"] + r["border_hi"] - 1) / 2) for r in pts])  # bin centre, px
            v = np.array([[r["accuracy"], r["accuracy_lo"], r["accuracy_hi"]] for r in pts], dtype=float)
            colour = colours[k % len(colours)]
            ax.plot(x, v[:, 0], "o-", color=colour, markersize=3, label=f"{padding}, {canvas}")
            ax.fill_between(x, v[:, 1], v[:, 2], color=colour, alpha=0.2, linewidth=0)
        ref = [r for r in rows if r["level"] == level and (r["padding"], r["canvas"]) == lines[0] and r["bin"] != "all"]
        per_bin = np.array([r.get("chance_accuracy", chance) for r in ref], dtype=float)
        if len(per_bin) and np.ptp(per_bin) > 1e-9:  # continuous placements: a blind probe's share differs per bin
            xs = [max(0.5, (r["border_lo"] + r["border_hi"] - 1) / 2) for r in ref]
            ax.plot(xs, per_bin, "--", color="grey", linewidth=1, label="chance (majority cell, per bin)")
        else:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.3f}")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(level, fontsize=9)
        ax.set_xlabel("distance of the content to the nearest border, px (bin centre)", fontsize=7)
        ax.set_ylabel("cell accuracy (band: 95% interval)", fontsize=7)
    for ax in axes[len(levels) :]:
        ax.set_axis_off()
    if len(levels):
        axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def canvas_examples_plot(path: Path, examples: Sequence[tuple[str, torch.Tensor, Mapping]], title: str = "") -> Figure:
    """A row of canvases per colour: each (title, (3, S, S) image, placement dict with left, top, content, x, y),
    the content's outline drawn in red and its centre marked."""
    n = max(1, len(examples))
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(2.4 * cols, 2.5 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, (name, img, p) in zip(axes, examples):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())  # CHW -> HWC
        ax.add_patch(
            Rectangle((p["left"] - 0.5, p["top"] - 0.5), p["content"], p["content"], fill=False, color="red", lw=1)
        )
        ax.plot([p["x"] - 0.5], [p["y"] - 0.5], "r+", markersize=6)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(display_name(name), fontsize=7)
    for ax in axes[len(examples) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
