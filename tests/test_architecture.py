"""The package's structure: a one-way module dependency graph, a command line on top, light modules kept light.

The graph counts every import of one ``helpers`` module by another, at module level *and* inside functions (an
import moved into a function to dodge a cycle is still a dependency); only ``if __name__ == "__main__":`` blocks,
the entry points of ``python -m helpers.X``, are left out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

from helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "helpers"


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``helpers`` modules ``path`` imports (relative or absolute), outside ``__main__`` blocks."""
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
    return (found & modules) - {path.stem}


def module_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules it imports."""
    modules = {p.stem for p in package.glob("*.py")}
    return {p.stem: imports_of(p, modules) for p in sorted(package.glob("*.py"))}


def test_the_module_graph_has_no_cycle():
    graph = module_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle between helpers modules: {' -> '.join(err.args[1])}")
    assert set(order) == set(graph)


def test_the_cycle_check_sees_an_import_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (tmp_path / "c.py").write_text('if __name__ == "__main__":\n    from helpers.a import main\n')
    graph = module_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())


def test_the_command_line_is_on_top():
    graph = module_graph()
    assert not [m for m, deps in graph.items() if "cli" in deps], "nothing imports helpers.cli: it sits on top"


LIGHT = ["layout", "models", "batch", "notes", "params", "results", "components", "report", "cli"]


def test_planning_and_reporting_modules_do_not_import_torch():
    """The batch planner, the command line, the report and the result schemas run for every run and every page: no
    torch, no TransformerLens, no plotly (seconds of import between them) until a model is loaded or a figure drawn.
    One fresh interpreter imports them one by one and names the first that pulls a heavy library in."""
    code = (
        "import importlib, sys\n"
        f"for m in {LIGHT!r}:\n"
        "    importlib.import_module('helpers.' + m)\n"
        "    heavy = sorted(h for h in ('torch', 'transformer_lens', 'plotly') if h in sys.modules)\n"
        "    if heavy:\n"
        "        sys.exit(f'helpers.{m} imports {heavy}')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]
