"""chattune's packages import only downwards, and no two modules import each other, directly or round a circle.

The order, lowest first, is README.md's Layout: a module may import its own layer and the layers below it. An
import under `if TYPE_CHECKING:` is only a type hint, never run, so it may point anywhere. The checker is tested
on a small made-up package too, so that a checker which finds nothing cannot pass for a clean tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

# Lowest first; a module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ("chattune", "chattune.errors", "chattune.atomic", "chattune.cli", "chattune.allocator"),
    ("chattune.config",),
    ("chattune.models",),
    ("chattune.data",),
    ("chattune.domains",),
    ("chattune.evaluation", "chattune.export"),
    ("chattune.training",),
    ("chattune.commands", "chattune.train_entry"),
]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `root`, by dotted name (a package by its own name)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """The ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for statement in node.body for child in ast.walk(statement))
    return inside


def imports_of(path: Path, package: str, modules: dict[str, Path]) -> set[str]:
    """The modules of `package` that `path` imports when it runs, at its top or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hints = type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            # `from package.sub import name`: the module package.sub.name when there is one, else package.sub
            found.update(
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            )
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imports_of(path, package, modules) - {name} for name, path in modules.items()}


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(layers)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1] if matches else None


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target, layers) > layer_of(module, layers)
    ]


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other round a circle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in stack:
                lowest[module] = min(lowest[module], index[target])
        if lowest[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO, "chattune")


def test_every_module_has_a_layer(graph):
    assert [module for module in graph if layer_of(module, LAYERS) is None] == []


def test_no_module_imports_a_layer_above_its_own(graph):
    assert upward_imports(graph, LAYERS) == []


def test_no_import_circle(graph):
    assert import_circles(graph) == []


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from pkg.high import b\n",  # upward
        "pkg/low/c.py": "def f():\n    from pkg.low import d\n",  # a circle through a function's import
        "pkg/low/d.py": "import pkg.low.c\n",
        "pkg/low/hint.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import b\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from pkg.low.a import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    layers = [("pkg",), ("pkg.low",), ("pkg.high",)]
    assert upward_imports(graph, layers) == ["pkg.low.a imports pkg.high.b"]
    assert sorted(import_circles(graph)) == [["pkg.high.b", "pkg.low.a"], ["pkg.low.c", "pkg.low.d"]]
