"""One template run, headless: check the inputs, execute the notebook, publish it (``run_template``).

The command line (``python -m helpers.runner.run``: every template for every params file, ``make all``) is in
``helpers.runner.cli``; planning many runs in dependency order and skipping up-to-date ones is ``helpers.runner.batch``.

Steps of one run (``run_template``): every check that can be made before the first cell (``check_inputs``: the
params file, the model folder or hub name, the params against the model's shape, the prompts with the model's
tokenizer, names and writable output folders), so bad input is one line and exit 2 with nothing written; then,
holding the lock of this task × model × template (``helpers.schema.outputs``), convert the jupytext ``.py`` template to a
notebook, execute it with papermill into a staging folder, render its figures' PNG/SVG files (one browser per
runner process, ``figures.render_pending``), carry the researcher's notes over from the notebook it replaces (and
keep that notebook whole if it was edited, ``helpers.notebook.notes``), export a static HTML copy, and publish it into
``nb_outputs/<task>/<model>/`` atomically (a run killed mid-publish is rolled back by the next). A failure leaves
that folder untouched and keeps the executed notebook (with papermill's error cell) under ``nb_outputs/.failed/``.
Exit code 0 when every run succeeded or was up to date, 1 when one failed, 2 on bad input.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import PROJECT_ROOT
from helpers.notebook import figures, notes
from helpers.schema import outputs
from helpers.schema.results import ResultsSchemaError, read_results, set_missing_figures
from helpers.task.models import ModelNotAvailable
from helpers.task.params import ParamsError, TaskParams, load_params

BAD_INPUT = (ParamsError, ModelNotAvailable, outputs.OutputsError, FileNotFoundError)


@dataclass
class RunResult:
    """Outcome of one template × task × model run."""

    task: str
    model: str
    template: str
    status: str  # "ok", "bad-input", "refused" (the model's tokenizer cannot write the task), "failed" or "skipped"
    seconds: float
    out_dir: Path | None
    message: str = ""
    peak_rss_mb: float | None = None  # the notebook kernel's peak resident memory (sampled), when a notebook ran


class PeakRSS:
    """The resident memory of this process's child processes (the notebook kernel), sampled every ``interval``
    seconds while the block runs: its peak for the summary and the report card, and its samples (wall time, bytes)
    so that each cell's own peak can be read off papermill's cell timings (``cell_peaks``). Under several runs in
    threads of one process (the in-process scheduler) their kernels are summed."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_bytes = interval, 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # a process that ended between listing and reading
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self.samples.append((time.time(), total))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    def peak_mb_between(self, start: float, end: float) -> float | None:
        """The highest sample (MB) taken from ``start`` to ``end`` (seconds since the epoch), widened by one interval
        each side so that a cell shorter than the interval still gets the sample nearest to it; None without one."""
        inside = [b for t, b in self.samples if start - self.interval <= t <= end + self.interval]
        return round(max(inside) / 2**20, 1) if inside else None


def cell_peaks(nb, memory: PeakRSS) -> list[tuple[int, float]]:
    """(cell index, peak MB) of each executed code cell of notebook ``nb``, from papermill's start and end times."""
    from datetime import datetime

    peaks = []
    for i, cell in enumerate(nb.cells):
        timing = cell.metadata.get("papermill", {})
        if cell.cell_type != "code" or not timing.get("start_time") or not timing.get("end_time"):
            continue
        start, end = (datetime.fromisoformat(timing[k]).timestamp() for k in ("start_time", "end_time"))
        peak = memory.peak_mb_between(start, end)
        if peak is not None:
            peaks.append((i, peak))
    return peaks


def first_line(source: str) -> str:
    """A cell's first non-blank line: how a cell is named in messages and on the report."""
    return next((line for line in source.splitlines() if line.strip()), "")


def last_started_cell(notebook: Path) -> str | None:
    """ "cell N (its first line)" of the last cell papermill started in the notebook it saved, the one a killed kernel
    was executing (papermill marks even that cell "completed"); None when no cell started."""
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError):
        return None
    started = [i for i, c in enumerate(nb.cells) if c.metadata.get("papermill", {}).get("start_time")]
    if not started:
        return None
    return f"cell {started[-1]} ({first_line(nb.cells[started[-1]].source)[:80]})"


def dead_kernel_message(err: Exception, peak_mb: float, cell: str | None = None) -> str | None:
    """What to tell the researcher when the kernel died mid-run (nbclient's DeadKernelError), or None for other errors.
    A kernel does not die of a Python error; on a real model it is almost always the system's out-of-memory killer."""
    if type(err).__name__ != "DeadKernelError":
        return None
    import psutil

    total = psutil.virtual_memory().total / 2**30
    return (
        f"the notebook's kernel was killed by the system, probably out of memory{f' in {cell}' if cell else ''} (its peak "
        f"sample was {peak_mb / 1024:.1f} GB; this machine has {total:.0f} GB): lower n_prompts (--n-prompts) or the memory budget "
        "(patching_memory_mb), or run on a machine with more memory"
    )


