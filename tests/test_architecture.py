"""The package's import graph: no cycle among flexbench modules, names in `schema` only.

Read with ast, so every `from flexbench import x` counts, at the top of a module or inside a
function (a late import dodges a cycle at import time, not in the design).
`python -m tests.test_architecture` prints the graph and its cycles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flexbench"
KNOWN_CYCLES: list[set[str]] = []  # none: keep it so
NO_HEAVY = ("schema", "record", "result", "report", "summary", "compare", "tracking", "query")


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))}


def imported(tree: ast.Module, names: set[str]) -> tuple[set[str], set[str]]:
    """The flexbench modules a module imports: (at its top level, only inside functions)."""
    top, late = set(), set()
    for node in ast.walk(tree):
        found: list[str] = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flexbench"):
            parts = node.module.split(".")
            found = [a.name for a in node.names] if len(parts) == 1 else [parts[1]]
        elif isinstance(node, ast.Import):
            found = [a.name.split(".")[1] for a in node.names if a.name.startswith("flexbench.")]
        if found:
            (top if node.col_offset == 0 else late).update(n for n in found if n in names)
    return top, late - top


def graph() -> dict[str, tuple[set[str], set[str]]]:
    trees = modules()
    out = {}
    for name, tree in trees.items():
        top, late = imported(tree, set(trees))
        out[name] = (top - {name}, late - {name})
    return out


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def describe() -> str:
    """The graph, one line per importing module, and its cycles."""
    lines = []
    for name, (top, late) in sorted(graph().items()):
        if top or late:
            extra = f"   [late: {', '.join(sorted(late))}]" if late else ""
            lines.append(f"{name:13} -> {', '.join(sorted(top))}{extra}")
    found = cycles({k: t | lt for k, (t, lt) in graph().items()})
    lines.append(f"cycles: {[sorted(c) for c in found] or 'none'}")
    return "\n".join(lines)


def test_no_import_cycle():
    found = cycles({k: t | lt for k, (t, lt) in graph().items()})
    assert [c for c in found if c not in KNOWN_CYCLES] == [], describe()


def test_tracking_and_report_do_not_import_upwards():
    g = graph()
    assert not ({"report", "html_report", "query"} & set().union(*g["tracking"])), describe()
    assert not ({"query", "tracking", "summary", "compare"} & set().union(*g["report"]))
    assert set().union(*g["schema"]) <= {"config"} and set().union(*g["record"]) == {"schema"}


def test_light_modules_import_neither_torch_nor_mlflow_at_top_level():
    trees = modules()
    for name in NO_HEAVY:
        heavy = [
            a.name
            for node in trees[name].body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
            if (a.name or "").split(".")[0] in ("torch", "mlflow")
        ]
        assert heavy == [], f"{name} imports {heavy}"


def test_flexbench_tag_names_are_spelled_in_schema_only():
    spelled = re.compile(r"""["'](?:flexbench|mlflow)\.([A-Za-z_{}]+)["']""")
    paths = sorted(PACKAGE.glob("*.py"))
    for path in paths:
        if path.stem in ("schema", "cli"):  # cli: logger names (mlflow.store.db.utils)
            continue
        found = spelled.findall(path.read_text(encoding="utf-8"))
        not_tags = {p.stem for p in paths} | {"db"}  # `-m flexbench.sweep`, 'mlflow.db'
        names = [n for n in found if n not in not_tags]
        assert names == [], f"{path.name} spells {names}: take them from flexbench.schema"


if __name__ == "__main__":
    print(describe())
