"""The package's own structure: no import cycle, no function-level imports between its modules."""

import ast

from conftest import REPO

MODULES = {p.stem: ast.parse(p.read_text()) for p in (REPO / "collapse_lab").glob("*.py")}


def _own(node) -> list[str]:
    """The package modules an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "collapse_lab":
        parts = node.module.split(".")
        return [parts[1]] if len(parts) > 1 else [a.name for a in node.names if a.name in MODULES]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("collapse_lab.")]
    return []


def test_no_function_level_imports_between_the_packages_modules():
    nested = [f"{name}.py:{node.lineno}" for name, tree in MODULES.items() for top in tree.body
              if not isinstance(top, (ast.Import, ast.ImportFrom)) for node in ast.walk(top) if _own(node)]
    assert nested == []


def test_no_import_cycle():
    graph = {name: {m for node in tree.body for m in _own(node)} for name, tree in MODULES.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, " -> ".join(path + [m])
        if m in done:
            return
        for n in sorted(graph.get(m, ())):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_the_check_finds_what_it_looks_for():
    tree = ast.parse("def f():\n    from collapse_lab.world import World\n")
    assert [n for top in tree.body for n in ast.walk(top) if _own(n)]