def check_inputs(task: str, model: str | None, n_prompts: int | None = None, need_weights: bool = True) -> TaskParams:
    """Every check a run makes before its first cell: the params file (schema, pools), the model (available here,
    a complete folder), the params against the model's shape (circuit heads, layer groups, top_k), the prompts
    built with the model's tokenizer, and the output folder name. Returns the validated params; raises
    ParamsError, ModelNotAvailable or OutputsError with a message naming the file, the field and the fix.
    ``need_weights=False`` (the params check command) accepts GPT-2 hub names offline (shipped tokenizer)."""
    from helpers.task.models import load_tokenizer, model_shape, resolve_model
    from helpers.task.prompts import make_prompts

    params = load_params(task, model=model, n_prompts=n_prompts)
    try:
        outputs.model_folder_name(params.model)
        if need_weights:
            resolve_model(params.model)
        shape, tokenizer = model_shape(params.model), load_tokenizer(params.model)
    except (ModelNotAvailable, outputs.OutputsError) as err:
        where = "--model" if model else "model"
        raise type(err)(f"{params.source}: {where}: {err}") from None
    params.check_model(*shape, params.model)
    make_prompts(params, tokenizer, verbose=False)
    return params


def template_notebook(template: str, dest: Path) -> Path:
    """Convert ``nb_templates/<template>.py`` (jupytext percent format) to an ``.ipynb`` at ``dest``."""
    import jupytext

    src = outputs.templates_dir() / f"{template}.py"
    if not src.exists():
        raise FileNotFoundError(f"template {template!r} not found; available: {outputs.available_templates()}")
    nb = notes.mark_template_cells(jupytext.read(src))  # stable cell ids: a rerun carries the researcher's notes by them
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, dest)
    return dest


REMOTE_SCRIPT = re.compile(
    r"""<script\b[^>]*\bsrc=["'](?:https?:)?//[^"']*["'][^>]*>\s*</script>|<script\b[^>]*\bsrc=["']["'][^>]*>\s*</script>"""
)


def export_html(notebook: Path) -> Path:
    """Static HTML copy of an executed notebook that works offline: figures (and plotly.js) are embedded in the
    outputs; no script is loaded from a CDN (nbconvert's require.js/MathJax/mermaid, plotly's per-figure MathJax)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", require_js_url="", mathjax_url="", mermaid_js_url="", mermaid_layout_elk_js_url="")
    body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    body = REMOTE_SCRIPT.sub("", body)
    html = notebook.with_suffix(".html")
    html.write_text(body)
    return html


def in_own_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, off the main thread in a new, uniquely named thread. jupyter_core keeps one event loop per thread *name*;
    runs on threads that share a name (Dask workers in one process) would otherwise share a loop and fail with
    "This event loop is already running"."""
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    if threading.current_thread() is threading.main_thread():  # the usual case: Ctrl-C reaches papermill directly
        return fn(*args, **kwargs)
    with ThreadPoolExecutor(1, thread_name_prefix=f"papermill-{uuid.uuid4().hex}") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def run_template(
    task: str,
    template: str = "circuit_expms",
    model: str | None = None,
    n_prompts: int | None = None,
    threads: int | None = None,
    cell_timeout: int | None = None,
    progress: bool = True,
    extra_parameters: dict | None = None,
    log_output: bool = False,
) -> RunResult:
    """Execute one template for one task and model (see module docstring); never raises for bad input.

    Bad input (params, model, template, an output folder that cannot be written, another run of the same
    task × model × template in progress) returns a ``bad-input`` result before anything is written."""
    t0 = time.time()
    try:
        params = check_inputs(task, model, n_prompts)
        root = outputs.outputs_dir()
        if not (outputs.templates_dir() / f"{template}.py").is_file():
            raise FileNotFoundError(f"template {template!r} not found; available: {outputs.available_templates()}")
        where = outputs.owner(params.task, outputs.scope_of(template))  # the task, or _models for a per-model template
        final = outputs.run_folder(root, where, params.model)
        outputs.check_writable(root, final)
    except BAD_INPUT as err:
        return RunResult(task, model or "?", template, "bad-input", time.time() - t0, None, str(err))
    except Exception as err:  # a check that failed in a way we did not foresee: still one line, still bad input
        return RunResult(
            task,
            model or "?",
            template,
            "bad-input",
            time.time() - t0,
            None,
            f"{task}: could not check the inputs ({type(err).__name__}: {err}); please report this",
        )
    root.mkdir(parents=True, exist_ok=True)
    try:
        with outputs.run_lock(root, where, params.model, template):
            outputs.recover(final, template)  # a run of this template killed mid-publish: put the old result back
            outputs.remove_stale_staging(root, where, params.model, template)
            target = RunTarget(params, template, root, final, where)
            return _execute(target, ExecutionOptions(n_prompts, threads, cell_timeout, progress, extra_parameters, log_output), t0)
    except outputs.OutputsError as err:
        return RunResult(params.task, params.model, template, "bad-input", time.time() - t0, None, str(err))


