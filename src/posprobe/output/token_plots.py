"""Figures of the ``tokens`` run (measures/tokens.py), as pure functions over saved arrays in the manner of
plots.py: each writes one PNG and returns its ``Figure``, built without pyplot.

The small-multiple figures (the classic ViT position-embedding similarity grid, the per-block norm maps) are drawn
as one mosaic image per panel, with NaN gutters between the small maps: one ``imshow`` instead of h x w axes, so a
14 x 14 grid takes a fraction of a second rather than many seconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from ..data import display_name


def _mosaic(maps: np.ndarray, columns: int, gutter: int = 1) -> np.ndarray:
    """(K, h, w) small maps -> one (rows * (h + g) - g, columns * (w + g) - g) image, NaN in the gutters."""
    k, h, w = maps.shape
    rows = -(-k // columns)
    out = np.full((rows * (h + gutter) - gutter, columns * (w + gutter) - gutter), np.nan)
    for i in range(k):
        r, c = divmod(i, columns)
        out[r * (h + gutter) : r * (h + gutter) + h, c * (w + gutter) : c * (w + gutter) + w] = maps[i]
    return out


def token_position_plot(
    path: Path,
    rows: Sequence[str],
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]]],
    chance: Mapping[str, float],
    title: str = "",
) -> Figure:
    """Top-1 patch index (top) and mean distance error in patches (bottom) against the row (embed, blocks),
    one column per image set: curves[image set][mode][metric] = (mean, lo, hi) per row, the 95% interval as a
    band; chance dashed."""
    sets = list(curves)
    fig = Figure(figsize=(max(5.0, 4.2 * len(sets)), 6.4))
    axes = fig.subplots(2, len(sets), squeeze=False, sharex=True)
    x = np.arange(len(rows))
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, name in enumerate(sets):
        for k, (mode, metrics) in enumerate(curves[name].items()):
            colour = colours[k % len(colours)]
            for i, metric in enumerate(("index_top1", "distance")):
                v = np.array([[np.nan if a is None else a for a in t] for t in metrics[metric]], dtype=float)
                v = v.reshape(-1, 3)  # (rows, (mean, lo, hi))
                ax = axes[i][j]
                ax.plot(x, v[:, 0], "o-", markersize=3, color=colour, label=mode)
                ax.fill_between(x, v[:, 1], v[:, 2], color=colour, alpha=0.2, linewidth=0)
        for i, (metric, label) in enumerate((("index_top1", "top-1 patch index"), ("distance", "distance error"))):
            ax = axes[i][j]
            ax.axhline(chance[metric], color="grey", linestyle="--", linewidth=1, label="chance")
            ax.set_ylabel(label + (" (patches)" if metric == "distance" else ""))
            ax.grid(alpha=0.3)
        axes[0][j].set_ylim(-0.02, 1.02)
        axes[0][j].set_title(display_name(name), fontsize=9)
        axes[0][j].legend(fontsize=7)
        axes[1][j].set_xticks(x, list(rows), rotation=60, ha="right", fontsize=7)
    if title:
        fig.suptitle(display_name(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def pos_embed_similarity_plot(path: Path, similarity: torch.Tensor | None, title: str = "", note: str = "") -> Figure:
    """The classic ViT figure: for each patch (r, c) of the h x w grid, a small h x w map of the cosine similarity of
    its position vector with every patch's (similarity (h, w, h, w); None: the model has none, ``note`` says why)."""
    fig = Figure(figsize=(7.5, 7.0))
    ax = fig.subplots()
    if similarity is None or bool(torch.isnan(similarity).all()):
        ax.axis("off")
        ax.text(0.5, 0.5, note or "no learned position embedding to compare", ha="center", va="center", wrap=True)
    else:
        h, w = similarity.shape[:2]
        maps = similarity.reshape(h * w, h, w).numpy()  # (h, w, h, w) -> (P, h, w): one small map per patch
        image = ax.imshow(_mosaic(maps, w), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
        step = h + 1
        ax.set_yticks(np.arange(h) * step + (h - 1) / 2, [str(r) for r in range(h)], fontsize=6)
        ax.set_xticks(np.arange(w) * (w + 1) + (w - 1) / 2, [str(c) for c in range(w)], fontsize=6)
        ax.set_ylabel("input patch row")
        ax.set_xlabel("input patch column")
        fig.colorbar(image, ax=ax, fraction=0.04, label="cosine similarity")
        if note:
            ax.set_title(display_name(note), fontsize=8)
    if title:
        fig.suptitle(display_name(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def token_norms_plot(
    path: Path,
    rows: Sequence[str],
    maps: Mapping[str, torch.Tensor],
    lines: Mapping[str, Mapping[str, Sequence[float]]],
    title: str = "",
) -> Figure:
    """Per condition (image set, mode), left: each row's mean patch-token norm map (maps[c]: (R, h, w)) divided by
    that row's median, log2 colour scale, so a high-norm artefact token stands out at every depth; right: the
    norms against the row, lines[c][name] (mean and max patch norm, each prefix token)."""
    conds = list(maps)
    fig = Figure(figsize=(13.0, 1.9 * len(conds) + 0.6))
    axes = fig.subplots(len(conds), 2, squeeze=False, gridspec_kw={"width_ratios": [3.2, 1]})
    x = np.arange(len(rows))
    for i, c in enumerate(conds):
        m = maps[c].double()
        median = m.flatten(1).median(1).values.clamp(min=1e-30)[:, None, None]
        ratio = torch.log2((m / median).clamp(min=1e-6)).numpy()  # (R, h, w) log2 of the ratio to the median
        left = axes[i][0]
        image = left.imshow(_mosaic(ratio, len(rows)), cmap="magma", vmin=-1, vmax=3, interpolation="nearest")
        h, w = ratio.shape[1:]
        left.set_xticks(np.arange(len(rows)) * (w + 1) + (w - 1) / 2, list(rows), rotation=45, ha="right", fontsize=6)
        left.set_yticks([])
        left.set_ylabel(display_name(c), fontsize=7)
        fig.colorbar(image, ax=left, fraction=0.015, label="log2 norm / median")
        right = axes[i][1]
        for name, values in lines[c].items():
            right.plot(x, values, "o-" if name.startswith("patch") else "s--", markersize=2.5, label=name)
        right.set_yscale("log")
        right.set_xticks(x, list(rows), rotation=60, ha="right", fontsize=5)
        right.grid(alpha=0.3)
        right.legend(fontsize=5)
        right.set_ylabel("L2 norm", fontsize=7)
    if title:
        fig.suptitle(display_name(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig
