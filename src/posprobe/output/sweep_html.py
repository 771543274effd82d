"""The report of a sweep as one self-contained HTML page: a heat map of models x measures, a sortable and
filterable table of every cell, each model's layer curves and the failures.

A model-zoo sweep has too many cells to read as Markdown, and a researcher wants to sort, filter and look at it
anywhere: on a cluster's login node, in a browser with no network, or attached to a mail. So the page needs no
server and loads nothing: its CSS and (vanilla) JS are inline and its figures are PNGs inlined as ``data:`` URIs.
Everything that comes from the user (model names, error messages, the spec) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from io import BytesIO
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..intervals import SEED_SPREAD_LIMIT

INTERVALS = "95% bootstrap interval over test images and seeds"
FLAGS = {
    "◌": "the readout drew a flat map in some seed",
    "⚠": "a seed's readout did not finish training",
    "±": f"the seeds' scores differ by more than {SEED_SPREAD_LIMIT} (std across seeds)",
}
COUNTS = {"skipped": "skipped (done earlier)"}  # how the header names a count
# The results table: (data-col, header, how it sorts: "num" or "text").
COLUMNS = (
    ("group", "group", "text"),
    ("layers", "layers", "num"),
    ("readout", "readout", "text"),
    ("pattern", "pattern", "text"),
    ("test_set", "test set", "text"),
    ("metric", "metric", "text"),
    ("value", "value [95% interval]", "num"),
    ("seeds", "seeds", "num"),
    ("seed_sd", "seed sd", "num"),
    ("mae", "MAE", "num"),
    ("selectivity", "selectivity", "num"),
    ("flags", "flags", "text"),
    ("status", "status", "text"),
)
# Diverging scale for a score in [-1, 1]: red for negative, near-white at 0, blue for positive.
_NEGATIVE, _ZERO, _POSITIVE = (178, 24, 43), (247, 247, 247), (33, 102, 172)

CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg-soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  margin: 0 auto; padding: 24px 32px 64px; max-width: 1400px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
nav { margin: 4px 0 18px; }
.muted, .legend { color: var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 12px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
dl.facts ul { margin: 0; padding-left: 18px; }
.counts { display: flex; gap: 10px; margin: 14px 0; flex-wrap: wrap; }
.count { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 8px; padding: 6px 14px;
  min-width: 90px; }
.count b { display: block; font-size: 20px; }
.count.bad b { color: #b42318; font-weight: 700; }
.legend { font-size: 13px; margin: 6px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { padding: 4px 7px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
thead th { background: var(--bg-soft); }
#table .scroll { max-height: 75vh; overflow: auto; border-bottom: 1px solid var(--line); }
#results thead th { position: sticky; top: 0; z-index: 1; }
.bad { color: #b42318; font-weight: 600; }
table.heat td.v { text-align: center; min-width: 64px; border: 1px solid #fff; }
table.heat th.sub { font-weight: normal; color: var(--muted); text-align: center; }
table.heat th.top { text-align: center; }
td.failed { background: repeating-linear-gradient(45deg, #eee, #eee 4px, #f8f8f8 4px, #f8f8f8 8px); color: #b42318; }
.scale { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted); margin: 8px 0 0; }
.scale span.bar { width: 220px; height: 12px; border-radius: 3px; border: 1px solid var(--line); }
#results th { cursor: pointer; user-select: none; }
#results th:hover { color: var(--accent); }
#results th .arrow { display: inline-block; width: 1em; color: var(--accent); }
#results td.num { text-align: right; }
#results tbody tr:hover { background: var(--bg-soft); }
.err { color: #b42318; font-size: 12px; max-width: 200px; overflow: hidden; text-overflow: ellipsis; }
.tools { display: flex; gap: 12px; align-items: center; margin: 8px 0; }
#filter { font: inherit; padding: 5px 9px; width: 340px; border: 1px solid var(--line); border-radius: 6px; }
.tag { font-size: 11px; background: #fff4d6; border: 1px solid #e8c75a; border-radius: 4px; padding: 0 4px;
  margin-left: 4px; }
figure { margin: 14px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
.grid { display: flex; flex-wrap: wrap; gap: 0 14px; }
table.failures td { white-space: normal; vertical-align: top; }
table.failures td.error { font-family: ui-monospace, monospace; font-size: 12px; color: #b42318; }
pre { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px; overflow-x: auto; }
"""