@dataclass(frozen=True)
class ExecutionOptions:
    """How one template is executed: what its kernel gets besides the task, and how papermill runs it."""

    n_prompts: int | None = None  # overrides the params file's n_prompts
    threads: int | None = None  # torch CPU threads in the kernel
    cell_timeout: int | None = None  # seconds one cell may run (None: no limit)
    progress: bool = True  # papermill's per-cell progress bar
    extra_parameters: dict | None = None  # more template parameters (only those the template declares are passed)
    log_output: bool = False  # stream cell outputs to the log


@dataclass(frozen=True)
class RunTarget:
    """Where one run goes: its task's params and template, the outputs root, the published folder and its first
    level (``where``: the task, or ``outputs.MODEL_SCOPE`` for a per-model template)."""

    params: TaskParams
    template: str
    root: Path
    final: Path
    where: str


def _execute(target: RunTarget, options: ExecutionOptions, t0: float) -> RunResult:
    """Execute into a staging folder, export HTML and publish (the caller holds the run lock)."""
    import papermill as pm

    staging = outputs.new_staging(target.root, target.where, target.params.model, target.template)
    source_nb = template_notebook(target.template, staging / f".{target.template}.src.ipynb")
    out_nb = staging / f"{target.template}.ipynb"
    parameters = _kernel_parameters(target, options, staging)
    declared = pm.inspect_notebook(str(source_nb))  # pass only what the template declares (input_dir: where earlier JSON is)
    memory = PeakRSS()
    try:
        with kernel_environment(_kernel_env(options)), memory:
            in_own_thread(
                pm.execute_notebook,
                str(source_nb),
                str(out_nb),
                parameters={k: v for k, v in parameters.items() if k in declared},
                kernel_name="python3",
                cwd=str(PROJECT_ROOT),
                progress_bar=options.progress,
                execution_timeout=options.cell_timeout,
                log_output=options.log_output,
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
    except Exception as err:  # PapermillExecutionError or a kernel failure: keep the executed notebook
        return _kept_failure(target, staging, out_nb, err, memory, t0)
    source_nb.unlink()
    record_resources(out_nb, memory)
    return _publish(target, staging, out_nb, memory, t0)


def _kernel_parameters(target: RunTarget, options: ExecutionOptions, staging: Path) -> dict:
    """Every parameter the runner can give a template (the template receives those it declares)."""
    return {
        "task": target.params.task,
        "params_file": str(target.params.source),
        "model_name": target.params.model,
        "output_dir": str(staging),
        "input_dir": str(target.final),
        "n_prompts": options.n_prompts,
        "threads": options.threads,
        **(options.extra_parameters or {}),
    }


def _kernel_env(options: ExecutionOptions) -> dict[str, str]:
    """The kernel's environment additions. Quiet: no per-layer progress bars in the saved notebook unless streamed
    (--log-output); no ipykernel warning about its local TCP transport on every run (kernel errors are still shown).
    tqdm.auto (imported by transformer_lens before helpers) warns in kernels without ipywidgets; its bars work as
    text. Figures are left to this process to render (``figures.DEFER_ENV``)."""
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    return {
        "CIRCUIT_LAB_PROGRESS": "1" if options.log_output else "0",
        "PYTHONWARNINGS": ",".join(dict.fromkeys([*filters, "ignore:IProgress not found"])),
        figures.DEFER_ENV: "defer",
    }


def _kept_failure(target: RunTarget, staging: Path, out_nb: Path, err: Exception, memory: PeakRSS, t0: float) -> RunResult:
    """A failed execution: the executed notebook (papermill's error cell in it) kept under ``.failed/``, the staging
    folder removed, the published folder untouched; the message says what failed (or that the kernel died)."""
    template, model_name = target.template, target.params.model
    failed_dir = target.root / ".failed" / target.where / outputs.model_folder_name(model_name)
    failed_dir.mkdir(parents=True, exist_ok=True)
    if out_nb.exists():
        shutil.copy(out_nb, failed_dir / f"{template}.ipynb")
    shutil.rmtree(staging, ignore_errors=True)
    summary = getattr(err, "evalue", None) or (str(err).strip().splitlines() or [""])[-1]
    killed = dead_kernel_message(err, memory.mb, last_started_cell(failed_dir / f"{template}.ipynb"))
    what = killed or f"{getattr(err, 'ename', type(err).__name__)}: {summary}"
    message = f"{what} (executed notebook: {failed_dir / (template + '.ipynb')})"
    return RunResult(target.where, model_name, template, "failed", time.time() - t0, failed_dir, message, memory.mb)


def _publish(target: RunTarget, staging: Path, out_nb: Path, memory: PeakRSS, t0: float) -> RunResult:
    """Render the figures the kernel left pending, carry the researcher's notes over, export HTML and publish the
    staging folder atomically; the result's note says what a reader should know (task check, notes, figures)."""
    template, model_name, final = target.template, target.params.model, target.final
    images, unrendered, image_failure = figures.render_pending(staging)
    set_missing_figures(staging / f"{template}.json", unrendered)  # what the kernel could not write and this did, too
    # The notebook as published: its parameters and printed paths name the final folder, not the staging one.
    out_nb.write_text(out_nb.read_text().replace(str(staging), str(final)))
    carried = notes.carry_into(final / f"{template}.ipynb", out_nb)  # the researcher's notes; an edited notebook kept whole
    notes.write_fingerprint(out_nb)  # published with it: a later edit is told from what was written here
    export_html(out_nb)
    try:
        outputs.publish(staging, final, template)
    except OSError as err:
        outputs.recover(final, template)
        shutil.rmtree(staging, ignore_errors=True)
        message = f"could not publish into {final} ({err}); the previous result is unchanged"
        return RunResult(target.where, model_name, template, "failed", time.time() - t0, None, message)
    staging.rmdir()
    missing = (
        f"{len(unrendered)} of {images + len(unrendered)} figures not rendered ({image_failure}): kept as plotly JSON, `make report` renders them"
        if unrendered
        else ""
    )
    note = "; ".join(n for n in (task_note(final / f"{template}.json"), carried.message(), missing) if n)
    return RunResult(target.where, model_name, template, "ok", time.time() - t0, final, note, memory.mb)


def record_resources(notebook: Path, memory: PeakRSS) -> None:
    """Write the kernel's peak memory into the notebook's metadata (``circuit_lab.peak_rss_mb``, next to papermill's
    duration), each code cell's own peak into that cell's (``circuit_lab.peak_rss_mb``), and the cell that needed
    the most (``circuit_lab.heaviest_cell``: index, first line, MB): the report card reads them from the notebook."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    meta = nb.metadata.setdefault("circuit_lab", {})
    meta["peak_rss_mb"] = memory.mb
    peaks = cell_peaks(nb, memory)
    for i, peak in peaks:
        nb.cells[i].metadata.setdefault("circuit_lab", {})["peak_rss_mb"] = peak
    if peaks:
        i, peak = max(peaks, key=lambda p: p[1])
        meta["heaviest_cell"] = {"index": i, "first_line": first_line(nb.cells[i].source)[:120], "peak_rss_mb": peak}
    nbformat.write(nb, notebook)


_IN_FLIGHT: dict = {"runs": 0, "before": {}}
_IN_FLIGHT_LOCK = threading.Lock()


@contextmanager
def kernel_environment(values: dict[str, str]):
    """``values`` in this process's environment while its runs are in flight (each kernel inherits the environment
    when it starts): e.g. ``figures.DEFER_ENV``, so that kernels leave their figures as pending JSON and this process
    renders them after each run (``figures.render_pending``) through one browser kept for every run. Every variable is
    restored when the last run in flight ends (runs in threads share the environment), so nothing done later in this
    process (figures written at once, progress bars) sees the runner's settings."""
    with _IN_FLIGHT_LOCK:
        for key in values:
            _IN_FLIGHT["before"].setdefault(key, os.environ.get(key))
        os.environ.update(values)
        _IN_FLIGHT["runs"] += 1
    try:
        yield
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT["runs"] -= 1
            if _IN_FLIGHT["runs"] == 0:
                for key, value in _IN_FLIGHT["before"].items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                _IN_FLIGHT["before"] = {}


def task_note(results_json: Path) -> str:
    """'task NOT performed: …' when the template's results record a failed task check; the schema error when they
    cannot be read; else ''."""
    if not results_json.exists():
        return ""
    try:
        check = read_results(results_json).task_check
    except ResultsSchemaError as err:
        return str(err).splitlines()[0]
    if check is None or check.task_performed:
        return ""
    return "task NOT performed: " + "; ".join(check.reasons) + " (normalised numbers are not meaningful)"


if __name__ == "__main__":  # `python -m helpers.runner.run`, the documented command: the command line lives in helpers.runner.cli
    from helpers.runner.cli import main

    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.exit(main())
