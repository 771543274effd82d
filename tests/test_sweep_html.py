"""The sweep's HTML report: self-contained (nothing fetched), escaped, complete; and in a real browser its figures
load, its table sorts and filters, and its script raises nothing."""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from posprobe.output import rundir, sweep_html
from posprobe.output.sweep_html import render_sweep_html, write_sweep_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = 'evil <b>&"x"</b> net'
ERROR = "CUDA out of memory: <tensor> & 'more'"
LEVELS = ("layer1", "layer2", "layer3", "layer4")
GROUPS = ("tv:resnet18 · random · padding zeros", "tv:vgg16 · imagenet · padding model", EVIL)
TEST_SETS = ("photos", "black")


def _row(group: str, layers: str, readout: str, pattern: str, test_set: str, metric: str, value: float) -> dict:
    level = None if layers == "all" else LEVELS.index(layers)
    return {
        "group": group,
        "backbone": group.split(" · ")[0],
        "weights": "random",
        "padding": "zeros",
        "pos_embed": "none",
        "stand_in": group == EVIL,
        "layers": layers,
        "level_index": level,
        "depth": None if level is None else (level + 1) / len(LEVELS),
        "readout": readout,
        "kind": "measure" if metric == "pvf" else "pem",
        "pattern": pattern,
        "test_set": test_set,
        "metric": metric,
        "value": value,
        "lo": value - 0.05 if layers != "layer1" else math.nan,  # one level without an interval
        "hi": value + 0.04 if layers != "layer1" else math.nan,
        "seeds": 2,
        "seed_sd": 0.01 if metric == "spc" else None,
        "mae": 0.2 - value / 10 if metric == "spc" else None,
        "mae_lo": None,
        "mae_hi": None,
        "selectivity": value - 0.1 if metric == "spc" else None,
        "flags": "◌" if value < 0.1 else "",
        "convergence": "converged",
        "status": "ok",
        "error": "",
    }


@pytest.fixture(scope="module")
def summary() -> list[dict]:
    """3 groups x (pem k3: H, G on two test sets; a PVF measure) x (every level, all together), one cell failed."""
    rows = []
    for g, group in enumerate(GROUPS):
        for layers in ("all", *LEVELS):
            depth = 1.0 if layers == "all" else (LEVELS.index(layers) + 1) / len(LEVELS)
            for p, pattern in enumerate(("H", "G")):
                for t, test_set in enumerate(TEST_SETS):
                    value = round(0.9 * depth - 0.3 * g - 0.1 * p - 0.2 * t, 3)
                    rows.append(_row(group, layers, "pem k3", pattern, test_set, "spc", value))
            rows.append(_row(group, layers, "pvf", "", "train", "pvf", round(0.5 * depth + 0.1 * g, 3)))
    failed = next(r for r in rows if r["group"] == EVIL and r["layers"] == "layer4" and r["test_set"] == "black")
    failed.update(status="failed", error=ERROR, value=math.nan, lo=math.nan, hi=math.nan, seeds=0, flags="")
    return rows


HEADER = {
    "title": "zoo <sweep>",
    "spec_name": "zoo.toml",
    "started": "2025-01-01T10:00:00",
    "finished": "2025-01-01T10:12:05",
    "seconds": 725.0,
    "executor": "local, 2 workers",
    "versions": {"posprobe": "0.1.0", "torch": "2.3.0"},
    "machine": "x86_64, 2 CPUs",
    "data": {"photos": "50 test photos", "black": "one black image"},
    "training": "quick profile: 100 SGD updates at batch 32, seeds 0, 1",
    "stand_ins": [EVIL],
    "counts": {"cells": 40, "done": 38, "failed": 1, "skipped": 1},
    "notes": ["a note with <angle> brackets"],
}
FAILURES = [{"group": EVIL, "cell": "pem k3 · G · layer4 · black", "error": ERROR}]
# two groups' training: a finished readout, a flat map and one still falling
LOSS_CURVES = {
    EVIL: [("pem k3 H on all, seed 0", "converged", [(5, 0.08), (50, 0.01), (100, 0.004)])],
    "tv:resnet18 · random": [
        ("pem k3 G on layer1, seed 0", "flat map", [(5, 0.06), (50, 0.05), (100, 0.05)]),
        ("pem k3 G on layer2, seed 0", "still falling", [(5, 0.06), (50, 0.03), (100, 0.01)]),
    ],
}


