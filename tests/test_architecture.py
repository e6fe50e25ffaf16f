"""The package's structure: a one-way module dependency graph, a command line on top, light modules kept light.

The graph (``helpers.dependencies``) counts every import of one ``helpers`` module by another, at module level *and* inside functions (an
import moved into a function to dodge a cycle is still a dependency); only ``if __name__ == "__main__":`` blocks,
the entry points of ``python -m helpers.X``, are left out.
"""

from __future__ import annotations

import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

import pytest

from helpers import PROJECT_ROOT
from helpers.dependencies import module_graph


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
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}  # the graph the batch fingerprints follow too
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())


def test_the_command_line_is_on_top():
    graph = module_graph()
    assert not [m for m, deps in graph.items() if "cli" in deps], "nothing imports helpers.cli: it sits on top"


LIGHT = ["layout", "models", "batch", "capabilities", "dependencies", "notes", "params", "results", "components", "report", "cli"]


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


def test_importing_the_package_changes_no_global_warning_filter():
    """A library import has no side effects on the interpreter: the notebook session sets what its kernel needs."""
    code = "import warnings\nbefore = list(warnings.filters)\nimport helpers\nassert warnings.filters == before, warnings.filters[:3]\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]


def test_what_is_measured_on_a_model_lives_beside_it_and_goes_with_it():
    import gc
    import weakref

    from helpers import capabilities

    class Model:
        pass

    model = Model()
    capabilities.model_state(model, "fast_paths")[("skip_blocks", 1)] = True
    assert capabilities.model_state(model, "fast_paths") == {("skip_blocks", 1): True} and vars(model) == {}
    assert capabilities.forget(model, "fast_paths") == {("skip_blocks", 1): True} and capabilities.model_state(model, "fast_paths") == {}
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and all(k is not None for k in capabilities._STATE.keys())
