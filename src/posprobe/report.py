"""The reproduce report: our numbers beside the paper's, a header that says exactly what ran, and the
paper's qualitative findings checked plainly on our numbers."""
from __future__ import annotations

from collections.abc import Sequence

from .paper import paper_cell
from .study import Direction, StudyPreset, StudyResult, aggregate

NOT_PRINTED = "n/p"


def result_rows(result: StudyResult, presets: Sequence[StudyPreset]) -> list[dict]:
    """Aggregated rows (mean over seeds) with the paper's values and our difference from them."""
    tables = {p.name: p.paper_table for p in presets}
    rows = []
    for r in aggregate(result.records):
        paper = paper_cell(tables[r["study"]], r["row"], r["pattern"], r["test_set"])
        rows.append({
            **r, "paper_spc": paper["spc"] if paper else None, "paper_mae": paper["mae"] if paper else None,
            "diff_spc": r["spc"] - paper["spc"] if paper else None,
            "diff_mae": r["mae"] - paper["mae"] if paper else None,
        })  # fmt: skip
    return rows


def _fmt(value: float | None, seed_std: float = 0.0, seeds: int = 1) -> str:
    if value is None:
        return NOT_PRINTED
    return f"{value:.3f} ±{seed_std:.3f}" if seeds > 1 else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return NOT_PRINTED if value is None else f"{value:+.3f}"


def _cell(spc: float | None, err: float | None, spc_std: float = 0.0, seeds: int = 1) -> str:
    if spc is None:
        return NOT_PRINTED
    return f"{_fmt(spc, spc_std, seeds)}/{err:.3f}"