@pytest.fixture(scope="module")
def report(summary, tmp_path_factory) -> Path:
    """The page, rendered once for the module (its figures take a second)."""
    out = tmp_path_factory.mktemp("report") / "sweep.html"
    return write_sweep_html(out, summary, HEADER, "[sweep]\nname = '<zoo>'", FAILURES, LOSS_CURVES)


@pytest.fixture(scope="module")
def page_html(report) -> str:
    return report.read_text(encoding="utf-8")


def test_nothing_is_fetched(page_html):
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page_html)
    assert links, "the page has images and anchors"
    assert not [u for u in links if u.startswith(("http:", "https:", "//"))]
    assert "<script src" not in page_html and '<link rel="stylesheet"' not in page_html


def test_figures_are_inline_pngs(page_html):
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page_html)
    assert len(sources) == len(GROUPS) + len(LOSS_CURVES)  # a layer curve per group, a loss figure per trained one
    for src in sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :])[:8] == PNG_MAGIC


def test_training_shows_each_group_s_loss_curves(page_html):
    assert '<a href="#training">' in page_html and '<section id="training">' in page_html
    assert page_html.count('alt="loss curves: ') == len(LOSS_CURVES)
    assert 'alt="loss curves: tv:resnet18 · random"' in page_html


def test_user_text_is_escaped(page_html):
    assert EVIL not in page_html and "<tensor>" not in page_html and "<zoo>" not in page_html
    assert "evil &lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt; net" in page_html
    assert 'alt="layer curve: evil &lt;b&gt;&amp;&quot;x&quot;&lt;/b&gt; net"' in page_html
    assert "&lt;tensor&gt; &amp; &#x27;more&#x27;" in page_html


def test_heat_map_has_a_row_per_group_and_a_table_per_test_set(page_html):
    tables = re.findall(r'<table class="heat">(.*?)</table>', page_html, re.S)
    assert len(tables) == len(TEST_SETS) + 1  # and one of the readout-free measures
    for table in tables[:-1]:
        body = table.split("<tbody>")[1]
        assert body.count("<tr>") == len(GROUPS)
        assert ">H</th>" in table and ">G</th>" in table and "PVF" not in table
    assert 'style="background: rgb(' in tables[0]  # cells coloured by value


def test_readout_free_measures_are_shown_once_on_their_own_scale(page_html, summary):
    """PVF is measured on the training images: one table of its own, not a column under every test set."""
    section = page_html.split('<section id="heatmap">')[1].split("</section>")[0]
    assert section.count(">PVF</th>") == 1
    measures = section.split("<h3>readout-free (training images)</h3>")[1]
    assert sweep_html.PVF_MEANING.replace("'", "&#x27;") in measures
    table = re.findall(r'<table class="heat">(.*?)</table>', measures, re.S)[0]
    assert table.split("<tbody>")[1].count("<tr>") == len(GROUPS)
    assert "measured once on the training images" in table and "seed(s)" not in table
    for r, g, b in map(lambda m: map(int, m), re.findall(r"background: rgb\((\d+), (\d+), (\d+)\)", table)):
        assert b >= g and r >= g  # the sequential purple scale, never the diverging one's red or blue
    assert sweep_html._colour(0.64, measure=True) != sweep_html._colour(0.64)


def test_a_missing_interval_reads_as_a_dash():
    assert sweep_html._with_interval(0.327, math.nan, math.nan) == "0.327 [—]"
    assert sweep_html._with_interval(0.327, 0.3, 0.35) == "0.327 [0.300, 0.350]"
    assert sweep_html._with_interval(math.nan, 0.3, 0.35) == ""


def test_a_sweep_of_single_levels_shows_each_model_s_best_level(summary):
    """layers = ["each"]: no all-levels readout, so each cell is the best level, named, instead of a blank map."""
    each = [r for r in summary if r["layers"] != "all"]
    page = sweep_html._heat_maps(each)
    tables = re.findall(r'<table class="heat">(.*?)</table>', page, re.S)
    assert len(tables) == len(TEST_SETS) + 1
    assert page.count("No readout over all levels together on this test set") == len(TEST_SETS)
    assert "<small>best level</small>" in tables[0] and "layer4</small>" in tables[0]
    resnet = next(row for row in tables[0].split("<tr>") if row.startswith("<th>tv:resnet18"))
    best = max(
        r["value"]
        for r in each
        if r["group"].startswith("tv:resnet18") and r["pattern"] == "H" and r["test_set"] == "photos"
    )
    assert f"{best:.2f} <small>layer4</small>" in resnet
    assert "the best level" in resnet
    mixed = sweep_html._heat_maps([r for r in summary if not (r["layers"] == "all" and r["group"] == EVIL)])
    assert "all levels or best" in mixed and "No readout over all levels together on this test set" not in mixed