# Sort the results table by a header click (ascending, then descending; empty or NaN values last either way;
# ties keep their order) and filter its rows by a substring.
JS = """
(function () {
  const table = document.getElementById("results");
  const tbody = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  const filter = document.getElementById("filter");
  const shown = document.getElementById("shown");
  let sorted = { col: -1, dir: 1 };

  function key(cell, numeric) {
    const raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
    if (raw === "") return null;
    if (!numeric) return raw.toLowerCase();
    const x = parseFloat(raw);
    return Number.isNaN(x) ? null : x;
  }

  function sortBy(col) {
    const dir = sorted.col === col ? -sorted.dir : 1;
    const numeric = heads[col].dataset.type === "num";
    const rows = Array.from(tbody.rows).map((tr, i) => ({ tr, i, k: key(tr.cells[col], numeric) }));
    rows.sort((a, b) => {
      if (a.k === null || b.k === null) return (a.k === null) - (b.k === null) || a.i - b.i;
      const c = numeric ? a.k - b.k : a.k.localeCompare(b.k, undefined, { numeric: true });
      return dir * c || a.i - b.i;
    });
    rows.forEach((r) => tbody.appendChild(r.tr));
    heads.forEach((th, i) => {
      th.querySelector(".arrow").textContent = i === col ? (dir > 0 ? "▲" : "▼") : "";
      if (i === col) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    sorted = { col, dir };
  }

  function applyFilter() {
    const q = filter.value.trim().toLowerCase();
    let n = 0;
    for (const tr of tbody.rows) {
      tr.hidden = q !== "" && !tr.textContent.toLowerCase().includes(q);
      n += tr.hidden ? 0 : 1;
    }
    shown.textContent = n + " of " + tbody.rows.length + " rows";
  }

  heads.forEach((th, i) => {
    th.addEventListener("click", () => sortBy(i));
    th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(i); });
  });
  filter.addEventListener("input", applyFilter);
  applyFilter();
})();
"""


