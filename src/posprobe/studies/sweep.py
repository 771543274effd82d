"""Running a sweep: each group (one backbone setting on one training set) encodes its image sets once and trains
all its cells; every finished cell is written at once, atomically, as ``cells/<id>.json``, so a re-run (after a
crash, a kill, or an edited spec) skips it. A cell that fails is written with its error and the others go on.

The executors only decide where ``sweep_group.run_group`` runs: here in this process (``run_local``), or as Ray tasks
(``sweep_ray.py``). Both hand finished cells to a ``CellStore``, which writes each cell once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import PosprobeError
from ..output.rundir import replace_atomically
from .sweep_group import group_line, run_group, todo
from .sweep_spec import Group, SweepSpec, cell_id, plan
from .sweep_store import CELLS, EVENTS, CellStore, SweepLock, now
from .sweep_table import results_rows, summary_rows, write_tables

EXECUTORS = ("local", "ray")
SWEEP_FILE = "sweep.json"  # the plan's cell ids in order, and a record of every run into the folder


def run_local(
    spec: SweepSpec,
    groups: Sequence[Group],
    store: CellStore,
    fail_fast: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> None:
    """Run the groups one after the other in this process."""
    for i, group in enumerate(groups, 1):
        started = time.perf_counter()
        store.event("group started", group=group.label, pid=os.getpid(), cells=len(group.cells))
        results = run_group(spec, group, store.put, progress, fail_fast)
        echo(group_line(i, len(groups), group, results, time.perf_counter() - started))


_ACTIVE: list[Path] = []  # the folder a sweep is writing into, for the CLI's line when it is interrupted


def active_sweep() -> Path | None:
    return _ACTIVE[-1] if _ACTIVE else None


def open_sweep_dir(out: Path) -> None:
    """Create ``out``, or accept an earlier sweep's folder (to resume it); refuse any other existing path."""
    if out.exists():
        if not out.is_dir():
            raise PosprobeError(f"--out {out} is a file; expected a new folder or an earlier sweep's folder")
        own = {".lock", CELLS, EVENTS}  # what a sweep writes before sweep.json: a run stopped at its start
        if not (out / SWEEP_FILE).is_file() and any(p.name not in own for p in out.iterdir()):
            raise PosprobeError(
                f"--out {out} exists and holds no sweep ({SWEEP_FILE}); choose a new folder, or an earlier "
                "sweep's folder to resume it"
            )
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _active(out: Path):
    """``out`` is the sweep being written while the block runs, and stays so after an interrupt: the CLI's line,
    printed once the interrupt has left every block, names the folder that keeps the finished cells."""
    _ACTIVE[:] = [out]
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        _ACTIVE.clear()
        raise
    _ACTIVE.clear()


