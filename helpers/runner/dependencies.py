"""Which ``helpers`` modules a file depends on, read from the source (nothing is imported).

Modules are named by their dotted path inside the package (``engine.hooks``, ``runner.report``; ``__init__`` for the
package's own, ``engine.__init__`` for a layer's). A module depends on every ``helpers`` module it imports, at module
level *and* inside functions (an import moved into a function is still a dependency), absolute
(``from helpers.engine import hooks``, ``from helpers.engine.hooks import X``, ``import helpers.engine.hooks``) or
relative (``from .hooks import X``); only ``if __name__ == "__main__":`` blocks (the entry points of
``python -m helpers.runner.run`` and the like) are left out. Importing a module runs the ``__init__`` of every package
above it, so a closure holds those too.

Used by the batch runner (a run's fingerprint covers the modules its template reaches, not all of ``helpers/``) and
by ``tests/test_architecture.py`` (no cycle, every import points down the layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE: Path = Path(__file__).resolve().parent.parent
INIT = "__init__"


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``package/engine/hooks.py`` -> ``engine.hooks``; ``package/engine/__init__.py`` -> ``engine.__init__``."""
    return ".".join(path.relative_to(package).with_suffix("").parts)


def path_of(module: str, package: Path = PACKAGE) -> Path:
    """The source file of the dotted ``module`` (``module_name``'s inverse)."""
    return package.joinpath(*module.split(".")).with_suffix(".py")


def _resolve(base: str, names: list[str], modules: set[str]) -> set[str]:
    """What ``from helpers.<base> import <names>`` imports: ``base`` itself when it is a module, else each name that
    is a module (or a package: its ``__init__``) inside the package ``base``."""
    if base in modules:
        return {base}
    candidates = [f"{base}.{n}" if base else n for n in names]
    return {m for c in candidates for m in (c, f"{c}.{INIT}") if m in modules}


def imports_of(path: Path, modules: set[str], importer: str = "") -> set[str]:
    """The ``helpers`` modules (of ``modules``) that the source file ``path`` imports, outside ``__main__`` blocks.
    ``importer`` (its own dotted name, for files inside the package) resolves relative imports."""
    here = importer.split(".")[:-1]  # the package the importer sits in
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            names = [a.name for a in getattr(child, "names", [])]
            if isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:
                    parts = here[: len(here) - (child.level - 1)] + ([module] if module else [])
                    found.update(_resolve(".".join(parts), names, modules))
                elif module == "helpers" or module.startswith("helpers."):
                    found.update(_resolve(module.removeprefix("helpers").lstrip("."), names, modules))
            elif isinstance(child, ast.Import):
                found.update(n.removeprefix("helpers.") for n in names if n.startswith("helpers.") and n[8:] in modules)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & modules


def module_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of ``package`` and its subpackages (``__init__`` files included) -> the modules it imports."""
    paths = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p, package) for p in paths}
    graph = {}
    for p in paths:
        name = module_name(p, package)
        graph[name] = imports_of(p, modules, name) - {name}
    return graph


def packages_above(module: str) -> list[str]:
    """The ``__init__`` modules that importing ``module`` runs: the package's and each layer's above it."""
    parts = module.split(".")[:-1]
    return [INIT] + [".".join(parts[:i] + [INIT]) for i in range(1, len(parts) + 1)]


def closure(roots: set[str], graph: dict[str, set[str]]) -> set[str]:
    """``roots`` and every module they reach in ``graph``, with the ``__init__`` of every package above each (where the
    graph has it: any import of a module runs them)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen or module not in graph:
            continue
        seen.add(module)
        todo.extend(graph[module])
        todo.extend(packages_above(module))
    return seen


def depends_on(path: Path, graph: dict[str, set[str]] | None = None) -> set[str]:
    """The ``helpers`` modules that the file ``path`` (a template, a script) runs when executed: what it imports and
    everything those import, transitively (in ``graph``, by default this package's ``module_graph``)."""
    graph = module_graph() if graph is None else graph
    return closure(imports_of(path, set(graph)), graph)