def test_constant_predictions_are_flagged_even_without_a_training_verdict(summary):
    """A linear readout whose every map was constant has no ◌ from training, yet its SPC is 0 by definition."""
    row = dict(summary[0], readout="linear k1", kind="linear", value=0.0, lo=0.0, hi=0.0, flags="", n=5, n_constant=5)
    partly = dict(row, n_constant=2, value=0.4)
    page = render_sweep_html([row, partly], HEADER)
    body = page.split('<table id="results">')[1]
    assert '>const.<span class="arrow">' in body and 'title="images whose predicted map was constant' in body
    constant, other = body.split("<tbody>")[1].split("</tbody>")[0].split("</tr>")[:2]
    assert f'<td title="{sweep_html.CONSTANT}">◌</td>' in constant
    assert "◌" not in other and sweep_html.CONSTANT not in other
    heat = page.split('<table class="heat">')[1].split("</table>")[0]
    assert "0.00 ◌" in heat and "constant predictions: SPC 0 by definition" in heat
    assert sweep_html._flags(dict(row, flags="◌")) == "◌"  # not twice
    assert sweep_html._flags(dict(row, n=0, n_constant=0)) == ""  # no image scored: nothing to say
    assert "const.</" not in render_sweep_html([summary[0]], HEADER)  # a summary without the counts


def test_header_shows_this_run_and_all_runs():
    counts = {"cells": 4, "done": 4, "runs": 3, "compute_seconds": 4000.0, "first_started": "2025-01-01T09:00:00"}
    page = render_sweep_html([], {**HEADER, "counts": counts})
    facts = page.split('<dl class="facts">')[1].split("</dl>")[0]
    assert "<dt>wall time, this run</dt><dd>12 min 05 s</dd>" in facts
    assert "<dt>compute, all runs</dt><dd>1 h 06 min over 3 runs</dd>" in facts
    assert "2025-01-01T09:00:00" in facts and "this run: 2025-01-01T10:00:00" in facts
    boxes = page.split('<div class="counts">')[1].split("</div></div>")[0]
    assert "runs" not in boxes and "compute" not in boxes and "first_started" not in boxes
    assert "<dt>wall time</dt>" in render_sweep_html([], HEADER)  # a single run's header: as before


def test_layer_curves_leave_out_one_level_groups_and_draw_posenet(summary):
    """PosENet has one level (the image): not a figure of its own, but its SPC is drawn on the others' panels."""
    resnet = [r for r in summary if r["group"] == GROUPS[0] and r["test_set"] != "black"]
    posenet = [
        dict(r, group="posenet", backbone="posenet", stand_in=False)
        for r in summary
        if r["group"] == GROUPS[1] and (r["layers"] == "all" or r["metric"] == "pvf" and r["layers"] == "layer1")
    ]
    page = sweep_html._layer_curves(resnet + posenet)
    assert page.count("<img") == 1 and 'alt="layer curve: posenet"' not in page
    assert "one level only (see the table): posenet" in page and "PosENet (pixels)" in page
    assert "Open markers: flat map or unfinished readout" in page
    assert "PosENet" not in sweep_html._layer_curves(resnet)


def test_failures_are_listed(page_html, summary):
    section = page_html.split('<section id="failures">')[1].split("</section>")[0]
    assert "pem k3 · G · layer4 · black" in section and "&lt;tensor&gt;" in section
    assert section.count("<tr>") == 2  # the header and the one failure, not repeated from the summary row
    ok = [r for r in summary if r["status"] == "ok" and r["layers"] == "all"]  # no figures: quick
    assert 'id="failures"' not in render_sweep_html(ok, HEADER)


def test_results_table_holds_every_row_with_raw_numbers(page_html, summary):
    body = page_html.split('<table id="results">')[1].split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr>") == len(summary)
    first = summary[0]
    assert f'data-sort="{first["value"]!r}"' in body
    assert f"{first['value']:.3f} [{first['lo']:.3f}, {first['hi']:.3f}]" in body


def test_missing_header_keys_and_an_empty_sweep():
    page = render_sweep_html([], {})
    assert "<h1>posprobe sweep</h1>" in page and 'id="results"' in page and "<img" not in page


