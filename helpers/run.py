"""Execute a template for a task and model headlessly: ``python -m helpers.run --task ioi --template circuit_expms``.

Steps: validate the params file; check the model can be loaded here (fails in seconds otherwise); check the
prompts can be built with the model's tokenizer (local models); convert the jupytext ``.py`` template to a
notebook; execute it with papermill into a staging folder; export a static HTML copy; and only then replace
this template's files in ``nb_outputs/<task>/<model>/``. A failure leaves that folder untouched and keeps the
executed notebook (with papermill's error cell) under ``nb_outputs/.failed/``. Exit code 0 on success,
2 on bad input (params, model), 1 on a failed execution.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import OUTPUTS_DIR, PROJECT_ROOT, TEMPLATES_DIR
from .models import ModelNotAvailable, resolve_model
from .params import ParamsError, TaskParams, load_params


@dataclass
class RunResult:
    """Outcome of one template × task × model run."""

    task: str
    model: str
    template: str
    status: str  # "ok", "bad-input" or "failed"
    seconds: float
    out_dir: Path | None
    message: str = ""


def available_templates() -> list[str]:
    """Template names (``nb_templates/*.py``)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.py"))


def check_inputs(task: str, model: str | None, n_prompts: int | None = None) -> TaskParams:
    """Validate params, model and (for local models) prompt generation; returns the validated params."""
    params = load_params(task, model=model, n_prompts=n_prompts)
    source = resolve_model(params.model)
    if Path(source).is_dir():
        from transformers import AutoTokenizer

        from .prompts import make_prompts

        make_prompts(params, AutoTokenizer.from_pretrained(source), verbose=False)
    return params


def template_notebook(template: str, dest: Path) -> Path:
    """Convert ``nb_templates/<template>.py`` (jupytext percent format) to an ``.ipynb`` at ``dest``."""
    import jupytext

    src = TEMPLATES_DIR / f"{template}.py"
    if not src.exists():
        raise FileNotFoundError(f"template {template!r} not found; available: {available_templates()}")
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, dest)
    return dest


def export_html(notebook: Path) -> Path:
    """Static HTML copy of an executed notebook (figures are embedded in the outputs)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(notebook, as_version=4))
    html = notebook.with_suffix(".html")
    html.write_text(body)
    return html


def publish(staging: Path, final: Path) -> None:
    """Move each file/folder of ``staging`` into ``final``, replacing only the items with the same names."""
    final.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = final / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(item), str(target))


def run_template(task: str, template: str = "circuit_expms", model: str | None = None, n_prompts: int | None = None,
                 threads: int | None = None, cell_timeout: int | None = None, progress: bool = True,
                 extra_parameters: dict | None = None) -> RunResult:
    """Execute one template for one task and model (see module docstring); never raises for bad input."""
    from .experiments import model_folder_name

    t0 = time.time()
    try:
        params = check_inputs(task, model, n_prompts)
    except (ParamsError, ModelNotAvailable, FileNotFoundError) as err:
        return RunResult(task, model or "?", template, "bad-input", time.time() - t0, None, str(err))
    import papermill as pm

    task_name, model_name, params_file = params.task, params.model, str(params.source)
    final = OUTPUTS_DIR / task_name / model_folder_name(model_name)
    OUTPUTS_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{task_name}-{template}-", dir=OUTPUTS_DIR))
    try:
        source_nb = template_notebook(template, staging / f".{template}.src.ipynb")
    except FileNotFoundError as err:
        shutil.rmtree(staging)
        return RunResult(task_name, model_name, template, "bad-input", time.time() - t0, None, str(err))
    out_nb = staging / f"{template}.ipynb"
    parameters = {"task": task_name, "params_file": params_file, "model_name": model_name, "output_dir": str(staging),
                  "input_dir": str(final), "n_prompts": n_prompts, "threads": threads, **(extra_parameters or {})}
    declared = pm.inspect_notebook(str(source_nb))  # pass only what the template declares (input_dir: where earlier JSON is)
    parameters = {k: v for k, v in parameters.items() if k in declared}
    try:
        pm.execute_notebook(str(source_nb), str(out_nb), parameters=parameters, kernel_name="python3", cwd=str(PROJECT_ROOT),
                            progress_bar=progress, execution_timeout=cell_timeout, log_output=False)
    except Exception as err:  # PapermillExecutionError or a kernel failure: keep the executed notebook
        failed_dir = OUTPUTS_DIR / ".failed" / task_name / model_folder_name(model_name)
        failed_dir.mkdir(parents=True, exist_ok=True)
        if out_nb.exists():
            shutil.copy(out_nb, failed_dir / f"{template}.ipynb")
        shutil.rmtree(staging, ignore_errors=True)
        summary = getattr(err, "evalue", None) or str(err).strip().splitlines()[-1]
        return RunResult(task_name, model_name, template, "failed", time.time() - t0, failed_dir,
                         f"{getattr(err, 'ename', type(err).__name__)}: {summary} (executed notebook: {failed_dir / (template + '.ipynb')})")
    source_nb.unlink()
    export_html(out_nb)
    publish(staging, final)
    staging.rmdir()
    return RunResult(task_name, model_name, template, "ok", time.time() - t0, final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ioi", help="task name (params/<task>.yaml) or a params file path")
    parser.add_argument("--model", default=None, help="override the params' model (bundled name, local dir or hub name)")
    parser.add_argument("--template", action="append", help="template(s) to run; default: circuit_expms")
    parser.add_argument("--n-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads inside the notebook")
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell")
    args = parser.parse_args(argv)
    status = 0
    for template in args.template or ["circuit_expms"]:
        r = run_template(args.task, template, args.model, args.n_prompts, args.threads, args.cell_timeout)
        where = f" -> {r.out_dir}" if r.status == "ok" else ""
        print(f"[{r.status}] {r.template} · {r.task} · {r.model} ({r.seconds:.1f}s){where}")
        if r.status != "ok":
            print(r.message, file=sys.stderr)
            status = max(status, 2 if r.status == "bad-input" else 1)
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.exit(main())
