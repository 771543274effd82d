"""The report of a sweep as one self-contained HTML page: heat maps of models x readouts per test set (and, once,
of the readout-free measures, which are taken on the training images), a sortable and filterable table of every
cell, each model's layer curves, the training and the failures.

A model-zoo sweep has too many cells to read as Markdown, and a researcher wants to sort, filter and look at it
anywhere: on a cluster's login node, in a browser with no network, or attached to a mail. So the page needs no
server and loads nothing: its CSS and (vanilla) JS are inline and its figures are PNGs inlined as ``data:`` URIs.
Everything that comes from the user (model names, error messages, the spec) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from io import BytesIO
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..intervals import SEED_SPREAD_LIMIT
from .rundir import replace_atomically

INTERVALS = "95% bootstrap interval over test images and seeds"
FLAGS = {
    "◌": "the readout drew a flat map in some seed",
    "⚠": "a seed's readout did not finish training",
    "±": f"the seeds' scores differ by more than {SEED_SPREAD_LIMIT} (std across seeds)",
}
COUNTS = {"skipped": "skipped (done earlier)"}  # how the header names a count
# Keys of ``counts`` that are facts of the runs, not counts of cells: shown with the times, not as boxes.
RUN_FACTS = ("runs", "compute_seconds", "first_started")
CONSTANT = "constant predictions: SPC 0 by definition"
PVF_MEANING = (
    "PVF: share of the features' variance that is a function of position (0: none; PosENet's raw pixels show the "
    "photos' own layout)"
)
# The results table: (data-col, header, how it sorts: "num" or "text", tooltip). "n" and "n_constant" only show
# when the summary has them.
COLUMNS = (
    ("group", "group", "text", "the model: backbone · weights · padding or position embedding"),
    ("weights", "weights", "text", "the backbone's weights"),
    ("layers", "layers", "num", "the tapped level, or all levels together"),
    ("readout", "readout", "text", ""),
    ("pattern", "pattern", "text", "the target map"),
    ("test_set", "test set", "text", ""),
    ("metric", "metric", "text", ""),
    ("value", "value [95% interval]", "num", INTERVALS),
    ("n", "n", "num", "images scored"),
    ("n_constant", "const.", "num", "images whose predicted map was constant: SPC 0"),
    ("seeds", "seeds", "num", ""),
    ("seed_sd", "seed sd", "num", "standard deviation of the score across seeds"),
    ("mae", "MAE", "num", "mean absolute error of the drawn map (hover for the interval)"),
    ("selectivity", "select.", "num", "selectivity: SPC − max(0, PosENet's SPC with the same readout)"),
    ("flags", "flags", "text", ""),
    ("status", "status", "text", ""),
)
OPTIONAL_COLUMNS = ("n", "n_constant")
# Diverging scale for a score in [-1, 1]: red for negative, near-white at 0, blue for positive; a sequential one
# (near-white to purple) for a readout-free measure in [0, 1].
_NEGATIVE, _ZERO, _POSITIVE = (178, 24, 43), (247, 247, 247), (33, 102, 172)
_MEASURE = (84, 39, 143)
# Layer curves: a line style and marker per readout, in order of appearance (pem solid circles, linear dashed
# squares in the usual spec), and a colour per pattern.
HEAT_INTRO = (
    '<p class="legend">Each cell: a model\'s score with a readout and pattern over all its levels together (the '
    "paper's readout), mean over test images and seeds; hover for the interval, the seeds and the flags.</p>"
)
STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"))

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
#table .scroll { max-height: 75vh; overflow-x: auto; overflow-y: auto; border-bottom: 1px solid var(--line); }
#results { font-size: 12.5px; }
#results th, #results td { padding: 3px 5px; }
#results td.group { white-space: normal; min-width: 150px; max-width: 270px; }
#results td.weights { max-width: 120px; overflow: hidden; text-overflow: ellipsis; }
#results thead th { position: sticky; top: 0; z-index: 1; }
.bad { color: #b42318; font-weight: 600; }
table.heat td.v { text-align: center; min-width: 64px; border: 1px solid #fff; }
table.heat th.sub { font-weight: normal; color: var(--muted); text-align: center; }
table.heat th small { font-weight: normal; color: var(--muted); }
table.heat th.top { text-align: center; }
table.heat th small, table.heat td.v small { display: block; font-size: 11px; line-height: 1.2; }
table.heat td.v small { opacity: 0.85; }
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
# ties keep their order) and filter its rows by words: a row shows when it holds every word, in any case.
JS = r"""
(function () {
  const table = document.getElementById("results");
  const tbody = table.tBodies[0];
  const heads = Array.from(table.tHead.rows[0].cells);
  const filter = document.getElementById("filter");
  const shown = document.getElementById("shown");
  let sorted = { col: -1, dir: 1 };
  const texts = new Map();  // each row's text, its cells apart, so a word never spans two cells
  for (const tr of tbody.rows) texts.set(tr, Array.from(tr.cells, (td) => td.textContent).join(" ").toLowerCase());

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
    const words = filter.value.toLowerCase().split(/\s+/).filter((w) => w !== "");
    let n = 0;
    for (const tr of tbody.rows) {
      const text = texts.get(tr);
      tr.hidden = !words.every((w) => text.includes(w));
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
    """'0.812 [0.780, 0.840]', or '0.640 [—]' when the interval is missing (a measure pooled over levels has
    none); '' with no value."""
    if not _finite(value):
        return ""
    interval = f"[{_num(lo, digits)}, {_num(hi, digits)}]" if _finite(lo) and _finite(hi) else "[—]"
    return f"{_num(value, digits)} {interval}"


def _colour(value: float, measure: bool = False) -> tuple[str, str]:
    """(background, text colour) of a score: diverging over [-1, 1] for SPC, sequential over [0, 1] for a
    readout-free measure (a share of variance is never negative)."""
    t = max(0.0 if measure else -1.0, min(1.0, value))
    end = _MEASURE if measure else _POSITIVE if t >= 0 else _NEGATIVE
    rgb = [round(z + abs(t) * (e - z)) for z, e in zip(_ZERO, end)]
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})", "#fff" if abs(t) > 0.55 else "#1f2328"


def _unique(items: Iterable) -> list:
    """The distinct items in order of first appearance."""
    return list(dict.fromkeys(items))


def _group_label(group: str, stand_in: bool) -> str:
    tag = '<span class="tag" title="its weights stand in for the named network\'s">stand-in</span>'
    return _e(group) + (tag if stand_in else "")


def _is_measure(r: Mapping) -> bool:
    """A readout-free measure (PVF): measured once on the training images, not per test set. A failed row has no
    metric, so its kind decides."""
    return r.get("kind") == "measure" or r.get("metric") not in (None, "", "spc")


def _constant(r: Mapping) -> bool:
    """Every image's predicted map was constant, so its SPC is 0 by definition (a linear readout has no training
    verdict to flag it)."""
    n, n_constant = r.get("n"), r.get("n_constant")
    return _finite(n) and _finite(n_constant) and n > 0 and n_constant == n


def _flags(r: Mapping) -> str:
    """The row's flags, with ◌ added when every prediction was constant."""
    flags = str(r.get("flags") or "")
    return "◌" + flags if _constant(r) and "◌" not in flags else flags


def _flag_note(r: Mapping) -> str:
    """What the row's flags mean, for its tooltip."""
    notes = [FLAGS[mark] for mark in str(r.get("flags") or "") if mark in FLAGS]
    return "; ".join([CONSTANT, *notes] if _constant(r) else notes)


def _hollow(r: Mapping) -> bool:
    """Drawn as an open marker: a flat map or an unfinished readout."""
    return any(mark in _flags(r) for mark in "◌⚠")


def _where(test_set: object) -> str:
    return "the training images" if test_set == "train" else f"the {test_set} images"


def _tip(r: Mapping) -> str:
    """A heat-map cell's hover text: what it is, its value and interval, how it was measured, its flags."""
    if _is_measure(r):
        what = str(r.get("readout") or r.get("metric"))
    else:
        what = f"{r.get('readout')} {r.get('pattern') or ''} on {r.get('test_set')}"
    layers = "all levels together" if r.get("layers") == "all" else f"level {r.get('layers')}"
    tip = f"{r.get('group')}: {what}, {layers}: {_with_interval(r.get('value'), r.get('lo'), r.get('hi'))}"
    if _is_measure(r):
        tip += f", measured once on {_where(r.get('test_set'))}"
    elif r.get("seeds"):
        tip += f", {r['seeds']} seed(s)"
    note = _flag_note(r)
    return tip + (f"; {note}" if note else "")


def _header(header: Mapping, failed: bool, trained: bool = False) -> str:
    """Title, the facts of what ran, the counts, the notes, and how to read the numbers."""
    facts = []

    def fact(name: str, value: object) -> None:
        if value not in (None, "", [], {}):
            facts.append(f"<dt>{_e(name)}</dt><dd>{value}</dd>")

    counts = dict(header.get("counts") or {})
    runs = {k: counts.pop(k, header.get(k)) for k in RUN_FACTS}  # facts of the runs, wherever they come
    fact("spec", _e(header.get("spec_name")))
    started, first = header.get("started"), runs["first_started"]
    if first and started and first != started:  # a resumed sweep: it started with its first run
        fact("started", f"{_e(first)} <span class='muted'>(first run; this run: {_e(started)})</span>")
    else:
        fact("started", _e(first or started))
    fact("finished", _e(header.get("finished")))
    compute = runs["compute_seconds"]
    if _finite(header.get("seconds")):
        fact("wall time, this run" if _finite(compute) else "wall time", _e(duration(header["seconds"])))
    if _finite(compute):
        over = f" over {runs['runs']} run{'s' if runs['runs'] != 1 else ''}" if _finite(runs["runs"]) else ""
        fact("compute, all runs", _e(duration(compute) + over))
    fact("executor", _e(header.get("executor")))
    fact("machine", _e(header.get("machine")))
    fact("training", _e(header.get("training")))
    data = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in (header.get("data") or {}).items())
    fact("data", f"<ul>{data}</ul>" if data else "")
    fact("stand-ins", ", ".join(_e(s) for s in header.get("stand_ins") or ()))
    fact("versions", " · ".join(f"{_e(k)} {_e(v)}" for k, v in (header.get("versions") or {}).items()))

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
        f"0 = no position information) or PVF, each with its {INTERVALS}. Flags: {flags}; ◌ also marks a row "
        "whose every prediction was a constant map (its SPC is 0 by definition).</p></header>"
    )


