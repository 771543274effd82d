"""The reproduce report: our numbers beside the paper's, a header that says exactly what ran, and the
paper's qualitative findings checked plainly on our numbers."""

from __future__ import annotations

from collections.abc import Sequence

from ..intervals import SEED_SPREAD_LIMIT, TEST, Interval, step_direction, verdict
from ..readouts.convergence import RULE
from .controls import GUIDE as CONTROL_GUIDE
from .controls import flag_marks
from .paper import paper_cell
from .study import Direction, StudyPreset, StudyResult, aggregate, distinct_trainings

NOT_PRINTED = "n/p"


def result_rows(result: StudyResult, presets: Sequence[StudyPreset]) -> list[dict]:
    """Aggregated rows (means and intervals over images and seeds) with the paper's values and our difference."""
    tables = {p.name: p.paper_table for p in presets}
    rows = []
    for r in aggregate(result):
        if r["study"] not in tables:  # a control's hidden preset: its numbers are in selectivity.csv
            continue
        paper = paper_cell(tables[r["study"]], r["row"], r["pattern"], r["test_set"])
        rows.append(
            {
                **r,
                "paper_spc": paper["spc"] if paper else None,
                "paper_mae": paper["mae"] if paper else None,
                "diff_spc": r["spc"] - paper["spc"] if paper else None,
                "diff_mae": r["mae"] - paper["mae"] if paper else None,
            }
        )
    return rows


def _signed(value: float | None) -> str:
    return NOT_PRINTED if value is None else f"{value:+.3f}"


def _ours(r: dict) -> str:
    """'SPC [lo, hi] / MAE', marked ⚠ when a seed's readout did not finish training, ◌ when one drew a flat map,
    ± when the seeds' SPCs disagree by more than SEED_SPREAD_LIMIT."""
    spc = Interval(r["spc"], r["spc_lo"], r["spc_hi"])
    flag = " ⚠" if r["unfinished_seeds"] else " ◌" if r["flat_seeds"] else ""
    flag += " ±" if r["seed_unstable"] else ""
    return f"{spc} / {r['mae']:.3f}{flag}"


def _paper(spc: float | None, err: float | None) -> str:
    return NOT_PRINTED if spc is None else f"{spc:.3f}/{err:.3f}"


def table_markdown(rows: list[dict], preset: StudyPreset, result: StudyResult) -> str:
    """The paper's layout: a row per (pattern, model), per test set our SPC [95% interval] / MAE, the paper's
    SPC/MAE, and ΔSPC."""
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
                cells += [_ours(r), _paper(r["paper_spc"], r["paper_mae"]), _signed(r["diff_spc"])]
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


def check_direction(direction: Direction, result: StudyResult, rows: list[dict], study: str) -> tuple[str, str]:
    """(verdict, the steps in words): the paired test of ``intervals.TEST`` on every step of the chain, for
    every pattern; 'not checked' when none of its cells ran."""
    steps, parts, stand_ins = [], [], set()
    for pattern in direction.patterns:
        keys = [(study, row, pattern, direction.test_set) for row in direction.chain]
        if any(k not in result.per_image for k in keys):
            continue
        grids = [result.per_image[k]["spc"] for k in keys]  # (S, N) each, same seeds and images
        words = [f"{direction.chain[0].rsplit('/', 1)[-1]} {float(grids[0].double().mean()):.3f}"]
        trained = [result.convergence.get((study, row, pattern), []) for row in direction.chain]
        for key, before, after, cells in zip(direction.chain[1:], grids, grids[1:], zip(trained, trained[1:])):
            step, diff = step_direction(before, after)
            if not all(c.finished for cs in cells for c in cs):
                step = "unconverged"
            steps.append(step)
            flat = sum(c.flat for c in cells[1])
            words.append(
                f"{key.rsplit('/', 1)[-1]} {float(after.double().mean()):.3f}"
                + (f" ◌ flat map in {flat}/{len(cells[1])} seeds" if flat else "")
                + f" ({step}: Δ {diff.mean:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}])"
            )
        parts.append(f"{pattern}: " + " → ".join(words))
        ran = [r for r in rows if r["study"] == study and r["row"] in direction.chain and r["pattern"] == pattern]
        stand_ins.update(f"{r['row']} ran as {r['backbone']}" for r in ran if r["substituted"])
    if not parts:
        return "not checked", "none of its cells ran"
    compared = f"; compared as run, stand-ins included: {', '.join(sorted(stand_ins))}" if stand_ins else ""
    return verdict(steps), "; ".join(parts) + compared