def table_markdown(rows: list[dict], preset: StudyPreset, result: StudyResult) -> str:
    """The paper's layout: a row per (pattern, model), per test set our SPC/MAE and the paper's, and ΔSPC."""
    index = {(r["row"], r["pattern"], r["test_set"]): r for r in rows if r["study"] == preset.name}
    head = ["Pattern", "Model"]
    for t in preset.test_sets:
        head += [f"{t} ours", f"{t} paper", "ΔSPC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pattern in preset.patterns:
        for v in preset.variants:
            ran = result.backbones[v.backbone_key]
            label = v.label + (f" → `{ran['ran_as']}` (stand-in)" if ran.get("substituted") else "")
            cells = [pattern, label]
            for t in preset.test_sets:
                r = index.get((v.key, pattern, t))
                if r is None:
                    cells += ["—", "—", "—"]
                    continue
                cells += [_cell(r["spc"], r["mae"], r["spc_seed_std"], r["seeds"]),
                          _cell(r["paper_spc"], r["paper_mae"]), _signed(r["diff_spc"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


READING_GUIDE = (
    "**How to read this.** A frozen network's features feed a small trained readout that must draw the same "
    "fixed map on every image: H (a left-to-right gradient), V (top to bottom), G (a centred Gaussian), HS and VS "
    "(horizontal and vertical stripes). Since the target never depends on the image, the readout succeeds only if "
    "the features say where each pixel is. PosENet is the control: the readout on the raw pixels, no network. "
    "The black, white and noise test images carry no content, so whatever position is read from them comes from "
    "the network itself (its zero padding). The paper's MAE for HS and VS is about .6-.7, and .704 for PosENet's "
    "constant map on black, where a constant in [0, 1] scores at most .5 against a stripe map in [0, 1]: its "
    "stripe maps were scaled differently when scored, so compare SPC there."
)


def check_direction(direction: Direction, rows: list[dict], study: str) -> tuple[bool | None, str]:
    """Does SPC rise along the chain for every pattern? (reproduced, the numbers in words); None: no cell ran.

    With several seeds, a step that is smaller than the seed spread of either end is named: the order of
    those two means is not settled by this run.
    """
    index = {(r["row"], r["pattern"], r["test_set"]): r for r in rows if r["study"] == study}
    ok, parts, stand_ins = True, [], set()
    for pattern in direction.patterns:
        cells = [index.get((key, pattern, direction.test_set)) for key in direction.chain]
        if any(c is None for c in cells):
            continue
        values = [c["spc"] for c in cells]
        rising = all(a < b for a, b in zip(values, values[1:]))
        ok &= rising
        spread = [c.get("spc_seed_std", 0.0) if c.get("seeds", 1) > 1 else 0.0 for c in cells]
        unsettled = [f"{a:.3f} vs {b:.3f}" for a, b, sa, sb in zip(values, values[1:], spread, spread[1:])
                     if abs(b - a) < max(sa, sb)]  # fmt: skip
        steps = " → ".join(f"{key.rsplit('/', 1)[-1]} {v:.3f}" for key, v in zip(direction.chain, values))
        parts.append(f"{pattern}: {steps}" + ("" if rising else " (not rising)")
                     + (f" (within the seed spread: {', '.join(unsettled)})" if unsettled else ""))
        stand_ins.update(f"{c['row']} ran as {c['backbone']}" for c in cells if c.get("substituted"))
    if not parts:
        return None, "none of its cells ran"
    compared = f"; compared as run, stand-ins included: {', '.join(sorted(stand_ins))}" if stand_ins else ""
    return ok, "; ".join(parts) + compared


def render(result: StudyResult, presets: Sequence[StudyPreset], header: dict, figures: dict[str, list[str]]) -> str:
    rows = result_rows(result, presets)
    names = ", ".join(p.name for p in presets)
    seeds = "(± on SPC: standard deviation across seeds)" if any(r["seeds"] > 1 for r in rows) else "(one seed)"
    lines = [f"# posprobe reproduce: {names}", "",
             f"Cells are SPC/MAE, means over test images {seeds}, ours beside the values printed in Islam, Jia & "
             "Bruce, ICLR 2020; ΔSPC = ours − paper; `n/p`: the paper prints no value for this cell. SPC is the "
             "Spearman correlation between predicted and target map (1 = perfect, 0 = no position information); "
             "a constant prediction scores 0. MAE is the mean absolute difference (0 = perfect). Per-image "
             "spreads, counts of constant maps and every seed's numbers are in results.csv / results.json.",
             "", READING_GUIDE, "", "## What ran", ""]  # fmt: skip
    lines.append("| Asked for | Ran as | Weights | Substituted |")
    lines.append("|---|---|---|---|")
    for paper_name, ran in result.backbones.items():  # 'vgg16' or 'vgg16:random'
        lines.append(f"| {paper_name} | `{ran['ran_as']}` | {ran['weights']} | "
                     f"{'**yes: a stand-in, not the paper’s network**' if ran['substituted'] else 'no'} |")  # fmt: skip
    lines.append("")
    for key, value in header.items():
        lines.append(f"- {key}: {value}")
    for name, d in result.data.items():
        skipped = f", {len(d['skipped'])} unreadable skipped" if d["skipped"] else ""
        lines.append(f"- Image set `{name}`: {d['description']} ({d['n']} images used{skipped})")
    if any(r["substituted"] for r in result.backbones.values()) or any(
        "random" in str(r["weights"]) for r in result.backbones.values()
    ):
        lines += ["", "**Numbers from a substituted or random-weight backbone are not the paper's network; "
                  "compare directions, not values.**"]  # fmt: skip
    for preset in presets:
        lines += ["", f"## {preset.title}", ""]
        if preset.notes:
            lines += [preset.notes, ""]
        if preset.figure is None:
            lines.append(table_markdown(rows, preset, result))
        for path in figures.get(preset.name, []):
            lines.append(f"![{preset.name}]({path})")
        for d in preset.directions:
            ok, detail = check_direction(d, rows, preset.name)
            verdict = {True: "reproduced", False: "**not reproduced**", None: "not checked"}[ok]
            lines += ["", f"- Paper: {d.claim}. Here: {verdict} ({detail})."]
    return "\n".join(lines) + "\n"
