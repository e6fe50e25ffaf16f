"""circuit-lab helpers: the one importable package every notebook template calls.

Layers, each a subpackage, imports pointing down only (docs/architecture.md; ``tests/test_architecture.py``)::

    runner    cli · batch · run · report · workcopy · badges · dependencies · task_table   (torch-free)
    notebook  session · sections · plotting · figures · notes                          (what cells call)
    analyses  dla · pattern_scores · head_functions · weights · neurons · position_vs_token · roles · circuits · discovery
    methods   patching · attribution_patching · path_patching · edges · importance
    engine    hooks · metrics · capabilities · interventions · forward · kv_cache · shortcuts · forks · norms · memory · flops
    task      params · vocab · prompts · models · real_models
    schema    heads · results · artifacts · outputs
    toys      toy_models · planted · families   (test and demo support, outside the layers)

A name is imported from the module that defines it (``from helpers.methods import patching``); the ``__init__``
files import nothing, so ``import helpers`` stays cheap.
"""

from pathlib import Path

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
PARAMS_DIR: Path = PROJECT_ROOT / "params"
POOLS_DIR: Path = PARAMS_DIR / "pools"
MODELS_DIR: Path = PROJECT_ROOT / "models"
TEMPLATES_DIR: Path = PROJECT_ROOT / "nb_templates"
OUTPUTS_DIR: Path = PROJECT_ROOT / "nb_outputs"
