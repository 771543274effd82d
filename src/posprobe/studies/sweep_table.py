"""A sweep's results as tables: one tidy row per (cell, test set) with its interval over images
(``results.csv`` / ``results.parquet``), and one row per cell over its seeds with the two-way interval over
images and seeds, seed spread, training flags and selectivity (``summary.csv``, the HTML report's table).

Only the cells of the current spec are read: a folder that an earlier spec also filled keeps those files, and
they stay out of the tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..intervals import SEED_SPREAD_LIMIT, bootstrap, paired_statistic
from ..output.rundir import replace_atomically, write_csv
from .controls import selectivity
from .sweep_spec import ALL

FINISHED = ("converged", "flat map", "exact")  # a linear probe is solved, not trained
nan = math.nan


def _cell_columns(result: dict) -> dict:
    """The columns that say which cell a row belongs to."""
    i, b = result["identity"], result.get("backbone", {})
    return {
        "cell_id": result["id"],
        "group": result["group"],
        "backbone": i["name"],
        "weights": b.get("weights", i["weights"] or "default"),
        "weights_seed": i["weights_seed"],
        "stand_in": bool(b.get("stand_in", False)),
        "padding": i["padding"] or "model",
        "pos_embed": i["pos_embed"],
        "train_set": i["train"],
        "layers": i["levels"],
        "level_index": result.get("level_index"),
        "depth": result.get("depth"),
        "kind": i["kind"],
        "readout": i["method"],
        "pattern": i["pattern"],
        "seed": i["seed"] if i["kind"] != "measure" else None,
    }


def results_rows(results: Sequence[dict], test_sets: Sequence[str]) -> list[dict]:
    """results.csv: one row per (cell, test set); a failed cell has a row per test set with its error."""
    rows = []
    for r in results:
        training = r.get("training", {})
        common = {
            "status": r["status"],
            "convergence": training.get("convergence", ""),
            "updates": training.get("updates"),
            "seconds_encode": r["seconds"].get("encode"),
            "seconds_cell": r["seconds"].get("train"),
            "host": r["worker"]["host"],
            "error": r["error"],
        }
        if r["status"] != "ok":
            sets = ["train"] if r["identity"]["kind"] == "measure" else test_sets
            for t in sets:
                rows.append(
                    {
                        **_cell_columns(r),
                        "test_set": t,
                        "metric": "",
                        "value": nan,
                        "lo": nan,
                        "hi": nan,
                        "mae": nan,
                        "mae_lo": nan,
                        "mae_hi": nan,
                        "n": None,
                        **common,
                    }
                )
            continue
        for row in r["rows"]:
            rows.append(
                {
                    **_cell_columns(r),
                    "test_set": row["test_set"],
                    "metric": row["metric"],
                    "value": row["value"],
                    "lo": row["lo"],
                    "hi": row["hi"],
                    "mae": row.get("mae", nan),
                    "mae_lo": row.get("mae_lo", nan),
                    "mae_hi": row.get("mae_hi", nan),
                    "n": row["n"],
                    **common,
                }
            )
    return rows


def _flags(statuses: Sequence[str], seed_sd: float | None, all_constant: bool = False) -> str:
    """◌ a seed drew a flat map (or, for any readout, a constant map on every image: SPC 0 by definition),
    ⚠ a seed did not finish training, ± finished seeds disagree (as the reports)."""
    flat = "flat map" in statuses or all_constant
    flags = ("◌" if flat else "") + ("⚠" if any(s not in FINISHED for s in statuses) else "")
    if not flags and seed_sd is not None and seed_sd > SEED_SPREAD_LIMIT:
        flags = "±"
    return flags


def _cell_key(result: dict) -> str:
    """What makes a result one of a cell's seeds: its identity without the seed (the display columns are not a
    key: a seed that failed before its backbone was built has no weights label or level place)."""
    return json.dumps({k: v for k, v in result["identity"].items() if k != "seed"}, sort_keys=True, default=str)


def summary_rows(results: Sequence[dict], test_sets: Sequence[str]) -> list[dict]:
    """summary.csv: one row per (cell over its seeds, test set): the mean and its 95% two-way bootstrap interval
    over images and seeds (intervals.bootstrap), the seeds' spread, flags, and the selectivity against PosENet
    with the same readout where the sweep has it."""
    by_cell: dict[str, list[dict]] = {}
    for r in results:
        by_cell.setdefault(_cell_key(r), []).append(r)
    out, spc = [], []  # spc[i]: row i's per-seed, per-image SPC (to pair it with PosENet's)
    for rs in by_cell.values():
        ok = [r for r in rs if r["status"] == "ok"]
        first = {k: v for k, v in _cell_columns((ok or rs)[0]).items() if k not in ("cell_id", "seed")}
        errors = list(dict.fromkeys(r["error"] for r in rs if r["status"] != "ok"))
        sets = (
            [row["test_set"] for row in ok[0]["rows"]]
            if ok
            else (["train"] if first["kind"] == "measure" else list(test_sets))
        )
        for t in sets:
            out.append(
                {
                    **first,
                    **_over_seeds(ok, t),
                    "seeds": len(ok),
                    "failed_seeds": len(rs) - len(ok),
                    "status": "ok" if ok else "failed",
                    "error": "; ".join(errors),
                }
            )
            spc.append(_per_seed_image(ok, t))
    _add_selectivity(out, spc)
    return out


def _per_seed_image(ok: Sequence[dict], test_set: str) -> dict[int, dict[str, float]]:
    """seed -> image id -> SPC of a cell's successful seeds on ``test_set`` ({} for a measure)."""
    scored = {r["identity"]["seed"]: r.get("per_image", {}).get(test_set) for r in ok}
    return {seed: dict(zip(s["ids"], s["spc"])) for seed, s in scored.items() if s and "ids" in s}