def _e(value: object) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes); None -> ''."""
    return "" if value is None else html.escape(str(value), quote=True)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: object, digits: int = 3) -> str:
    """A number with ``digits`` decimals; '' for None or NaN."""
    return f"{x:.{digits}f}" if _finite(x) else ""


def _with_interval(value: object, lo: object, hi: object, digits: int = 3) -> str:
    """'0.812 [0.780, 0.840]', or just the value when the interval is missing; '' with no value."""
    if not _finite(value):
        return ""
    interval = f" [{_num(lo, digits)}, {_num(hi, digits)}]" if _finite(lo) and _finite(hi) else ""
    return _num(value, digits) + interval


def _colour(value: float) -> tuple[str, str]:
    """(background, text colour) of a score on the diverging scale over [-1, 1]."""
    t = max(-1.0, min(1.0, value))
    end = _POSITIVE if t >= 0 else _NEGATIVE
    rgb = [round(z + abs(t) * (e - z)) for z, e in zip(_ZERO, end)]
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})", "#fff" if abs(t) > 0.55 else "#1f2328"


def _unique(items: Iterable) -> list:
    """The distinct items in order of first appearance."""
    return list(dict.fromkeys(items))


def _group_label(group: str, stand_in: bool) -> str:
    tag = '<span class="tag" title="its weights stand in for the named network\'s">stand-in</span>'
    return _e(group) + (tag if stand_in else "")


def _header(header: Mapping, failed: bool, trained: bool = False) -> str:
    """Title, the facts of what ran, the counts, the notes, and how to read the numbers."""
    facts = []

    def fact(name: str, value: object) -> None:
        if value not in (None, "", [], {}):
            facts.append(f"<dt>{_e(name)}</dt><dd>{value}</dd>")

    fact("spec", _e(header.get("spec_name")))
    fact("started", _e(header.get("started")))
    fact("finished", _e(header.get("finished")))
    if _finite(header.get("seconds")):
        fact("wall time", _e(_duration(header["seconds"])))
    fact("executor", _e(header.get("executor")))
    fact("machine", _e(header.get("machine")))
    fact("training", _e(header.get("training")))
    data = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in (header.get("data") or {}).items())
    fact("data", f"<ul>{data}</ul>" if data else "")
    fact("stand-ins", ", ".join(_e(s) for s in header.get("stand_ins") or ()))
    fact("versions", " · ".join(f"{_e(k)} {_e(v)}" for k, v in (header.get("versions") or {}).items()))

    counts = header.get("counts") or {}
    boxes = "".join(
        f'<div class="count{" bad" if k == "failed" and v else ""}"><b>{_e(v)}</b>{_e(COUNTS.get(k, k))}</div>'
        for k, v in counts.items()
    )
    notes = header.get("notes") or ()
    flags = " · ".join(f"<b>{_e(mark)}</b> {_e(meaning)}" for mark, meaning in FLAGS.items())
    sections = [("heatmap", "heat map"), ("table", "all results"), ("curves", "layer curves")]
    sections += [("training", "training")] if trained else []
    sections += [("failures", "failures")] if failed else []
    return (
        f"<header><h1>{_e(header.get('title') or 'posprobe sweep')}</h1>"
        + "<nav>"
        + "".join(f'<a href="#{a}">{t}</a>' for a, t in sections)
        + "</nav>"
        + (f'<dl class="facts">{"".join(facts)}</dl>' if facts else "")
        + (f'<div class="counts">{boxes}</div>' if boxes else "")
        + ("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else "")
        + f'<p class="legend">Scores are SPC (Spearman correlation of the drawn map with the target: 1 = perfect, '
        f"0 = no position information) or PVF, each with its {INTERVALS}. Flags: {flags}.</p></header>"
    )


def _duration(seconds: float) -> str:
    """'42.0 s', '12 min 05 s', '3 h 02 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _heat_maps(summary: Sequence[Mapping]) -> str:
    """One table per test set: a row per group, a column per (readout, pattern) of the all-levels readouts, and
    the all-levels measures (PVF), each cell coloured by its score."""
    together = [r for r in summary if r.get("layers") == "all"]
    measures = [r for r in together if r.get("metric") != "spc"]
    test_sets = _unique(r.get("test_set") for r in together if r.get("metric") == "spc")
    groups = _unique(r.get("group") for r in summary)
    stand_ins = {r.get("group") for r in summary if r.get("stand_in")}
    parts = []
    for test_set in test_sets:
        rows = [r for r in together if r.get("metric") == "spc" and r.get("test_set") == test_set] + measures
        cells: dict[tuple, Mapping] = {}
        for r in rows:
            cells.setdefault(
                (r.get("group"), r.get("readout"), r.get("pattern") or str(r.get("metric") or "").upper()), r
            )
        columns = _unique(c[1:] for c in cells)
        readouts = _unique(readout for readout, _ in columns)
        top = "".join(f'<th class="top" colspan="{sum(c[0] == ro for c in columns)}">{_e(ro)}</th>' for ro in readouts)
        columns = [c for ro in readouts for c in columns if c[0] == ro]  # grouped under their readout
        sub = "".join(f'<th class="sub">{_e(p)}</th>' for _, p in columns)
        body = "".join(
            f"<tr><th>{_group_label(g, g in stand_ins)}</th>"
            + "".join(_heat_cell(cells.get((g, *c))) for c in columns)
            + "</tr>"
            for g in groups
        )
        parts.append(
            f"<h3>test set: {_e(test_set)}</h3>"
            f'<div class="scroll"><table class="heat"><thead><tr><th rowspan="2">model</th>{top}</tr>'
            f"<tr>{sub}</tr></thead><tbody>{body}</tbody></table></div>"
        )
    if not parts:
        return "<p class='muted'>No all-levels readout in this sweep.</p>"
    scale = f"linear-gradient(to right, {_colour(-1)[0]}, {_colour(0)[0]}, {_colour(1)[0]})"
    return (
        "".join(parts)
        + f'<div class="scale">−1<span class="bar" style="background: {scale}"></span>+1'
        + " &nbsp;cells: mean over test images and seeds (hover for the interval)</div>"
    )


