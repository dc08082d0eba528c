"""The package's structure: layers whose imports point down only, no import circle, counting `importlib`."""

import ast

from conftest import REPO

PACKAGE = REPO / "collapse_lab"
# The layers, from the ground up (README: what is where). A module may import its own layer and those below.
LAYERS = ["core", "models", "world", "evaluation", "stages", "regimes", "lab"]


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """0..6 for a module of a layer's sub-package; len(LAYERS) for the package's own top (cli)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def imported(node) -> list[str]:
    """The package modules an import statement, or an importlib.import_module("...") call, names."""
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collapse_lab"):
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
    elif isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.startswith("collapse_lab")]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("collapse_lab")):
        names = [node.args[0].value]
    return [n for n in names if n in MODULES and n != "collapse_lab"]


def graph() -> dict[str, set[str]]:
    return {name: {m for node in ast.walk(tree) for m in imported(node)} - {name} for name, tree in MODULES.items()}


def test_every_module_sits_in_a_layer():
    loose = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in LAYERS
             and m not in ("collapse_lab.cli", "collapse_lab.__main__")]
    assert loose == [], "a module belongs to one of the layers' sub-packages: " + ", ".join(LAYERS)


def test_imports_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_no_import_circle():
    g, done = graph(), set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, " -> ".join(path + [m])
        if m in done:
            return
        for n in sorted(g.get(m, ())):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(g):
        visit(m, [])


def test_no_function_level_imports_between_the_packages_modules():
    nested = [f"{name}:{node.lineno}" for name, tree in MODULES.items() for top in tree.body
              if not isinstance(top, (ast.Import, ast.ImportFrom)) for node in ast.walk(top) if imported(node)]
    assert nested == []


def test_the_checks_find_what_they_look_for():
    tree = ast.parse("def f():\n    import importlib\n    importlib.import_module('collapse_lab.regimes.registry')\n"
                     "from collapse_lab.lab import report\n")
    found = [m for node in ast.walk(tree) for m in imported(node)]
    assert sorted(found) == ["collapse_lab.lab.report", "collapse_lab.regimes.registry"]
    assert layer("collapse_lab.core.config") < layer("collapse_lab.regimes.registry") < layer("collapse_lab.cli")


def test_no_function_in_the_package_is_over_100_lines():
    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in MODULES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100]
    assert long == []


def test_the_report_reads_stored_results_without_torch():
    """collapse_lab.lab.report is pure: importing it loads none of torch, trl, accelerate, transformers."""
    import subprocess
    import sys

    code = ("import sys, collapse_lab.lab.report; "
            "print(sorted(m for m in ('torch', 'trl', 'accelerate', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