def _paired_grids(a: dict, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, N) grids of two cells over the seeds and images both scored, in one order."""
    seeds = [s for s in a if s in b]
    ids = [i for i in a[seeds[0]] if all(i in a[s] and i in b[s] for s in seeds)] if seeds else []
    grid = lambda d: torch.tensor([[d[s][i] for i in ids] for s in seeds], dtype=torch.float64)  # noqa: E731
    return grid(a).reshape(len(seeds), len(ids)), grid(b).reshape(len(seeds), len(ids))


def _grid(ok: Sequence[dict], test_set: str, metric: str) -> torch.Tensor:
    """(S, N) per-image values of the seeds in ``ok`` on the images every seed scored (the same images, unless
    the folder changed between runs or an image could not be read on one node), in the first seed's order."""
    scored = [r["per_image"][test_set] for r in ok]
    if all("ids" in s for s in scored):
        shared = set.intersection(*(set(s["ids"]) for s in scored))
        ids = [i for i in scored[0]["ids"] if i in shared]
        values = [dict(zip(s["ids"], s[metric])) for s in scored]
        return torch.tensor([[v[i] for i in ids] for v in values], dtype=torch.float64).reshape(len(ok), len(ids))
    return torch.tensor([s[metric] for s in scored], dtype=torch.float64)


def _over_seeds(ok: Sequence[dict], test_set: str) -> dict:
    """Mean, interval and spread of one test set's scores over the cell's successful seeds."""
    empty = {
        "test_set": test_set,
        "metric": "",
        "value": nan,
        "lo": nan,
        "hi": nan,
        "seed_sd": None,
        "mae": nan,
        "mae_lo": nan,
        "mae_hi": nan,
        "n": None,
        "n_constant": None,
        "flags": "",
        "convergence": "",
    }
    if not ok:
        return empty
    rows = [next(row for row in r["rows"] if row["test_set"] == test_set) for r in ok]
    statuses = [r.get("training", {}).get("convergence", "") for r in ok]
    if rows[0]["metric"] != "spc":  # a measure: one value, its own interval
        return {
            **empty,
            "metric": rows[0]["metric"],
            "value": rows[0]["value"],
            "lo": rows[0]["lo"],
            "hi": rows[0]["hi"],
            "n": rows[0]["n"],
        }
    spc, err = _grid(ok, test_set, "spc"), _grid(ok, test_set, "mae")  # (S, N)
    sd = float(spc.mean(dim=1).std(correction=0)) if len(ok) > 1 else None
    s, m = bootstrap(spc), bootstrap(err)
    return {
        "test_set": test_set,
        "metric": "spc",
        "value": s.mean,
        "lo": s.lo,
        "hi": s.hi,
        "seed_sd": sd,
        "mae": m.mean,
        "mae_lo": m.lo,
        "mae_hi": m.hi,
        "n": spc.shape[1],
        "n_constant": max(row.get("n_constant", 0) for row in rows),  # images drawn as a constant map (SPC 0)
        "flags": _flags(statuses, sd, any(row.get("n_constant", 0) == row.get("n", 0) > 0 for row in rows)),
        "convergence": "; ".join(sorted(set(statuses))),
    }


def _add_selectivity(rows: list[dict], spc: Sequence[dict]) -> None:
    """selectivity = SPC - max(0, PosENet's SPC with the same readout, pattern, training and test set): what the
    features add over the raw pixels' own position cues (``controls.selectivity``), with its paired two-way
    interval over the seeds and images both scored; None without a PosENet group."""
    pixels = {
        (r["train_set"], r["readout"], r["pattern"], r["test_set"]): k
        for k, r in enumerate(rows)
        if r["backbone"] == "posenet" and r["layers"] == ALL and r["metric"] == "spc" and spc[k]
    }
    for r, mine in zip(rows, spc):
        k = pixels.get((r["train_set"], r["readout"], r["pattern"], r["test_set"]))
        grids = _paired_grids(mine, spc[k]) if k is not None and r["backbone"] != "posenet" and mine else None
        if grids is None or grids[0].numel() == 0:
            r.update(selectivity=None, selectivity_lo=None, selectivity_hi=None)
            continue
        iv = paired_statistic(list(grids), selectivity)
        r.update(selectivity=iv.mean, selectivity_lo=iv.lo, selectivity_hi=iv.hi)


def write_tables(out: Path, rows: list[dict], summary: list[dict]) -> list[str]:
    """results.csv (+ results.parquet where pyarrow is installed) and summary.csv; notes on what was not written."""
    replace_atomically(out / "results.csv", lambda p: write_csv(p, rows))
    replace_atomically(out / "summary.csv", lambda p: write_csv(p, summary))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return ["results.parquet not written: pyarrow is not installed (pip install 'posprobe[sweep]')"]
    replace_atomically(out / "results.parquet", lambda p: pq.write_table(pa.Table.from_pylist(rows), p))
    return []
