"""circuit-lab helpers: the one importable package every notebook template calls.

Modules, one concept each: ``params`` (task YAML schema), ``prompts`` (clean/corrupted prompt batches),
``models`` (loading through the TransformerLens 4 bridge), ``vocab`` and ``toy_models`` (the bundled
models and how they were trained), ``metrics``, ``attribution`` (DLA), ``patching``, ``heads``
(head scores, ablations), ``plotting``, ``artifacts`` (JSON results) and ``run`` (papermill driver).
Submodules are imported lazily so that ``import helpers`` stays cheap.
"""

import warnings
from pathlib import Path

# Libraries we load (transformers) import tqdm.auto, which warns in kernels without ipywidgets; its bars work as text.
warnings.filterwarnings("ignore", message="IProgress not found")

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
PARAMS_DIR: Path = PROJECT_ROOT / "params"
POOLS_DIR: Path = PARAMS_DIR / "pools"
MODELS_DIR: Path = PROJECT_ROOT / "models"
TEMPLATES_DIR: Path = PROJECT_ROOT / "nb_templates"
OUTPUTS_DIR: Path = PROJECT_ROOT / "nb_outputs"
