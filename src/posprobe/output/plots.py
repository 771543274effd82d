"""Figures as pure functions over saved arrays: each writes one PNG and returns its ``Figure``.

They build ``matplotlib.figure.Figure`` objects directly, without pyplot: no backend is chosen at import (a
notebook keeps its own) and no figure is left registered anywhere."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from ..data import display_name


def _show(ax, img: torch.Tensor, title: str = "", cmap: str | None = "gray") -> None:
    """img: (H, W) map in [0, 1] or (3, H, W) RGB."""
    if img.dim() == 3:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())  # CHW -> HWC
    else:
        ax.imshow(img.numpy(), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(display_name(title), fontsize=8)  # an image id may not be valid UTF-8


def prediction_grid(
    path: Path,
    targets: Mapping[str, torch.Tensor],
    inputs: Sequence[tuple[str, torch.Tensor]],
    predictions: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor] | None = None,
    title: str = "",
) -> Figure:
    """Top row: the targets; then one row per input image: the input and each target's prediction.

    predictions[name]: (N, H, W) for the N inputs; scores[name]: (N,) SPC shown in the titles.
    """
    names = list(targets)
    rows, cols = len(inputs) + 1, len(names) + 1
    fig = Figure(figsize=(1.6 * cols, 1.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    axes[0][0].axis("off")
    axes[0][0].text(0.5, 0.5, "targets", ha="center", va="center", fontsize=9)
    for j, name in enumerate(names, start=1):
        _show(axes[0][j], targets[name], f"target {name}")
    for i, (label, image) in enumerate(inputs, start=1):
        _show(axes[i][0], image, display_name(label)[:22])
        for j, name in enumerate(names, start=1):
            spc = f" SPC {float(scores[name][i - 1]):.2f}" if scores else ""
            _show(axes[i][j], predictions[name][i - 1], f"{name}{spc}")
    if title:
        fig.suptitle(display_name(title), fontsize=10)  # it names the test folder
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def layer_curve_plot(
    path: Path,
    points: Mapping[str, Mapping[str, Sequence[tuple[float, str, float]]]],
    together: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
    stand_ins: Collection[str] = (),
    intervals: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None = None,
    control: Mapping[str, float] | None = None,
    quantity: str = "SPC",
) -> Figure:
    """SPC (or another per-level ``quantity``, one panel each) against depth, one panel per pattern and one line
    per curve (backbone / padding / pos-embed).

    points[curve][pattern]: (relative depth in [0, 1], level name, SPC) per tapped level, in order;
    together[curve][pattern]: SPC of the readout over all levels, drawn as a dashed line of the same colour.
    With one curve the x ticks name its levels; with several, depth is the tap's relative position.
    stand_ins: the curves whose weights stand in for the paper's; their legend entries say "(stand-in)", as the
    reports' tables do, so the figure alone never passes one off as the paper's network.
    intervals[curve][pattern]: the 95% interval (lo, hi) of each point, drawn as an error bar.
    control[pattern]: the pixel control's SPC (PosENet, the same readout), a dotted grey line.
    """
    patterns = list(dict.fromkeys(p for by_pattern in points.values() for p in by_pattern))
    fig = Figure(figsize=(4.2 * len(patterns), 3.6))
    axes = fig.subplots(1, len(patterns), squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, pattern in zip(axes[0], patterns):
        for k, (curve, by_pattern) in enumerate(points.items()):
            pts = by_pattern.get(pattern, [])
            colour = colours[k % len(colours)]
            label = f"{curve} (stand-in)" if curve in stand_ins else curve
            ax.plot([d for d, _, _ in pts], [s for _, _, s in pts], "o-", color=colour, label=label, markersize=4)
            bars = (intervals or {}).get(curve, {}).get(pattern)
            if bars:
                x, y = [d for d, _, _ in pts], [s for _, _, s in pts]
                ax.errorbar(
                    x,
                    y,
                    yerr=[[v - lo for v, (lo, _) in zip(y, bars)], [hi - v for v, (_, hi) in zip(y, bars)]],
                    fmt="none",
                    ecolor=colour,
                    elinewidth=0.8,
                    capsize=2,
                )
            if together and pattern in together.get(curve, {}):
                ax.axhline(together[curve][pattern], color=colour, linestyle="--", linewidth=0.8)
        if control and pattern in control:
            ax.axhline(control[pattern], color="grey", linestyle=":", linewidth=1.0, label="pixels (PosENet)")
        if len(points) == 1:
            pts = next(iter(points.values())).get(pattern, [])
            ax.set_xticks([d for d, _, _ in pts], [name for _, name, _ in pts], rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("tapped level")
        else:
            ax.set_xlabel("relative depth of the tapped level")
        ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.0)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(f"pattern {pattern}" if quantity == "SPC" else pattern, fontsize=9)
        ax.set_ylabel(
            f"{quantity} (bars: 95% interval; dashed: all levels)" if intervals else f"{quantity} (dashed: all levels)"
        )
    axes[0][0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def loss_curves_plot(
    path: Path,
    panels: Mapping[str, Mapping[str, Sequence[Sequence[tuple[int, float]]]]],
    constant_losses: Mapping[str, float],
    flagged: Mapping[tuple[str, str], str] | None = None,
    decay_at: Sequence[int] = (),
) -> Figure:
    """Training loss against SGD updates: one panel per readout setting, a colour per pattern, a line per seed.

    panels[title][pattern] = each seed's [(update, mean loss over the window)]; the dashed line in the pattern's
    colour is the loss of the best constant map (a readout that ends near it draws a flat map); the grey
    vertical line marks the lr decay; flagged[(title, pattern)] = a convergence status other than converged
    ("flat map", "still falling", ...): drawn thicker and named in the panel's title.
    """
    n = len(panels)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.4 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, by_pattern) in zip(axes.flat, panels.items()):
        bad: dict[str, list[str]] = {}
        for i, (pattern, seeds) in enumerate(by_pattern.items()):
            colour = colours[i % len(colours)]
            status = (flagged or {}).get((title, pattern))
            thick = status is not None
            for s, curve in enumerate(seeds):
                if curve:
                    x, y = zip(*curve)
                    ax.plot(
                        x,
                        y,
                        color=colour,
                        lw=2.0 if thick else 0.9,
                        alpha=1.0 if s == 0 else 0.5,
                        label=pattern if s == 0 else None,
                    )
            if pattern in constant_losses:
                ax.axhline(constant_losses[pattern], color=colour, ls="--", lw=0.7)
            if thick:
                bad.setdefault(status, []).append(pattern)
        for d in decay_at:
            ax.axvline(d, color="0.6", lw=0.7)
        ax.set_yscale("log")
        notes = "; ".join(f"{status}: {', '.join(ps)}" for status, ps in bad.items())
        ax.set_title(title + (f"\n{notes}" if notes else ""), fontsize=8, color="firebrick" if bad else "black")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("SGD update", fontsize=7)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Training loss (MSE) per readout; dashed: the best constant map; grey: lr decay", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def controls_plot(path: Path, rows: Sequence[Mapping], title: str = "") -> Figure:
    """SPC of the network's readout beside each control's, per pattern, with 95% intervals: a row of panels per
    training condition, a panel per test set of several images (a single synthetic image has no interval and is
    left to the tables), on one SPC scale (rows as ``studies.controls.ControlRun.selectivity`` gives them)."""
    rows = [r for r in rows if r.get("n", 2) > 1] or list(rows)
    trainings = list(dict.fromkeys(r["training"] for r in rows))
    test_sets = list(dict.fromkeys(r["test_set"] for r in rows))
    readouts = ["spc"] + [k for k in rows[0] if k.startswith("spc_") and not k.endswith(("_lo", "_hi"))]
    n_patterns = len({r["pattern"] for r in rows})
    fig = Figure(figsize=(max(3.2, 0.9 * n_patterns + 1.2) * len(test_sets), 2.8 * len(trainings) + 0.6))
    axes = fig.subplots(len(trainings), len(test_sets), squeeze=False, sharey=True)
    width = 0.8 / len(readouts)
    for row_axes, training in zip(axes, trainings):
        for ax, test_set in zip(row_axes, test_sets):
            mine = [r for r in rows if (r["training"], r["test_set"]) == (training, test_set)]
            for j, key in enumerate(readouts):
                x = [i + (j - (len(readouts) - 1) / 2) * width for i in range(len(mine))]
                y = [r[key] for r in mine]
                gap = lambda a, b: 0.0 if math.isnan(a - b) else max(0.0, a - b)  # noqa: E731
                err = [
                    [gap(v, r[f"{key}_lo"]) for v, r in zip(y, mine)],
                    [gap(r[f"{key}_hi"], v) for v, r in zip(y, mine)],
                ]
                label = "network" if key == "spc" else key[4:]
                ax.bar(x, y, width, yerr=err, capsize=2, label=label, error_kw={"elinewidth": 0.8})
            ax.set_xticks(range(len(mine)), [r["pattern"] for r in mine])
            ax.axhline(0.0, color="grey", linewidth=0.5)
            ax.set_ylim(-0.3, 1.05)
            trained = "readouts trained on photos" if training == "natural" else "readouts trained on rolled images"
            ax.set_title(f"{display_name(test_set)}\n{trained}", fontsize=8)
        row_axes[0].set_ylabel("SPC (bars: 95% interval)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    return fig


def position_maps_plot(
    path: Path,
    rows: Mapping[str, Sequence[tuple[str, torch.Tensor | np.ndarray, bool]]],
    title: str = "",
) -> Figure:
    """One row per level, one panel per map: rows[level] = [(panel title, (h, w) map, signed), ...].

    A signed map (a mean of standardised features) is drawn blue-white-red, symmetric about 0; the others (energy,
    blank-input deviation) from 0 up. Each panel has its own colour bar: the levels' scales differ."""
    cols = max((len(panels) for panels in rows.values()), default=1)
    fig = Figure(figsize=(2.3 * cols + 0.8, 2.0 * max(1, len(rows))))
    axes = fig.subplots(max(1, len(rows)), cols, squeeze=False)
    for r, (level, panels) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            name, image, signed = panels[c]
            img = np.asarray(image, dtype=float)
            finite = img[np.isfinite(img)]
            top = float(np.abs(finite).max()) if finite.size else 1.0
            top = top if top > 0 else 1.0
            kwargs = dict(cmap="RdBu_r", vmin=-top, vmax=top) if signed else dict(cmap="viridis", vmin=0, vmax=top)
            shown = ax.imshow(img, interpolation="nearest", **kwargs)
            cbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            cbar.ax.tick_params(labelsize=6)
            ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(level, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def layer_measures_plot(
    path: Path,
    levels: Sequence[str],
    pvf: Mapping[str, Sequence[tuple[float, float, float]]],
    eqt: Mapping[tuple[str, str, int], Sequence[float]],
    title: str = "",
    ceiling: float = 150.0,
) -> Figure:
    """Two panels against the tapped level: pvf[condition] = (value, lo, hi) per level, drawn with its interval
    bars; eqt[(mode, axis, shift)] = dB per level (NaN: not measured; +inf, an exact match, drawn at ``ceiling``):
    a colour per shift, solid for the interior mode and dashed for the circular one, o for x and s for y."""
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    x = np.arange(len(levels))
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (condition, values) in enumerate(pvf.items()):
        v = np.array([[np.nan if a is None else a for a in t] for t in values], dtype=float).reshape(-1, 3)
        err = np.abs(np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]]))
        colour = colours[k % len(colours)]
        left.errorbar(x, v[:, 0], yerr=np.nan_to_num(err), fmt="o-", color=colour, capsize=2, label=condition)
    left.axhline(0.0, color="grey", linewidth=0.5)
    left.set_ylabel("position-variance fraction (bars: 95% interval)")
    left.legend(fontsize=7)
    shifts = list(dict.fromkeys(s for _, _, s in eqt))
    for (mode, axis, shift), values in eqt.items():
        v = np.array(values, dtype=float)
        right.plot(
            x,
            np.where(np.isposinf(v), ceiling, v),
            "--" if mode == "circular" else "-",
            marker="o" if axis == "x" else "s",
            markersize=3,
            linewidth=0.8 if mode == "circular" else 1.2,
            color=colours[shifts.index(shift) % len(colours)],
            label=f"{mode} {axis} {shift} px",
        )
    right.set_ylabel(f"EQ-T, dB (exact match drawn at {ceiling:g})")
    right.legend(fontsize=6, ncol=2)
    for ax in (left, right):
        ax.set_xticks(x, list(levels), rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("tapped level")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
