"""Figures of a channels run (studies/channel_run.py): the ablation curves and each ranker's top channels.

Pure functions over saved rows and arrays, built on ``matplotlib.figure.Figure`` without pyplot, as plots.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..data import display_name

PATTERN_MEAN = "mean"


def ablation_plot(path: Path, rows: Sequence[Mapping], rankers: Sequence[str], title: str = "") -> Figure:
    """SPC (mean over patterns) against the share of channels ablated: one panel per (readout, ablation), one line
    per ranker with its 95% interval, the random draws' mean with their min-max range in grey, the intact SPC
    dotted.

    ``rows``: ablation.csv's (flat: ``top_spc``, ``top_spc_lo``...)."""
    rows = [r for r in rows if r["pattern"] == PATTERN_MEAN]
    panels = list(dict.fromkeys((r["readout"], r["ablation"]) for r in rows))
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.4))
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (readout, mode) in zip(axes, panels):
        mine = [r for r in rows if (r["readout"], r["ablation"]) == (readout, mode)]
        first = {}
        for r in mine:
            first.setdefault(r["k"], r)
        ks = sorted(first)
        x = np.array([first[k]["k_percent"] for k in ks])
        rand = np.array([first[k]["random_spc"] for k in ks])
        lo = np.array([first[k]["random_draw_min"] for k in ks])
        hi = np.array([first[k]["random_draw_max"] for k in ks])
        ax.fill_between(x, lo, hi, color="0.8", label="random k (min-max of draws)")
        ax.errorbar(x, rand, yerr=[rand - lo, hi - rand], color="0.4", marker=".", capsize=2, label="random k (mean)")
        ax.axhline(first[ks[0]]["intact_spc"], color="k", ls=":", lw=1, label="intact")
        for name in rankers:
            by_k = {r["k"]: r for r in mine if r["ranker"] == name}
            if not by_k:
                continue
            y = np.array([by_k[k]["top_spc"] for k in ks])
            err = np.abs(np.array([[by_k[k]["top_spc_lo"] for k in ks], [by_k[k]["top_spc_hi"] for k in ks]]) - y)
            ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", ms=3, capsize=2, label=f"top k: {name}")
        ax.set_xscale("log")
        ax.set_xlabel("channels ablated (% of the level)")
        ax.set_ylabel("SPC (mean over patterns)")
        ax.set_title(f"{readout} readout, {mode} ablation", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(display_name(title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def top_channels_plot(path: Path, mean_maps: np.ndarray, top: Mapping[str, Sequence[int]], title: str = "") -> Figure:
    """One row per ranker: the mean map over the training images (std units) of its top channels, in order."""
    names = list(top)
    cols = max((len(v) for v in top.values()), default=1)
    fig = Figure(figsize=(1.5 * cols + 1, 1.5 * max(1, len(names)) + 0.6))
    axes = fig.subplots(max(1, len(names)), cols, squeeze=False)
    bound = max(1e-6, float(np.nanmax(np.abs(mean_maps)))) if mean_maps.size else 1.0
    image = None
    for i, name in enumerate(names):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(top[name]):
                ax.axis("off")
                continue
            c = int(top[name][j])
            image = ax.imshow(mean_maps[c], cmap="RdBu_r", vmin=-bound, vmax=bound)
            ax.set_title(f"#{j + 1}: ch {c}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(display_name(title), fontsize=9)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean over images (channel std units)")
    fig.savefig(path, dpi=110)
    return fig