def duration(seconds: float) -> str:
    """'42.0 s', '12 min 05 s', '3 h 02 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _column(r: Mapping) -> tuple[str, str]:
    """(readout, heading): a heat map's column; a measure (no pattern) is headed by its name, a failed one too."""
    return str(r.get("readout") or ""), str(r.get("pattern") or str(r.get("metric") or r.get("readout") or "").upper())


def _pick(rows: Sequence[Mapping]) -> tuple[Mapping, bool]:
    """(row, is a best level) a heat-map cell shows of one model's rows of one column: the readout over all levels
    together; else, as in a sweep of single levels (layers = ["each"]), the best level, so the cell is not blank."""
    together = [r for r in rows if r.get("layers") == "all"]
    if together:
        return together[0], False
    ok = [r for r in rows if r.get("status") != "failed" and _finite(r.get("value"))]
    return (max(ok, key=lambda r: r["value"]) if ok else rows[0]), True  # max keeps the first of equals


def _heat_table(rows: Sequence[Mapping], groups: Sequence, stand_ins: set, measure: bool = False) -> tuple[str, int]:
    """(table, how many cells show a best level): a row per model that has rows here, a column per (readout,
    pattern) grouped under its readout, or per measure."""
    by_cell: dict[tuple, list[Mapping]] = {}
    for r in rows:
        by_cell.setdefault((r.get("group"), *_column(r)), []).append(r)
    picked = {key: _pick(rs) for key, rs in by_cell.items()}
    columns = _unique(key[1:] for key in by_cell)
    readouts = _unique(readout for readout, _ in columns)
    columns = [c for readout in readouts for c in columns if c[0] == readout]  # grouped under their readout
    sub = ""
    for c in columns:
        best = [b for key, (_, b) in picked.items() if key[1:] == c]
        label = "best level" if all(best) else "all levels or best" if any(best) else ""
        sub += f'<th class="{"top" if measure else "sub"}">{_e(c[1])}{f"<small>{label}</small>" if label else ""}</th>'
    if measure:  # one measure per readout: its name alone heads the column
        heads = f"<tr><th>model</th>{sub}</tr>"
    else:
        top = "".join(f'<th class="top" colspan="{sum(c[0] == ro for c in columns)}">{_e(ro)}</th>' for ro in readouts)
        heads = f'<tr><th rowspan="2">model</th>{top}</tr><tr>{sub}</tr>'
    body = "".join(
        f"<tr><th>{_group_label(g, g in stand_ins)}</th>"
        + "".join(_heat_cell(*picked[(g, *c)]) if (g, *c) in picked else '<td class="v"></td>' for c in columns)
        + "</tr>"
        for g in groups
        if any((g, *c) in picked for c in columns)
    )
    table = f'<div class="scroll"><table class="heat"><thead>{heads}</thead><tbody>{body}</tbody></table></div>'
    return table, sum(b for _, b in picked.values())