def test_write_is_atomic(tmp_path, summary, monkeypatch):
    out = tmp_path / "sweep.html"
    together = [r for r in summary if r["layers"] == "all"]  # no figures: quick
    assert write_sweep_html(out, together, HEADER) == out
    write_sweep_html(out, together[:3], HEADER)  # replaces
    assert os.listdir(tmp_path) == ["sweep.html"]
    before = out.read_text(encoding="utf-8")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_sweep_html(out, together, HEADER)
    assert os.listdir(tmp_path) == ["sweep.html"] and out.read_text(encoding="utf-8") == before


@pytest.fixture
def browser_page():
    """(page, problems) in Debian's headless Chromium; problems collects console errors, page errors and any
    request for something that is not the file itself or a data: URI. Skips when no browser is installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser: playwright is not importable; install chromium (apt) and playwright (pip)")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(executable, os.X_OK):
        pytest.skip("no browser: no chromium executable; install chromium (apt) and playwright (pip)")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on(
            "request",
            lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(f"request: {r.url}"),
        )
        try:
            yield page, problems
        finally:
            browser.close()


def _column(page, col: str) -> list[str]:
    """The data-sort values of column ``col`` in the table's current row order."""
    return page.evaluate(
        """col => {
            const i = Array.from(document.querySelectorAll("#results thead th")).findIndex(h => h.dataset.col === col);
            const cells = Array.from(document.querySelectorAll("#results tbody tr")).map(tr => tr.cells[i]);
            return cells.map(td => td.dataset.sort ?? td.textContent);
        }""",
        col,
    )


def _numbers_then_blanks(values: list[str]) -> list[float]:
    """The numbers of a sorted column, checking that the blanks (NaN, no value) all come last."""
    numbers = [float(v) for v in values if v != ""]
    assert values[len(numbers) :] == [""] * (len(values) - len(numbers))
    return numbers


def test_in_a_browser(browser_page, report, summary, tmp_path):
    page, problems = browser_page
    page.goto(report.as_uri(), wait_until="load")

    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == len(GROUPS) + len(LOSS_CURVES) and all(w > 0 for w in widths)

    value = page.locator('#results th[data-col="value"]')
    value.click()
    ascending = _numbers_then_blanks(_column(page, "value"))
    assert ascending == sorted(ascending) and len(ascending) == len(summary) - 1  # the failed cell has no value
    assert "▲" in value.inner_text()
    value.click()
    descending = _numbers_then_blanks(_column(page, "value"))
    assert descending == sorted(ascending, reverse=True) and "▼" in value.inner_text()

    page.locator('#results th[data-col="group"]').click()  # stable: each group's rows stay by value, descending
    groups, values = _column(page, "group"), _column(page, "value")
    assert groups == sorted(groups, key=str.lower)
    for g in set(groups):
        mine = [v for h, v in zip(groups, values) if h == g]
        assert _numbers_then_blanks(mine) == sorted(_numbers_then_blanks(mine), reverse=True)

    page.fill("#filter", "VGG16")
    hidden = page.eval_on_selector_all("#results tbody tr", "rows => rows.map(r => r.hidden)")
    shown = [g for g, h in zip(_column(page, "group"), hidden) if not h]
    assert shown and all("vgg16" in g for g in shown)
    assert len(shown) == sum("vgg16" in r["group"] for r in summary)
    assert f"{len(shown)} of {len(summary)} rows" in page.inner_text("#shown")
    page.fill("#filter", "  RESNET18   layer3 ")  # every word, in any case, in any cell
    hidden = page.eval_on_selector_all("#results tbody tr", "rows => rows.map(r => r.hidden)")
    expected = [r["group"] for r in summary if "resnet18" in r["group"] and r["layers"] == "layer3"]
    assert [g for g, h in zip(_column(page, "group"), hidden) if not h] == expected and expected
    page.fill("#filter", "resnet18 layer3 vgg16")
    assert f"0 of {len(summary)} rows" in page.inner_text("#shown")
    page.fill("#filter", "")
    assert not any(page.eval_on_selector_all("#results tbody tr", "rows => rows.map(r => r.hidden)"))

    page.click("details summary")  # show the spec for the screenshot
    page.screenshot(path=str(tmp_path / "sweep_report.png"), full_page=True)
    if os.environ.get("POSPROBE_SCREENSHOT_DIR"):
        folder = Path(os.environ["POSPROBE_SCREENSHOT_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "sweep_report.png", folder / "sweep_report.png")
    assert not problems