def training_section(result: StudyResult, rows: list[dict], loss_figure: str | None) -> list[str]:
    """What training ran (updates, distinct images), which readouts did not finish or draw a flat map, and the rule."""
    lines = ["", "## Training", ""]
    for key, sched in result.schedules.items():
        lines.append(f"- `{key}`: {sched.describe()}")
    unfinished, flat = {}, {}
    # every trained row by name, the controls' hidden rows too (a control may train a readout no table holds)
    labels = {(r["study"], r["row"]): f"{r['label']} ({r['backbone']})" for r in result.records}
    for places, pattern, verdicts in distinct_trainings(result):
        key = " = ".join(dict.fromkeys(labels[p] for p in places)) + f" · {pattern}"
        bad = [f"seed {i}: {c.describe()}" for i, c in enumerate(verdicts) if not c.finished]
        if bad:
            unfinished[key] = "; ".join(bad)
        seeds = [str(i) for i, c in enumerate(verdicts) if c.flat]
        if seeds:
            flat[key] = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} of {len(verdicts)}"
    total = sum(len(v) for _, _, v in distinct_trainings(result))
    lines += ["", f"Convergence rule: {RULE}.", ""]
    if unfinished:
        lines += [
            f"**{len(unfinished)} readout(s) did not finish training in every seed** (⚠ in the tables; their "
            "scores understate what the features hold, and no verdict step rests on them):",
            "",
            *[f"- {k}: {v}" for k, v in sorted(unfinished.items())],
            "",
        ]
    else:
        lines += [f"Every readout finished training ({total} readout trainings, all seeds).", ""]
    if flat:
        lines += [
            f"{len(flat)} readout(s) draw a flat map (◌ in the tables) in some seeds: their features carry "
            "(almost) no position they can read, which is what a control should show, or their training "
            "collapsed early (a loss "
            "that falls to the dashed line within a few updates and stays there):",
            "",
            *[f"- {k}: {v}" for k, v in sorted(flat.items())],
        ]
    unstable = sorted(
        {
            f"{r['label']} ({r['backbone']}) · {r['pattern']}: seed sd {r['spc_seed_std']:.3f}"
            for r in rows
            if r["seed_unstable"]
        }
    )
    if unstable:
        lines += [
            "",
            f"{len(unstable)} readout(s) finished training but their seeds disagree by more than "
            f"{SEED_SPREAD_LIMIT} SPC (std across seeds; ± in the tables): a longer schedule (the official "
            "profile) settles them; until then read their cells through the interval, which includes the "
            "seed spread:",
            "",
            *[f"- {u}" for u in unstable],
        ]
    if loss_figure:
        lines += ["", f"![training loss curves]({loss_figure})"]
    return lines


def what_ran_section(result: StudyResult, header: dict) -> list[str]:
    """Each network as asked for and as run (stand-ins said so), the header's facts and each image set."""
    lines = ["| Asked for | Ran as | Weights | Substituted | Encoder input |", "|---|---|---|---|---|"]
    for paper_name, ran in result.backbones.items():  # 'vgg16' or 'vgg16:random'
        lines.append(
            f"| {paper_name} | `{ran['ran_as']}` | {ran['weights']} | "
            f"{'**yes: a stand-in, not the paper’s network**' if ran['substituted'] else 'no'} | "
            f"{ran.get('input', '')} |"
        )
    lines.append("")
    lines += [f"- {key}: {value}" for key, value in header.items()]
    for name, d in result.data.items():
        skipped = f", {len(d['skipped'])} unreadable skipped" if d["skipped"] else ""
        lines.append(f"- Image set `{name}`: {d['description']} ({d['n']} images used{skipped})")
    if any(r["substituted"] or "random" in str(r["weights"]) for r in result.backbones.values()):
        lines += [
            "",
            "**Numbers from a substituted or random-weight backbone are not the paper's network; "
            "compare directions, not values.**",
        ]
    return lines