def _scale(measure: bool, text: str) -> str:
    """The colour bar under a heat map: diverging from −1 for SPC, sequential from 0 for a measure."""
    low, mid = (0.0, 0.5) if measure else (-1.0, 0.0)
    stops = ", ".join(_colour(v, measure)[0] for v in (low, mid, 1.0))
    bar = f'<span class="bar" style="background: linear-gradient(to right, {stops})"></span>'
    return f'<div class="scale">{"0" if measure else "−1"}{bar}{"1" if measure else "+1"} &nbsp;{text}</div>'


def _heat_maps(summary: Sequence[Mapping]) -> str:
    """A heat map per test set of the readouts' SPC, and one of the readout-free measures (PVF): those are measured
    once, on the training images, so repeating them under each test set would say they were measured there."""
    readouts = [r for r in summary if not _is_measure(r)]
    measures = [r for r in summary if _is_measure(r)]
    groups = _unique(r.get("group") for r in summary)
    stand_ins = {r.get("group") for r in summary if r.get("stand_in")}
    parts, best = [], 0
    for test_set in _unique(r.get("test_set") for r in readouts):
        rows = [r for r in readouts if r.get("test_set") == test_set]
        table, n = _heat_table(rows, groups, stand_ins)
        best += n
        none = not any(r.get("layers") == "all" for r in rows)
        note = (
            '<p class="legend">No readout over all levels together on this test set: each cell is the model\'s best '
            "single level, named in the cell (every level: the table and the layer curves).</p>"
            if none
            else ""
        )
        parts.append(f"<h3>test set: {_e(test_set)}</h3>{note}{table}")
    if parts:
        cells = "cells: mean over test images and seeds (hover for the interval)"
        cells += "; a level name beside a value: that model's best single level, having no readout over all levels"
        parts.append(_scale(False, cells if best else cells.split(";")[0]))
    if measures:
        sets = _unique(r.get("test_set") for r in measures)
        where = "training images" if sets == ["train"] else ", ".join(map(str, sets))
        table, _ = _heat_table(measures, groups, stand_ins, measure=True)
        meaning = PVF_MEANING + "." if any(_column(r)[1] == "PVF" for r in measures) else ""
        parts.append(
            f'<h3>readout-free ({_e(where)})</h3><p class="legend">{_e(meaning)} Measured once per model, not per '
            f"test set; all levels: pooled over the levels.</p>{table}"
            + _scale(True, "its own scale: a share of variance, in [0, 1]")
        )
    if not parts:
        return "<p class='muted'>No results in this sweep yet.</p>"
    return "".join(parts)


