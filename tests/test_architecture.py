"""The shape of the package, as docs/DESIGN and issue 26 ask for it: imports point downwards (no import
circle of more than two modules, at most three of two), no room too large, no generic code branching on a
source kind's name, and an engine that runs without Dagster. Read from the source with `ast`, in a second."""

from __future__ import annotations

import ast
from pathlib import Path

from .import_graph import PACKAGE, cycles, import_graph, modules

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 700
MAX_TWO_MODULE_CYCLES = 3
KINDS_HOME = ROOT / PACKAGE / "engine" / "sources"


def _kind_names() -> set[str]:
    return {path.name for path in KINDS_HOME.iterdir() if (path / "__init__.py").is_file()}


def _mentions_kind(node: ast.expr) -> bool:
    """`kind`, `x.kind`, `x["kind"]`, `x.get("kind")`: an expression that reads a kind."""
    if isinstance(node, ast.Name):
        return node.id == "kind" or node.id.endswith("_kind")
    if isinstance(node, ast.Attribute):
        return node.attr == "kind" or node.attr.endswith("_kind")
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "kind"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return any(isinstance(a, ast.Constant) and a.value == "kind" for a in node.args[:1])
    return False


def _kind_names_compared(expression: ast.expr, names: set[str]) -> list[str]:
    """The kind names a comparison tests a kind against: `kind == "redis"`, `kind != "redis"`,
    `kind in ("postgres", "postgres_cluster")`."""
    if not isinstance(expression, ast.Compare):
        return []
    sides = [expression.left, *expression.comparators]
    if not any(_mentions_kind(side) for side in sides):
        return []
    found = []
    for side in sides:
        values = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
        found += [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
    return found


def test_no_import_cycle_of_more_than_two_modules() -> None:
    found = cycles(import_graph(ROOT))
    large = [c for c in found if len(c) > 2]
    assert not large, "import circles of more than two modules (imports must point downwards):\n" + "\n".join(
        f"  {len(c)}: {c}" for c in large)


def test_at_most_three_imports_run_back_up() -> None:
    pairs = [c for c in cycles(import_graph(ROOT)) if len(c) == 2]
    assert len(pairs) <= MAX_TWO_MODULE_CYCLES, (
        f"{len(pairs)} pairs of modules import each other (at most {MAX_TWO_MODULE_CYCLES}):\n"
        + "\n".join(f"  {c}" for c in pairs))


def test_no_module_over_700_lines() -> None:
    # Satisfied once the room-splitting work of issue 26 merges (report.py, sources/postgres/restore.py,
    # postgresql/server.py, cli/commands.py, sources/postgres/dump.py): fails on a branch without it.
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules(ROOT).items()}
    large = sorted((n, lines) for n, lines in sizes.items() if lines > MAX_LINES)
    assert not large, f"modules over {MAX_LINES} lines (split them by job): {large}"


def test_no_branch_on_a_kinds_name_outside_the_kinds() -> None:
    # Satisfied once "every kind owns itself" of issue 26 merges (the generic verbs ask the Source for its
    # capabilities instead of testing `kind == "postgres_cluster"`): fails on a branch without it.
    names = _kind_names()
    assert {"postgres", "postgres_cluster", "redis"} <= names
    found = []
    for path in modules(ROOT).values():
        if path.is_relative_to(KINDS_HOME):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            for kind in _kind_names_compared(node, names) if isinstance(node, ast.expr) else []:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: tests for kind '{kind}'")
    assert not found, "generic code branches on a kind's name (ask the kind's Source instead):\n" + "\n".join(found)


def test_the_engine_never_imports_dagster() -> None:
    found = []
    for name, path in modules(ROOT).items():
        if not name.startswith(f"{PACKAGE}.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in imported
                      if m == "dagster" or m.startswith(("dagster.", "dagster_"))]
    assert not found, "the engine imports Dagster:\n" + "\n".join(found)


def test_the_analysis_sees_what_it_should() -> None:
    """The checks above are only as good as the graph: it has the package's modules and their imports, and
    it finds a circle where there is one."""
    graph = import_graph(ROOT)
    assert f"{PACKAGE}.engine.policy" in graph[f"{PACKAGE}.engine.backup"]
    assert f"{PACKAGE}.engine.settings" in graph[f"{PACKAGE}.engine.policy"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse('kind == "redis"; m.kind != "postgres"; t.get("kind") in ("files", "x"); k == "redis"')
    compared = [k for node in ast.walk(tree) if isinstance(node, ast.expr)
                for k in _kind_names_compared(node, {"redis", "postgres", "files"})]
    assert compared == ["redis", "postgres", "files"]