def render(
    result: StudyResult,
    presets: Sequence[StudyPreset],
    header: dict,
    figures: dict[str, list[str]],
    loss_figure: str | None = None,
    selectivity: list[dict] | None = None,
) -> str:
    rows = result_rows(result, presets)
    names = ", ".join(p.name for p in presets)
    seeds = max((r["seeds"] for r in rows), default=1)
    spread = f"over test images and {seeds} seeds" if seeds > 1 else "over test images (one seed)"
    lines = [
        f"# posprobe reproduce: {names}",
        "",
        f"Cells are SPC [95% interval] / MAE: means over test images and seeds, the interval a two-way bootstrap "
        f"{spread}; ours beside the values printed in Islam, Jia & Bruce, ICLR 2020; ΔSPC = ours − paper; "
        "`n/p`: the paper prints no value for this cell; ⚠: a seed's readout did not finish training, ◌: one drew a "
        f"flat map, ±: the seeds' SPCs differ by more than {SEED_SPREAD_LIMIT} (see Training). "
        "SPC is the Spearman correlation between predicted and target map (1 = perfect, 0 = no position "
        "information); a constant prediction scores 0. MAE is the mean absolute difference (0 = perfect). "
        "A single synthetic image with one seed has no interval. Per-image spreads, MAE intervals, counts of "
        "constant maps and every seed's numbers are in results.csv / results.json.",
        "",
        READING_GUIDE,
        "",
        f"**How a verdict is decided.** For every paper direction: {TEST}.",
        "",
        "## What ran",
        "",
    ]
    lines += what_ran_section(result, header)
    lines += training_section(result, rows, loss_figure)
    for preset in presets:
        lines += ["", f"## {preset.title}", ""]
        if preset.notes:
            lines += [preset.notes, ""]
        if preset.figure is None:
            lines.append(table_markdown(rows, preset, result))
        for path in figures.get(preset.name, []):
            lines.append(f"![{preset.name}]({path})")
        for d in preset.directions:
            said, detail = check_direction(d, result, rows, preset.name)
            shown = said if said in ("reproduced", "not checked") else f"**{said}**"
            lines += ["", f"- Paper: {d.claim}. Here: {shown} ({detail})."]
    lines += controls_section(selectivity or [])
    return "\n".join(lines) + "\n"


def controls_section(rows: list[dict]) -> list[str]:
    """Every network row beside its pixel control (PosENet with the same readout) and its score on the rolled
    photos: how much of its SPC the controls cannot explain, and how much the photos' layout gave it."""
    if not rows:
        return []
    lines = [
        "",
        "## Controls: selectivity and content share",
        "",
        f"{CONTROL_GUIDE} Cells: mean [95% interval], paired over the same images and seeds.",
        "",
        "| Table | Pattern | Model | SPC | PosENet, same readout | selectivity | SPC, rolled photos | content share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cell = lambda r, k: str(Interval(r[k], r[f"{k}_lo"], r[f"{k}_hi"])) if k in r else "—"  # noqa: E731
    stand_in = lambda r: f" → `{r['ran_as']}` (stand-in)" if r["substituted"] else ""  # noqa: E731
    for r in rows:
        mark = {who: f" {m}" for who, m in flag_marks(r["training_flags"]).items()}
        lines.append(
            f"| {r['study']} | {r['pattern']} | {r['label']}{stand_in(r)} | {cell(r, 'spc')}{mark.get('network', '')} "
            f"| {cell(r, 'spc_pixels')}{mark.get('pixels', '')} | {cell(r, 'selectivity')} | "
            f"{cell(r, 'spc_rolled')} | {cell(r, 'content_share')} |"
        )
    return lines
