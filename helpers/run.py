"""Execute templates headlessly: ``python -m helpers.run`` runs every template for every params file (``make all``);
``--task ioi --template head_functions`` runs one template (and, if not up to date, the ones it reads). Runs
that are up to date are skipped (see ``helpers.batch``), a summary table lists every run, and
``<outputs>/index.html`` is rewritten (``helpers.report``).

Steps of one run (``run_template``): validate the params file; check the model can be loaded here (fails in seconds otherwise); check the
prompts can be built with the model's tokenizer (local models); convert the jupytext ``.py`` template to a
notebook; execute it with papermill into a staging folder; export a static HTML copy; and only then replace
this template's files in ``nb_outputs/<task>/<model>/``. A failure leaves that folder untouched and keeps the
executed notebook (with papermill's error cell) under ``nb_outputs/.failed/``. Exit code 0 when every run
succeeded or was up to date, 1 when one failed, 2 on bad input (params, model).
"""

from __future__ import annotations

import argparse
import logging
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


def templates_dir() -> Path:
    """Where templates are read from: ``$CIRCUIT_LAB_TEMPLATES`` or ``nb_templates/``."""
    return Path(os.environ.get("CIRCUIT_LAB_TEMPLATES") or TEMPLATES_DIR)


def outputs_dir() -> Path:
    """Where results are published: ``$CIRCUIT_LAB_OUTPUTS`` or ``nb_outputs/`` (seen by Dask worker processes too)."""
    return Path(os.environ.get("CIRCUIT_LAB_OUTPUTS") or OUTPUTS_DIR)


def available_templates() -> list[str]:
    """Template names (``<templates dir>/*.py``)."""
    return sorted(p.stem for p in templates_dir().glob("*.py"))


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

    src = templates_dir() / f"{template}.py"
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
                 extra_parameters: dict | None = None, log_output: bool = False) -> RunResult:
    """Execute one template for one task and model (see module docstring); never raises for bad input."""
    from .experiments import model_folder_name

    t0 = time.time()
    try:
        params = check_inputs(task, model, n_prompts)
    except (ParamsError, ModelNotAvailable, FileNotFoundError) as err:
        return RunResult(task, model or "?", template, "bad-input", time.time() - t0, None, str(err))
    import papermill as pm

    task_name, model_name, params_file = params.task, params.model, str(params.source)
    root = outputs_dir()
    final = root / task_name / model_folder_name(model_name)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{task_name}-{template}-", dir=root))
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
                            progress_bar=progress, execution_timeout=cell_timeout, log_output=log_output)
    except Exception as err:  # PapermillExecutionError or a kernel failure: keep the executed notebook
        failed_dir = root / ".failed" / task_name / model_folder_name(model_name)
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
    """``python -m helpers.run``: every template for every params file by default (what ``make all`` runs)."""
    from .batch import PlanError, RunOptions, run_batch
    from .report import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", action="append", help="task name (params/<task>.yaml) or params file; repeat; default: all")
    parser.add_argument("--params-dir", type=Path, default=None, help="folder of params files (default params/)")
    parser.add_argument("--model", action="append", help="model(s) instead of each params file's own (bundled name, dir, hub name)")
    parser.add_argument("--template", action="append", help="template(s) to run, plus the ones they read; default: all")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="runs at once (a local Dask cluster of N processes)")
    parser.add_argument("--scheduler", default=None, help="address of a Dask scheduler to run on (e.g. one dask-jobqueue started)")
    parser.add_argument("--force", action="store_true", help="rerun runs that are up to date")
    parser.add_argument("--n-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: cores / jobs)")
    parser.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell before a run fails")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: CUDA if available); with -j, one run per GPU")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="model dtype (default float32; half precision halves memory, identities then hold to ~1e-2)")
    parser.add_argument("--log-output", action="store_true", help="stream each cell's output (e.g. the sweeps' tqdm bars) to stderr")
    parser.add_argument("--outputs-dir", type=Path, default=None, help="instead of nb_outputs/")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite <outputs>/index.html")
    args = parser.parse_args(argv)
    if args.outputs_dir:
        os.environ["CIRCUIT_LAB_OUTPUTS"] = str(args.outputs_dir.resolve())
    if args.log_output:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    options = RunOptions(args.n_prompts, args.threads, args.cell_timeout, args.device, log_output=args.log_output,
                         extra_parameters={"dtype": args.dtype} if args.dtype else {})
    try:
        batch = run_batch(args.task, args.model, args.template, options, args.jobs, args.scheduler, args.force, args.params_dir)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(batch.table())
    if not args.no_report and (batch.executed or not (outputs_dir() / "index.html").exists()):
        print("report:", write_report(outputs_dir(), batch))
    return batch.exit_code


if __name__ == "__main__":
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.exit(main())
