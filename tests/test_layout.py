"""The package's shape: imports follow the flow (no cycle, no import from a stage to a later one)."""

from __future__ import annotations

import ast
from pathlib import Path

import posprobe

ROOT = Path(posprobe.__file__).parent
# stages in the order of the flow; a module may import its own stage or an earlier one
STAGE = {
    "errors": 0,
    "data": 0,
    "targets": 0,
    "metrics": 0,
    "intervals": 0,
    "output": 1,
    "backbones": 1,
    "features": 2,
    "readouts": 3,
    "measures": 3,
    "studies": 4,
    "cli": 5,
}


def imports() -> dict[str, set[str]]:
    """module -> the posprobe modules it imports (relative imports, inside functions too)."""
    graph = {}
    for f in ROOT.rglob("*.py"):
        module = ".".join(("posprobe", *f.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        package = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                deps.add(".".join([*base, node.module]))
        graph[module] = deps
    known = set(graph)
    for module, deps in graph.items():  # 'posprobe.readouts' (a package) or a module: the longest known prefix
        graph[module] = {_known_prefix(d, known) for d in deps} - {module}
    return graph


def _known_prefix(name: str, known: set[str]) -> str:
    parts = name.split(".")
    return next(".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known)


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGE[parts[1]] if len(parts) > 1 else len(STAGE)


def test_no_module_imports_a_later_stage():
    upward = [(m, d) for m, deps in imports().items() for d in deps if d != "posprobe" and stage(d) > stage(m)]
    assert upward == []


def test_no_import_cycle():
    graph = imports()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for d in graph.get(node, ()):
            if d == "posprobe":
                continue
            if d in path:
                cycles.append(path[path.index(d) :])
            elif len(path) < 40:
                visit(d, [*path, d])

    for m in graph:
        if m != "posprobe":
            visit(m, [m])
    assert cycles == []
