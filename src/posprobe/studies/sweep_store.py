"""A sweep folder's record of its cells: ``cells/<id>.json``, each written once and atomically by whichever
executor ran it, ``events.jsonl`` for audit, and a lock so that two sweeps never write into one folder."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from ..errors import PosprobeError
from ..output.rundir import replace_atomically

CELLS = "cells"
EVENTS = "events.jsonl"


def now() -> str:
    """The time in UTC, to the second, as ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CellStore:
    """The sweep folder's record of finished cells: ``cells/<id>.json`` (written atomically, each cell once) and
    ``events.jsonl`` (one line per group started and cell written, for audit: a retried task shows twice)."""

    def __init__(self, out: str | Path, create: bool = True):
        self.out = Path(out)
        if create:
            (self.out / CELLS).mkdir(parents=True, exist_ok=True)

    def path(self, cid: str) -> Path:
        return self.out / CELLS / f"{cid}.json"

    def read(self, cid: str) -> dict | None:
        """A cell's result, or None when absent or unreadable (a torn write cannot happen; a damaged disk can)."""
        try:
            return json.loads(self.path(cid).read_text())
        except (OSError, ValueError):
            return None

    def finished(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` with a result that succeeded (a failed cell is tried again)."""
        return {c for c in ids if (r := self.read(c)) is not None and r.get("status") == "ok"}

    def put(self, result: dict) -> bool:
        """Write one cell's result unless it already succeeded; whether it was written."""
        cid = result["id"]
        if cid in self.finished([cid]):
            self.event("duplicate", cell=cid)
            return False
        replace_atomically(self.path(cid), lambda p: p.write_text(json.dumps(result)))
        self.event("cell " + result["status"], cell=cid, group=result["group"])
        return True

    def event(self, what: str, **fields) -> None:
        """Append one line to events.jsonl (O_APPEND: lines of concurrent writers do not interleave)."""
        line = json.dumps({"time": now(), "event": what, **fields}) + "\n"
        fd = os.open(self.out / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class SweepLock:
    """An exclusive lock on a sweep folder for one run: a second sweep into the same folder is refused."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self) -> SweepLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise PosprobeError(
                f"another sweep is running into {self.path.parent}; wait for it or use another --out"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
