"""circuit-lab helpers: the one importable package every notebook template calls.

One concept per module, imports one way (docs/architecture.md; ``tests/test_architecture.py``):
``params`` → ``prompts`` → ``models`` → the engine (``hooks``, ``interventions``, ``patching``,
``attribution_patching``, ``path_patching``, ``edges``) → the analyses (``attribution``, ``heads``,
``head_functions``, ``roles``, ``circuits``, ``discovery``, ``neurons``, ``weights_circuits``, ``importance``,
``signals``) → ``session`` / ``experiments`` (what template cells call) → ``results`` (typed JSON) → ``report``;
``cli`` → ``batch`` → ``run`` → ``layout`` for running templates. ``components`` (Head) is shared by all.
Submodules are imported lazily so that ``import helpers`` stays cheap.
"""

from pathlib import Path

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
PARAMS_DIR: Path = PROJECT_ROOT / "params"
POOLS_DIR: Path = PARAMS_DIR / "pools"
MODELS_DIR: Path = PROJECT_ROOT / "models"
TEMPLATES_DIR: Path = PROJECT_ROOT / "nb_templates"
OUTPUTS_DIR: Path = PROJECT_ROOT / "nb_outputs"