def _heat_cell(r: Mapping, best: bool = False) -> str:
    """A coloured cell: the value, its flags and, for a best level, the level's name; the rest in its tooltip."""
    if r.get("status") == "failed":
        return f'<td class="v failed" title="{_e(r.get("error"))}">failed</td>'
    value = r.get("value")
    if not _finite(value):
        return '<td class="v">–</td>'
    background, colour = _colour(value, _is_measure(r))
    tip = _tip(r) + ("; the best level: this model has no readout over all levels together" if best else "")
    flags = f" {_e(_flags(r))}" if _flags(r) else ""
    level = f" <small>{_e(r.get('layers'))}</small>" if best else ""
    return (
        f'<td class="v" style="background: {background}; color: {colour}" title="{_e(tip)}">'
        f"{value:.2f}{flags}{level}</td>"
    )


def _results_table(summary: Sequence[Mapping]) -> str:
    """Every summary row; each cell's data-sort holds what the page sorts by (the raw number for numbers)."""
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(c[0] in r for r in summary)]
    heads = "".join(
        f'<th data-col="{col}" data-type="{kind}" tabindex="0"{f" title={chr(34)}{_e(tip)}{chr(34)}" if tip else ""}>'
        f'{name}<span class="arrow"></span></th>'
        for col, name, kind, tip in columns
    )
    body = []
    for r in summary:
        level = -1 if r.get("layers") == "all" else r.get("level_index")
        status = _e(r.get("status"))
        if r.get("status") == "failed":
            status = f'<span class="bad">{status}</span>'
        if r.get("error"):
            status += f'<div class="err" title="{_e(r["error"])}">{_e(r["error"])}</div>'
        mae = _with_interval(r.get("mae"), r.get("mae_lo"), r.get("mae_hi"))
        selectivity = _with_interval(r.get("selectivity"), r.get("selectivity_lo"), r.get("selectivity_hi"))
        cells = {
            "group": f'<td class="group">{_group_label(r.get("group"), bool(r.get("stand_in")))}</td>',
            "weights": f'<td class="weights" title="{_e(r.get("weights"))}">{_e(r.get("weights"))}</td>',
            "layers": f'<td data-sort="{_num(level, 0)}">{_e(r.get("layers"))}</td>',
            "readout": f"<td>{_e(r.get('readout'))}</td>",
            "pattern": f"<td>{_e(r.get('pattern'))}</td>",
            "test_set": f"<td>{_e(r.get('test_set'))}</td>",
            "metric": f"<td>{_e(r.get('metric'))}</td>",
            "value": _num_cell(r.get("value"), _with_interval(r.get("value"), r.get("lo"), r.get("hi")) or "–"),
            "n": _num_cell(r.get("n"), _num(r.get("n"), 0)),
            "n_constant": _num_cell(r.get("n_constant"), _num(r.get("n_constant"), 0)),
            "seeds": _num_cell(r.get("seeds"), _e(r.get("seeds"))),
            "seed_sd": _num_cell(r.get("seed_sd"), _num(r.get("seed_sd"))),
            "mae": _num_cell(r.get("mae"), _num(r.get("mae")), mae),
            "selectivity": _num_cell(r.get("selectivity"), _num(r.get("selectivity")), selectivity),
            "flags": f'<td title="{_e(_flag_note(r))}">{_e(_flags(r))}</td>',
            "status": f"<td>{status}</td>",
        }
        body.append("<tr>" + "".join(cells[c[0]] for c in columns) + "</tr>")
    return (
        '<div class="tools"><input id="filter" type="search" placeholder="filter rows: every word, e.g. resnet18 '
        'layer3" aria-label="filter rows"><span id="shown" class="muted"></span>'
        '<span class="muted">click a column header to sort</span></div>'
        f'<div class="scroll"><table id="results"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _num_cell(raw: object, text: str, tip: str = "") -> str:
    title = f' title="{_e(tip)}"' if tip else ""
    return f'<td class="num" data-sort="{repr(float(raw)) if _finite(raw) else ""}"{title}>{text}</td>'


def _plain(text: object) -> str:
    """Text matplotlib draws as given: a '$' in a model name must not start mathtext."""
    return str(text).replace("$", r"\$")


def _curve(r: Mapping) -> tuple[str, str]:
    """(readout, pattern): one line of a layer curve; a measure has no pattern."""
    return str(r.get("readout") or ""), str(r.get("pattern") or "")


def _hue(r: Mapping) -> str:
    """What a line's colour tells: its pattern, or a measure's name."""
    return str(r.get("pattern") or r.get("readout") or "")


def _looks(summary: Sequence[Mapping]) -> tuple[dict[str, object], dict[str, tuple]]:
    """(colour per pattern, (line style, marker) per readout), fixed over the whole sweep so that every figure
    reads alike; measures come after the readouts and patterns."""
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    order = sorted(summary, key=_is_measure)  # stable: readouts first, each in order of appearance
    hues = _unique(map(_hue, order))
    readouts = _unique(str(r.get("readout") or "") for r in order)
    colours = {h: cycle[i % len(cycle)] for i, h in enumerate(hues)}
    return colours, {ro: STYLES[i % len(STYLES)] for i, ro in enumerate(readouts)}


ALL_X = 1.16  # where a panel draws the readout over all levels together, right of the deepest level (depth 1)


def _points(
    ax, x: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, hollow: np.ndarray, colour, marker
) -> None:
    """Markers with their intervals as bars (none where missing): filled, or open for a flat or unfinished one."""
    ax.errorbar(
        x, y, [np.nan_to_num(y - lo), np.nan_to_num(hi - y)], fmt="none", ecolor=colour, elinewidth=0.8, capsize=2
    )
    for mask, face in ((~hollow, colour), (hollow, "white")):
        if mask.any():
            ax.plot(x[mask], y[mask], linestyle="none", marker=marker, markersize=5.5, color=colour, mfc=face, mew=1.2)


def _layer_curve_png(
    group: str,
    rows: Sequence[Mapping],
    stand_in: bool = False,
    looks: tuple[dict, dict] | None = None,
    posenet: Mapping[tuple, float] | None = None,
) -> bytes:
    """One group's PNG: score against relative depth, a line per (readout, pattern) with its 95% interval as bars
    and its all-levels readout as a point at "all"; a panel per test set, and one per measure (PVF). ``posenet``:
    (readout, pattern, test set) -> PosENet's SPC, drawn as a dotted grey line, the pixels-only control."""
    colours, styles = looks or _looks(rows)
    posenet = posenet or {}
    ok = [r for r in rows if r.get("status") != "failed" and _finite(r.get("value"))]
    levels = sorted({(r["depth"], r["layers"]) for r in ok if r.get("depth") is not None})
    panels = _unique(
        (r.get("metric"), r.get("test_set") if r.get("metric") == "spc" else None)
        for r in rows
        if r.get("depth") is not None
    )
    ncols, nrows = min(4, len(panels)), math.ceil(len(panels) / 4)
    width = 2.85 * ncols + 1.9  # and 1.9 in for the legend: 13.3 in at most, the page's width at 100 dpi
    fig = Figure(figsize=(width, 2.9 * nrows + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    patterns: set[str] = set()  # what the figure's legend names
    readouts: dict[str, object] = {}  # readout -> its legend colour: a measure's own, else neutral
    drawn = {"posenet": False, "hollow": False}
    together = any(r.get("layers") == "all" for r in ok)
    for ax, (metric, test_set) in zip(axes, panels):
        mine = [r for r in ok if r.get("metric") == metric and (test_set is None or r.get("test_set") == test_set)]
        keys = _unique(map(_curve, mine))
        for i, key in enumerate(keys):
            line = [r for r in mine if _curve(r) == key]
            colour, (style, marker) = colours.get(_hue(line[0]), "k"), styles.get(key[0], STYLES[0])
            if key[1]:
                patterns.add(key[1])
            readouts.setdefault(key[0], "#444" if key[1] else colour)
            drawn["hollow"] |= any(map(_hollow, line))
            dodge = (i - (len(keys) - 1) / 2) * 0.025  # the all-levels points side by side, not on each other
            pts = sorted(
                (r["depth"], r["value"], r.get("lo"), r.get("hi"), _hollow(r))
                for r in line
                if r.get("depth") is not None
            )
            pts += [
                (ALL_X + dodge, r["value"], r.get("lo"), r.get("hi"), _hollow(r))
                for r in line
                if r.get("layers") == "all"
            ]
            if not pts:  # only combined levels (l1+l2) or failed rows: nothing to place on the depth axis
                continue
            x, y, lo, hi, hollow = (np.array(v, dtype=float) for v in zip(*pts))
            per_level = x <= 1.0
            ax.plot(x[per_level], y[per_level], color=colour, linestyle=style, linewidth=1.4)
            _points(ax, x, y, lo, hi, hollow.astype(bool), colour, marker)
            if metric == "spc" and _finite(posenet.get((*key, test_set))):
                ax.axhline(posenet[(*key, test_set)], color="#8c8c8c", linestyle=":", linewidth=1.0, zorder=0)
                drawn["posenet"] = True
        ticks = [(d, name) for d, name in levels] + ([(ALL_X, "all")] if together else [])
        ax.set_xticks([d for d, _ in ticks], [_plain(name) for _, name in ticks], rotation=40, ha="right")
        ax.tick_params(labelsize=9)
        ax.set_xlim(-0.06, ALL_X + 0.09 if together else 1.06)
        if together:
            ax.axvline((1 + ALL_X) / 2, color="#c8c8c8", linewidth=0.8)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.25)
        name = str(metric).upper()
        ax.set_title(_plain(f"{name} on {test_set}" if test_set else f"{name} (training images)"), fontsize=10)
    for metric in _unique(m for m, _ in panels):  # panels of one metric on one scale
        same = [ax for ax, (m, _) in zip(axes, panels) if m == metric]
        low = min(-0.1, *(ax.get_ylim()[0] for ax in same))
        for ax in same:
            ax.set_ylim(low, 1.04)
    handles = [
        Line2D([], [], color=colours[h], linewidth=3, label=_plain(f"pattern {h}")) for h in colours if h in patterns
    ]
    handles += [
        Line2D([], [], color=readouts[ro], linestyle=styles[ro][0], marker=styles[ro][1], label=_plain(ro))
        for ro in styles
        if ro in readouts
    ]
    if drawn["posenet"]:
        handles.append(Line2D([], [], color="#8c8c8c", linestyle=":", linewidth=1.2, label="PosENet (pixels)"))
    if drawn["hollow"]:
        handles.append(
            Line2D([], [], color="#444", linestyle="none", marker="o", mfc="white", label="flat or unfinished")
        )
    fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False)
    fig.suptitle(_plain(group + (" (stand-in)" if stand_in else "")), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / width, 1))
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _layer_curves(summary: Sequence[Mapping]) -> str:
    """A figure per group with two levels or more; a group of one level (PosENet: the image itself) would be one
    point on an empty panel, so it is only named, and PosENet's SPC is drawn on the others' panels instead."""
    looks = _looks(summary)
    posenet = {
        (*_curve(r), r.get("test_set")): r["value"]
        for r in summary
        if r.get("backbone") == "posenet" and r.get("layers") == "all" and r.get("metric") == "spc"
        if r.get("status") != "failed" and _finite(r.get("value"))
    }
    figures, single = [], []
    for group in _unique(r.get("group") for r in summary if r.get("depth") is not None):
        rows = [r for r in summary if r.get("group") == group]
        if len({r.get("layers") for r in rows if r.get("depth") is not None}) < 2:
            single.append(group)
            continue
        stand_in = any(r.get("stand_in") for r in rows)
        reference = {} if any(r.get("backbone") == "posenet" for r in rows) else posenet
        png = base64.b64encode(_layer_curve_png(str(group), rows, stand_in, looks, reference)).decode("ascii")
        figures.append(f'<figure><img alt="layer curve: {_e(group)}" src="data:image/png;base64,{png}"></figure>')
    left_out = (
        f" Not drawn, having one level only (see the table): {', '.join(_e(g) for g in single)}." if single else ""
    )
    if not figures:
        return f"<p class='muted'>No model with two levels or more in this sweep.{left_out}</p>"
    pixels = (
        " Dotted grey: PosENet (pixels), the pixels-only control, with the same readout and pattern." if posenet else ""
    )
    return (
        '<p class="legend">Each tapped level at its relative depth in the network; at the right, past the line: '
        "the same readout over all levels together (“all”). Colour: the pattern; line style and marker: the readout; "
        f"bars: the 95% interval. <b>Open markers: flat map or unfinished readout.</b>{pixels}{left_out}</p>"
        + "".join(figures)
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
        + f'<section id="heatmap"><h2>Model × readout</h2>{HEAT_INTRO}{_heat_maps(summary)}</section>'
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
    replace_atomically(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path