def _heat_cell(r: Mapping | None) -> str:
    if r is None:
        return '<td class="v"></td>'
    if r.get("status") == "failed":
        return f'<td class="v failed" title="{_e(r.get("error"))}">failed</td>'
    value = r.get("value")
    if not _finite(value):
        return '<td class="v">–</td>'
    background, colour = _colour(value)
    tip = f"{r.get('readout')} {r.get('pattern') or ''}: {_with_interval(value, r.get('lo'), r.get('hi'))}"
    tip += f", {r.get('seeds')} seed(s)" if r.get("seeds") else ""
    flags = f" {_e(r['flags'])}" if r.get("flags") else ""
    return f'<td class="v" style="background: {background}; color: {colour}" title="{_e(tip)}">{value:.2f}{flags}</td>'


def _results_table(summary: Sequence[Mapping]) -> str:
    """Every summary row; each cell's data-sort holds what the page sorts by (the raw number for numbers)."""
    heads = "".join(
        f'<th data-col="{col}" data-type="{kind}" tabindex="0">{name}<span class="arrow"></span></th>'
        for col, name, kind in COLUMNS
    )
    body = []
    for r in summary:
        level = -1 if r.get("layers") == "all" else r.get("level_index")
        status = _e(r.get("status"))
        if r.get("status") == "failed":
            status = f'<span class="bad">{status}</span>'
        if r.get("error"):
            status += f'<div class="err" title="{_e(r["error"])}">{_e(r["error"])}</div>'
        cells = [
            f"<td>{_group_label(r.get('group'), bool(r.get('stand_in')))}</td>",
            f'<td data-sort="{_num(level, 0)}">{_e(r.get("layers"))}</td>',
            f"<td>{_e(r.get('readout'))}</td>",
            f"<td>{_e(r.get('pattern'))}</td>",
            f"<td>{_e(r.get('test_set'))}</td>",
            f"<td>{_e(r.get('metric'))}</td>",
            _num_cell(r.get("value"), _with_interval(r.get("value"), r.get("lo"), r.get("hi")) or "–"),
            _num_cell(r.get("seeds"), _e(r.get("seeds"))),
            _num_cell(r.get("seed_sd"), _num(r.get("seed_sd"))),
            _num_cell(r.get("mae"), _with_interval(r.get("mae"), r.get("mae_lo"), r.get("mae_hi"))),
            _num_cell(r.get("selectivity"), _num(r.get("selectivity"))),
            f"<td>{_e(r.get('flags'))}</td>",
            f"<td>{status}</td>",
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<div class="tools"><input id="filter" type="search" placeholder="filter rows, e.g. resnet or layer3" '
        'aria-label="filter rows"><span id="shown" class="muted"></span>'
        '<span class="muted">click a column header to sort</span></div>'
        f'<div class="scroll"><table id="results"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _num_cell(raw: object, text: str) -> str:
    return f'<td class="num" data-sort="{repr(float(raw)) if _finite(raw) else ""}">{text}</td>'


def _plain(text: object) -> str:
    """Text matplotlib draws as given: a '$' in a model name must not start mathtext."""
    return str(text).replace("$", r"\$")


def _curve(r: Mapping) -> tuple[str, str]:
    """(readout, pattern): one line of a layer curve; a measure has no pattern."""
    return str(r.get("readout") or ""), str(r.get("pattern") or "")


def _layer_curve_png(group: str, rows: Sequence[Mapping], stand_in: bool = False) -> bytes:
    """One group's PNG: score against relative depth, a line per (readout, pattern) with its 95% interval as bars
    and its all-levels readout as a dashed line; a panel per test set, and one per measure (PVF)."""
    ok = [r for r in rows if r.get("status") != "failed" and _finite(r.get("value"))]
    levels = sorted({(r["depth"], r["layers"]) for r in ok if r.get("depth") is not None})
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {key: cycle[i % len(cycle)] for i, key in enumerate(_unique(map(_curve, rows)))}
    panels = _unique(
        (r.get("metric"), r.get("test_set") if r.get("metric") == "spc" else None)
        for r in rows
        if r.get("depth") is not None
    )
    width = 4.2 * len(panels) + 1.3  # and 1.3 in for the legend
    fig = Figure(figsize=(width, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, test_set) in zip(axes, panels):
        mine = [r for r in ok if r.get("metric") == metric and (test_set is None or r.get("test_set") == test_set)]
        for key in _unique(map(_curve, mine)):
            line = [r for r in mine if _curve(r) == key]
            pts = sorted((r["depth"], r["value"], r.get("lo"), r.get("hi")) for r in line if r.get("depth") is not None)
            if pts:
                x, y, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
                bars = [np.nan_to_num(y - lo), np.nan_to_num(hi - y)]  # no interval: no bar
                label = _plain(" ".join(k for k in key if k))
                ax.errorbar(
                    x, y, bars, fmt="o-", color=colour[key], label=label, markersize=4, capsize=2, elinewidth=0.8
                )
            for r in line:
                if r.get("layers") == "all":
                    ax.axhline(r["value"], color=colour[key], linestyle="--", linewidth=0.9)
        ax.set_xticks([d for d, _ in levels], [_plain(name) for _, name in levels], rotation=40, ha="right", fontsize=7)
        ax.set_xlim(-0.05, 1.05)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.25)
        name = str(metric).upper()
        ax.set_title(_plain(f"{name} on {test_set}" if test_set else name), fontsize=9)
        ax.set_ylabel(_plain(name), fontsize=8)
    for metric in _unique(m for m, _ in panels):  # panels of one metric on one scale
        same = [ax for ax, (m, _) in zip(axes, panels) if m == metric]
        low = min(-0.1, *(ax.get_ylim()[0] for ax in same))
        for ax in same:
            ax.set_ylim(low, 1.02)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8, frameon=False)
    fig.suptitle(_plain(group + (" (stand-in)" if stand_in else "")), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / width, 1))
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _layer_curves(summary: Sequence[Mapping]) -> str:
    """A figure per group that has per-level rows."""
    figures = []
    for group in _unique(r.get("group") for r in summary if r.get("depth") is not None):
        rows = [r for r in summary if r.get("group") == group]
        stand_in = any(r.get("stand_in") for r in rows)
        png = base64.b64encode(_layer_curve_png(str(group), rows, stand_in)).decode("ascii")
        figures.append(f'<figure><img alt="layer curve: {_e(group)}" src="data:image/png;base64,{png}"></figure>')
    if not figures:
        return "<p class='muted'>No per-level readout in this sweep.</p>"
    return (
        '<p class="legend">Each tapped level at its relative depth in the network; bars: the 95% interval; dashed: '
        "the same readout over all levels together.</p>" + "".join(figures)
    )


