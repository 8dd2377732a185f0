"""The package's layout stays readable: no import cycles among its modules (counting imports inside
functions too), and no module imports another's private (underscore) names."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rankgrpo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the package modules it imports, 'module: from X import _name' for private imports).
    ``from pkg import sub`` with ``sub`` a module counts as importing ``pkg.sub``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for m, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rankgrpo":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules:
                        edges[m].add(sub)
                        continue
                    if node.module in modules:
                        edges[m].add(node.module)
                    if alias.name.startswith("_") and node.module != m:
                        private.append(f"{m}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in modules)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    edges, _ = import_graph()
    assert "rankgrpo.sampling" in edges and edges["rankgrpo.compiled_decode"]  # the graph was read
    assert cycles(edges) == []


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert private == []


BENCHMARKS = PACKAGE.parent / "benchmarks"
EDITS_SYS_PATH: set[str] = set()   # none: each benchmark imports the installed package


def sys_path_uses(path: Path) -> list[int]:
    """Lines of ``path`` that touch ``sys.path``."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def test_the_sys_path_finder_finds_an_edit(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("import sys\nimport os\nsys.path.insert(0, os.path.dirname(__file__))\n")
    assert sys_path_uses(script) == [3]


def test_benchmarks_import_the_installed_package():
    files = sorted(BENCHMARKS.glob("*.py"))
    assert len(files) > 5  # the directory was read
    edits = {f.name: sys_path_uses(f) for f in files if f.name not in EDITS_SYS_PATH}
    assert {name: lines for name, lines in edits.items() if lines} == {}
