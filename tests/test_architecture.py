"""The layout's rules, checked on the source: only tasks/runtime imports Ray, there is no import cycle
among the project's modules, the rooms import only what README's layout section allows, every flow's
main is at most 80 lines and no source file is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("tasks", "flows") for p in (ROOT / folder).rglob("*.py"))
# What each room of tasks/ may import besides itself and core (README, Layout).
ALLOWED = {
    "core": set(),
    "runtime": set(),
    "evaluation": set(),
    "directions": {"evaluation"},
    "sweep": {"directions", "evaluation"},
    "sft": {"runtime", "directions"},
}
FLOW_MAINS = {
    "abliterate": "abliterate",
    "sweep": "sweep",
    "finetune": "finetune",
    "replay": "replay",
    "compare": "compare",
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


GRAPH = {_module(p): _imports(p) for p in SOURCES}


def test_only_the_runtime_imports_ray():
    offenders = {
        m
        for m, imported in GRAPH.items()
        if not m.startswith("tasks.runtime") and any(i.split(".")[0] == "ray" for i in imported)
    }
    assert not offenders, f"modules outside tasks/runtime importing ray: {sorted(offenders)}"


def test_no_import_cycle():
    edges = {m: {i for i in imported if i in GRAPH and i != m} for m, imported in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_rooms_import_only_what_the_layout_allows():
    bad = []
    for module, imported in GRAPH.items():
        parts = module.split(".")
        if parts[0] != "tasks" or len(parts) < 3:
            continue
        room = parts[1]
        allowed = {room, "core", *ALLOWED.get(room, set())}
        for name in imported:
            bits = name.split(".")
            if bits[0] == "flows" or (
                bits[0] == "tasks" and len(bits) > 1 and bits[1] in ALLOWED and bits[1] not in allowed
            ):
                bad.append(f"{module} imports {name}")
    assert not bad, bad


def test_flow_mains_are_short_recipes():
    for flow, function in FLOW_MAINS.items():
        tree = ast.parse((ROOT / "flows" / f"{flow}.py").read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        length = node.end_lineno - node.lineno + 1
        assert length <= 80, f"flows/{flow}.py {function}() is {length} lines"


def test_no_source_file_is_over_400_lines():
    files = [*SOURCES, *(ROOT / "tests").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