STATUS_COLOURS = {"converged": "#8c8c8c", "flat map": "#e08a00", "exact": "#8c8c8c"}  # anything else: unfinished


def _loss_png(group: str, curves: Sequence[tuple[str, str, Sequence[Sequence[float]]]]) -> bytes:
    """One group's training: every trained readout's loss against updates (log scale), coloured by its verdict."""
    fig = Figure(figsize=(4.6, 3.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for _, status, curve in curves:
        if curve:
            x, y = zip(*curve)
            ax.plot(x, y, color=STATUS_COLOURS.get(status, "#c0392b"), linewidth=0.8, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("update", fontsize=8)
    ax.set_ylabel("training loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25)
    counts = {s: sum(st == s for _, st, _ in curves) for s in _unique(st for _, st, _ in curves)}
    ax.set_title(_plain(f"{group}\n" + ", ".join(f"{n} {s}" for s, n in counts.items())), fontsize=8)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _training(loss_curves: Mapping[str, Sequence[tuple[str, str, Sequence[Sequence[float]]]]]) -> str:
    """A small loss-curve figure per group, so an unfinished or flat readout is seen, not only flagged."""
    figures = []
    for group, curves in loss_curves.items():
        if curves:
            png = base64.b64encode(_loss_png(str(group), curves)).decode("ascii")
            figures.append(f'<figure><img alt="loss curves: {_e(group)}" src="data:image/png;base64,{png}"></figure>')
    if not figures:
        return ""
    return (
        '<section id="training"><h2>Training</h2><p class="legend">Each trained readout\'s loss (means over windows '
        "of updates), every seed: grey finished, orange a flat map (no better than the best constant map), red not "
        f'finished.</p><div class="grid">{"".join(figures)}</div></section>'
    )


def _failures(summary: Sequence[Mapping], failures: Sequence[Mapping]) -> str:
    """The failed cells: those passed in ``failures``, and failed summary rows not among them."""
    listed = [(f.get("group"), f.get("cell"), f.get("error")) for f in failures]
    seen = {(g, e) for g, _, e in listed}
    for r in summary:
        if r.get("status") == "failed" and (r.get("group"), r.get("error")) not in seen:
            cell = " · ".join(str(r.get(k)) for k in ("readout", "pattern", "layers", "test_set") if r.get(k))
            listed.append((r.get("group"), cell, r.get("error")))
            seen.add((r.get("group"), r.get("error")))
    if not listed:
        return ""
    body = "".join(f'<tr><td>{_e(g)}</td><td>{_e(c)}</td><td class="error">{_e(e)}</td></tr>' for g, c, e in listed)
    return (
        f'<section id="failures"><h2>Failures ({len(listed)})</h2><table class="failures">'
        f"<thead><tr><th>model</th><th>cell</th><th>error</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def render_sweep_html(
    summary: Sequence[Mapping],
    header: Mapping,
    spec_text: str = "",
    failures: Sequence[Mapping] = (),
    loss_curves: Mapping[str, Sequence[tuple[str, str, Sequence[Sequence[float]]]]] | None = None,
) -> str:
    """The whole page as a string (see the module docstring); missing header keys are left out. ``loss_curves``:
    group -> (readout, convergence status, [(update, loss), ...]) of each trained readout."""
    failures_html, training_html = _failures(summary, failures), _training(loss_curves or {})
    spec = f"<h2>Spec</h2><details><summary>the spec this sweep ran</summary><pre>{_e(spec_text)}</pre></details>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_e(header.get("title") or "posprobe sweep")}</title>'
        f"<style>{CSS}</style></head><body>"
        + _header(header, bool(failures_html), bool(training_html))
        + f'<section id="heatmap"><h2>Model × measure (all levels together)</h2>{_heat_maps(summary)}</section>'
        + f'<section id="table"><h2>All results</h2>{_results_table(summary)}</section>'
        + f'<section id="curves"><h2>Layer curves</h2>{_layer_curves(summary)}</section>'
        + training_html
        + failures_html
        + (spec if spec_text else "")
        + f"<script>{JS}</script></body></html>\n"
    )


def write_sweep_html(
    path: Path,
    summary: Sequence[Mapping],
    header: Mapping,
    spec_text: str = "",
    failures: Sequence[Mapping] = (),
    loss_curves: Mapping[str, Sequence[tuple[str, str, Sequence[Sequence[float]]]]] | None = None,
) -> Path:
    """Write the page to ``path`` atomically (a temporary file beside it, then renamed); returns ``path``."""
    path = Path(path)
    page = render_sweep_html(summary, header, spec_text, failures, loss_curves)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # same folder: same file system
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # created with the umask's permissions, as the page will be
            f.write(page)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