def _record(out: Path) -> dict:
    try:
        return json.loads((out / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {"runs": []}


def _write_record(out: Path, record: dict) -> None:
    replace_atomically(out / SWEEP_FILE, lambda p: p.write_text(json.dumps(record, indent=1, allow_nan=True)))


def run_sweep(
    spec: SweepSpec,
    out: Path,
    executor: str = "local",
    ray_address: str | None = None,
    fail_fast: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run every cell of ``spec`` not yet finished in ``out``, then write the tables and report.html from every
    finished cell; the run's record (cells done before, run now, failed) is returned and kept in sweep.json."""
    if executor not in EXECUTORS:
        from ..errors import unknown_choice

        raise unknown_choice("executor", executor, EXECUTORS)
    out = Path(out).resolve()  # Ray's store actor runs in another working directory
    session = contextlib.nullcontext()
    if executor == "ray":  # joined before anything is written: an unreachable cluster leaves no folder
        from .sweep_ray import ray_session

        session = ray_session(ray_address)
    with session:
        return _run(spec, out, executor, ray_address, fail_fast, progress, echo)


def _run(
    spec: SweepSpec,
    out: Path,
    executor: str,
    ray_address: str | None,
    fail_fast: bool,
    progress: bool,
    echo: Callable[[str], None],
) -> dict:
    """``run_sweep`` once the executor is ready: the folder, its lock, the run, its record and tables."""
    open_sweep_dir(out)
    with SweepLock(out), _active(out):
        store, groups = CellStore(out), plan(spec)
        left = todo(spec, groups, store)
        total, to_run = sum(len(g.cells) for g in groups), sum(len(g.cells) for g in left)
        record = _record(out)
        record.update(
            name=spec.name,
            cells=[cell_id(spec, c) for g in groups for c in g.cells],
            test_sets=list(spec.data.test),
        )
        run = {
            "started": now(),
            "executor": executor,
            "address": ray_address if executor == "ray" else None,
            "cells": total,
            "done_before": total - to_run,
        }
        record["runs"].append(run)
        replace_atomically(out / "spec.toml", lambda p: p.write_text(spec.text, encoding="utf-8"))
        _write_record(out, record)
        echo(f"{spec.name}: {total} cells in {len(groups)} groups; {total - to_run} done before, {to_run} to run")
        started, stopped = time.perf_counter(), None
        try:
            if executor == "ray":
                from .sweep_ray import run_ray

                run_ray(spec, left, store, ray_address, fail_fast, echo)
            else:
                run_local(spec, left, store, fail_fast, progress, echo)
        except PosprobeError as err:  # --fail-fast: the tables still show what finished and what failed
            stopped = err
        finally:  # an interrupt keeps the cells written so far; the tables wait for the next run
            run.update(finished=now(), seconds=time.perf_counter() - started)
            _write_record(out, record)
        summary = write_report(out)
        run["failed"] = sum(r["status"] == "failed" for r in summary["results"])
        _write_record(out, record)
        if stopped is not None:
            raise stopped
        return {**run, "notes": summary["notes"], "missing": summary["missing"]}


def _described(data: dict) -> str:
    """An image set in words: its description, the images read where it does not say, and any skipped."""
    n, text = data["n"], data["description"]
    text += "" if f"{n} image" in text else f"; {n} image{'s' if n != 1 else ''} read"
    return text + (f"; {data['skipped']} unreadable, skipped" if data.get("skipped") else "")


def write_report(out: Path) -> dict:
    """results.csv/.parquet, summary.csv and report.html of the cells the folder's current plan names, from their
    files alone (``posprobe sweep-report`` runs just this)."""
    from ..output.rundir import environment
    from ..output.sweep_html import write_sweep_html

    record = _record(out)
    if "cells" not in record:
        raise PosprobeError(f"{out} holds no sweep ({SWEEP_FILE} is missing or unreadable)")
    store = CellStore(out)
    results = [r for cid in record["cells"] if (r := store.read(cid)) is not None]
    missing = len(record["cells"]) - len(results)
    rows, summary = results_rows(results, record["test_sets"]), summary_rows(results, record["test_sets"])
    notes = write_tables(out, rows, summary)
    if missing:
        notes.append(
            f"{missing} of {len(record['cells'])} cells have no result yet: run the sweep again to finish them"
        )
    run = record["runs"][-1] if record["runs"] else {}
    ok = [r for r in results if r["status"] == "ok"]
    training = next((r["training"]["schedule"] for r in ok if "schedule" in r.get("training", {})), "")
    data = next((r["data"] for r in ok if "data" in r), {})
    env = environment()
    header = {
        "title": f"posprobe sweep: {record['name']}",
        "spec_name": record["name"],
        "started": run.get("started", ""),
        "finished": run.get("finished", ""),
        "seconds": run.get("seconds", math.nan),
        "first_started": record["runs"][0].get("started", "") if record["runs"] else "",
        "runs": len(record["runs"]),
        "compute_seconds": sum(r.get("seconds", 0.0) for r in record["runs"]),
        "executor": run.get("executor", "") + (f" at {run['address']}" if run.get("address") else ""),
        "versions": {k: str(v) for k, v in env.items() if k not in ("platform", "device", "cpu_threads")},
        "machine": f"{env['platform']}, {os.cpu_count()} CPUs",
        "data": {name: _described(d) for name, d in data.items()},
        "training": training,
        "stand_ins": sorted({r["group"] for r in ok if r.get("backbone", {}).get("stand_in")}),
        "counts": {
            "cells": len(record["cells"]),
            "done": len(ok),
            "failed": len(results) - len(ok),
            "skipped": run.get("done_before", 0),
        },
        "notes": notes,
    }
    failures = [{"group": r["group"], "cell": r["cell"], "error": r["error"]} for r in results if r["status"] != "ok"]
    spec_text = (out / "spec.toml").read_text(encoding="utf-8") if (out / "spec.toml").is_file() else ""
    curves: dict[str, list] = {}
    for r in ok:
        if r.get("training", {}).get("loss_curve"):
            t = r["training"]
            curves.setdefault(r["group"], []).append((r["cell"], t["convergence"], t["loss_curve"]))
    write_sweep_html(out / "report.html", summary, header, spec_text, failures, curves)
    return {"results": results, "summary": summary, "notes": notes, "missing": missing}
