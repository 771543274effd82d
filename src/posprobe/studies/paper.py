"""The paper's printed numbers, shipped as data (resources/paper_values.json), and their lookup."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def paper_values() -> dict[tuple[str, str, str, str], dict]:
    """(table, row, pattern, test_set) -> {"spc", "mae"[, "note"]} for every cell the paper prints."""
    text = resources.files("posprobe").joinpath("resources/paper_values.json").read_text()
    return {(r["table"], r["row"], r["pattern"], r["test_set"]): r for r in json.loads(text)["records"]}


def paper_cell(table: str | None, row: str, pattern: str, test_set: str) -> dict | None:
    """The paper's value for one cell, or None where the paper prints none ("n/p")."""
    if table is None:
        return None
    return paper_values().get((table, row, pattern, test_set))
