"""No import circles among the project's own modules, found statically (ast over the tree, nothing imported).

Every import counts, wherever it sits: at module level, inside a function (an import put there to dodge a circle
is still one) or under ``if TYPE_CHECKING:``. Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``
first, so a module also depends on the packages above what it imports (but for those it sits in itself: they are
already running when it is).
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each top-level package of the project lives (the SDK under its src layout).
PACKAGE_ROOTS = {
    "server": ROOT,
    "explainers": ROOT,
    "common": ROOT,
    "deploy": ROOT,
    "sightline": ROOT / "clients" / "python" / "src",
}

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages ``roots`` names (package -> the directory holding it), by dotted name."""
    modules: dict[str, Path] = {}
    for package, root in roots.items():
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(path, root)] = path
    return modules


def imported_modules(tree: ast.AST, module: str, is_package: bool, modules: Collection[str]) -> Iterator[str]:
    """The project modules whose bodies a module's imports need to have run: ``import a.b`` needs ``a.b``;
    ``from a import b`` needs the module ``a.b`` if there is one, else (b is a name ``a`` defines) ``a`` itself.
    Relative imports are resolved against the module's own package."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in modules else base


def import_graph(modules: dict[str, Path]) -> Graph:
    """Module -> the project modules importing it runs. Importing ``a.b.c`` also runs the packages ``a`` and
    ``a.b`` on the way, except those the importing module sits in: they are already running when it does."""
    graph: Graph = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own_packages = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)}
        for target in imported_modules(tree, name, path.name == "__init__.py", modules):
            parts = target.split(".")
            needed = {".".join(parts[:end]) for end in range(1, len(parts))} - own_packages
            graph[name] |= {dependency for dependency in {*needed, target} if dependency in modules} - {name}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One circle through each strongly connected component of more than one module (Tarjan), as a path that
    returns to its start, so a failure shows what imports what."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_circle_through(graph, component) for component in components]


def _circle_through(graph: Graph, component: set[str]) -> list[str]:
    """A shortest circle from the component's first module back to itself, within the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    return [*paths[node], start]
                if successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{sorted(component)} is strongly connected, so a circle exists")


def test_the_project_has_no_import_circles() -> None:
    found = cycles(import_graph(modules_under(PACKAGE_ROOTS)))
    assert not found, "import circles: " + "; ".join(" -> ".join(circle) for circle in found)


def test_the_graph_sees_the_imports_that_matter() -> None:
    """The checker itself: the edges it must find in the real tree, so an empty result means no circles, not a
    parser that found nothing."""
    graph = import_graph(modules_under(PACKAGE_ROOTS))
    assert "explainers.backprop" in graph["explainers.model"]  # from explainers.backprop import ...
    assert "explainers.general_path" in graph["explainers.model"]  # from explainers import general_path
    assert "common.jobs" in graph["server.explanations"]
    assert "explainers.embedded_model" in graph["deploy.local_stack"]  # imported inside a function
    assert "sightline.client" in graph["sightline"]  # the SDK's __init__ re-exports it
    assert "sightline.v1.inference_pb2" in graph["sightline.client"]  # from sightline.v1 import (..., inference_pb2)
    # The package above what it imports runs first; the package it sits in is already running.
    assert "sightline.v1" in graph["sightline.client"] and "sightline" not in graph["sightline.client"]


def circles_in(tmp_path: Path, sources: dict[str, str]) -> list[list[str]]:
    """The circles among the modules of a package ``pkg`` written from ``sources`` (relative path -> code)."""
    for relative, source in sources.items():
        path = tmp_path / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return cycles(import_graph(modules_under({"pkg": tmp_path})))


@pytest.mark.parametrize(
    ("sources", "circle"),
    [
        ({"a.py": "import pkg.b", "b.py": "from pkg.a import thing"}, ["pkg.a", "pkg.b", "pkg.a"]),
        (
            {"a.py": "from . import b", "b.py": "def f():\n    from pkg import c", "c.py": "from .a import x"},
            ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ),
        (
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b",
                "b.py": "import pkg.a",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        # Importing pkg.other runs pkg/sub/__init__.py first, which needs pkg.other, still importing.
        (
            {"sub/__init__.py": "from pkg import other", "sub/y.py": "", "other.py": "from pkg.sub.y import f"},
            ["pkg.other", "pkg.sub", "pkg.other"],
        ),
        # A name the package's __init__ defines, imported back into a module that __init__ imports.
        (
            {"__init__.py": "from pkg.a import f\nVERSION = 1", "a.py": "from pkg import VERSION"},
            ["pkg", "pkg.a", "pkg"],
        ),
    ],
    ids=["module level", "function level and relative", "type checking only", "package init", "package attribute"],
)
def test_circles_are_found_however_they_are_written(tmp_path: Path, sources: dict[str, str], circle: list[str]) -> None:
    assert circles_in(tmp_path, sources) == [circle]


def test_a_tree_without_circles_passes(tmp_path: Path) -> None:
    # A package __init__ re-exporting its modules, which import their siblings through the package's name (as the
    # SDK's does): importing pkg.b runs pkg/__init__.py, which imports pkg.b, which needs only pkg.c.
    sources = {
        "__init__.py": "from pkg import b\nfrom pkg.a import g",
        "a.py": "from pkg import b, c\ndef g(): ...",
        "b.py": "import pkg.c",
        "c.py": "import json",
    }
    assert circles_in(tmp_path, sources) == []
