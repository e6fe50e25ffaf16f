"""Which ``helpers`` modules a file depends on, read from the source (nothing is imported).

A module depends on every ``helpers`` module it imports, at module level *and* inside functions (an import moved into
a function is still a dependency), relative (``from .x import``) or absolute (``from helpers import x``,
``import helpers.x``); only ``if __name__ == "__main__":`` blocks (the entry points of ``python -m helpers.X``) are
left out. ``helpers/__init__.py`` runs on any import of the package, so every closure holds it and what it imports.

Used by the batch runner (a run's fingerprint covers the modules its template reaches, not all of ``helpers/``) and
by ``tests/test_architecture.py`` (the graph has no cycle, the command line is on top).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE: Path = Path(__file__).resolve().parent
INIT = "__init__"


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``helpers`` modules (of ``modules``) that the source file ``path`` imports, outside ``__main__`` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level == 1 or module == "helpers" or module.startswith("helpers."):
                    head = module.removeprefix("helpers").lstrip(".").split(".")[0]
                    found.update([head] if head else [a.name for a in child.names if a.name in modules])
            elif isinstance(child, ast.Import):
                found.update(a.name.split(".")[1] for a in child.names if a.name.startswith("helpers."))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & modules


def module_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of ``package`` (``__init__`` included) -> the modules it imports."""
    modules = {p.stem for p in package.glob("*.py")}
    return {p.stem: imports_of(p, modules) - {p.stem} for p in sorted(package.glob("*.py"))}


def closure(roots: set[str], graph: dict[str, set[str]]) -> set[str]:
    """``roots`` and every module they reach in ``graph``, with ``__init__`` and what it reaches (where the graph has
    it: any import of the package runs it)."""
    seen: set[str] = set()
    todo = [*roots, *([INIT] if INIT in graph else [])]
    while todo:
        module = todo.pop()
        if module in seen or module not in graph:
            continue
        seen.add(module)
        todo.extend(graph[module])
    return seen


def depends_on(path: Path, graph: dict[str, set[str]] | None = None) -> set[str]:
    """The ``helpers`` modules that the file ``path`` (a template, a script) runs when executed: what it imports and
    everything those import, transitively (in ``graph``, by default this package's ``module_graph``)."""
    graph = module_graph() if graph is None else graph
    return closure(imports_of(path, set(graph)), graph)
