"""The package's structure: layers as subpackages, every import pointing down, a command line on top, light modules
kept light.

The graph (``helpers.runner.dependencies``) counts every import of one ``helpers`` module by another, at module level
*and* inside functions (an import moved into a function to dodge a cycle is still a dependency); only
``if __name__ == "__main__":`` blocks, the entry points of ``python -m helpers.runner.run`` and the like, are left out.
"""

from __future__ import annotations

import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

import pytest

from helpers import PROJECT_ROOT
from helpers.runner.dependencies import module_graph


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


LAYERS = ["schema", "task", "engine", "methods", "analyses", "notebook", "runner"]  # bottom to top
OUTSIDE = ["toys"]  # test and demo support: may import any layer, imported by none


def layer_of(module: str) -> str:
    return module.split(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a module of a layer into a higher layer or into ``OUTSIDE``."""
    return [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if layer_of(m) in LAYERS
        for d in deps
        if d != "__init__" and (layer_of(d) in OUTSIDE or LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m)))
    ]


def test_every_module_sits_in_a_layer_and_every_import_points_down():
    graph = module_graph()
    loose = [m for m in graph if m != "__init__" and layer_of(m) not in LAYERS + OUTSIDE]
    assert not loose, f"modules outside the layers: {loose} (put each in one of {LAYERS})"
    assert not upward_imports(graph), f"imports climbing a layer (or into toys): {upward_imports(graph)}"


def test_the_layer_check_catches_an_import_up_the_stack(tmp_path):
    for layer in ("schema", "engine", "toys"):
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    (tmp_path / "engine" / "hooks.py").write_text("from ..schema import heads\n")
    (tmp_path / "toys" / "planted.py").write_text("import helpers.engine.hooks\n")
    (tmp_path / "schema" / "heads.py").write_text("def f():\n    from helpers.engine.hooks import X\n    return X\n")
    graph = module_graph(tmp_path)
    assert graph["schema.heads"] == {"engine.hooks"} and graph["engine.hooks"] == {"schema.heads"}
    assert graph["toys.planted"] == {"engine.hooks"}
    assert upward_imports(graph) == ["schema.heads -> engine.hooks"]


def test_the_package_files_import_nothing():
    """``import helpers`` and ``import helpers.engine`` are cheap, and a closure is exactly what its modules import."""
    assert {m: deps for m, deps in module_graph().items() if m.endswith("__init__") and deps} == {}


def test_the_command_line_is_on_top():
    graph = module_graph()
    assert not [m for m, deps in graph.items() if "runner.cli" in deps], "nothing imports helpers.runner.cli: it sits on top"


LIGHT = [
    *("schema.heads", "schema.results", "schema.artifacts", "schema.outputs"),
    *("task.params", "task.models", "notebook.notes"),
    *("runner.dependencies", "runner.batch", "runner.run", "runner.report", "runner.cli", "runner.workcopy", "runner.task_table"),
]


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

    from helpers.engine import capabilities

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
