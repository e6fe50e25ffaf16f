"""A template's session: params, model, prompts, output folder and figure saver, and the results hand-off.

``start_session`` is the first cell of every template: it loads the params (with the notebook's overrides), the
model and the prompts, runs the task check (does the model do the task? every normalised number depends on it),
and returns the ``Session`` later cells work on. ``Session.write_results`` validates and writes the template's
JSON (``helpers.schema.results``); ``load_results`` reads an earlier template's, typed, for the same parameters.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from helpers import OUTPUTS_DIR
from helpers.engine.hooks import UNEMBED_LAST
from helpers.engine.memory import release_after_each_cell
from helpers.engine.metrics import TaskCheck, check_task, logit_diff
from helpers.notebook.figures import Figures, choose_renderer
from helpers.schema.artifacts import to_jsonable, write_json
from helpers.schema.heads import Head
from helpers.schema.outputs import model_folder_name, owner, scope_of
from helpers.schema.results import SCHEMA_VERSION, TemplateResults, read_results, validate_results
from helpers.task.models import describe_weights, load_model, set_threads
from helpers.task.params import TaskParams, load_params
from helpers.task.prompts import PromptSet, make_prompts


@dataclass
class Session:
    """What a template works on: params, model, prompts, output folder and figure saver."""

    params: TaskParams
    model: object
    prompts: PromptSet
    out_dir: Path
    figures: Figures
    model_name: str
    input_dir: Path  # where the JSON of earlier templates is read from
    task_check: TaskCheck | None = None  # does the model do the task (set by start_session)
    _logit_diffs: LogitDiffs | None = field(default=None, repr=False)

    @property
    def head_names(self) -> list[str]:
        return [h.label for h in Head.all(self.model.cfg.n_layers, self.model.cfg.n_heads)]

    def write_results(self, template: str, results: dict) -> Path:
        """Write ``<output folder>/<template>.json`` with the task check added (``task_check.task_performed``; none
        for a per-model template, whose results do not depend on the task), after validating it against the
        template's schema (``helpers.schema.results``): a key the schema does not know, or a missing one, fails here. The
        figures that could not be written are listed (``figures_missing``; ``figures.Figures.show``)."""
        check = {"task_check": self.task_check.to_json()} if self.task_check else {}
        missing = {"figures_missing": list(self.figures.missing)} if self.figures.missing else {}
        data = to_jsonable({"schema_version": SCHEMA_VERSION, **results, **check, **missing})
        validate_results(template, data, where=f"the results of {template}")
        return write_json(self.out_dir / f"{template}.json", data)


def start_session(
    template: str,
    task: str,
    params_file: str | None = None,
    model_name: str | None = None,
    n_prompts: int | None = None,
    output_dir: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    static_images: bool = True,
    input_dir: str | None = None,
    dtype: str = "float32",
) -> Session:
    """Load params (with overrides), the model and the prompts; create the output folder.

    Figures of ``template`` go to ``<output folder>/<template>_figures/``. Earlier templates' JSON is read
    from ``input_dir`` (default: the output folder; the runner writes to a staging folder and passes the
    published one).
    """
    set_threads(threads)
    # tqdm.auto (the weight-loading bars of transformers) warns in kernels without ipywidgets; its bars work as text.
    # Set here, in the notebook, not on import of helpers (a library import changes no global warning filter).
    warnings.filterwarnings("ignore", message="IProgress not found")
    release_after_each_cell()  # a long notebook's memory tracks what it holds (helpers.engine.memory)
    params = load_params(params_file or task, model=model_name, n_prompts=n_prompts)
    torch.manual_seed(params.seed)  # whatever draws from torch's global generator in the notebook follows the params
    model = load_model(params.model, device=device, dtype=dtype)
    if weights := describe_weights(params.model):  # a real model: which weights ran (GGUF dequantised, or the hub's)
        print(f"Weights: {weights}")
    prompts = make_prompts(params, model.tokenizer, prepend_bos=model.cfg.default_prepend_bos).to(model.cfg.device)
    per_model = scope_of(template) == "model"  # runs once per model: no task check, results in _models/<model>/
    out = (
        Path(output_dir)
        if output_dir
        else OUTPUTS_DIR / owner(params.task, "model" if per_model else "task") / model_folder_name(params.model)
    )
    out.mkdir(parents=True, exist_ok=True)
    choose_renderer()
    s = Session(
        params,
        model,
        prompts,
        out,
        Figures(out, folder=f"{template}_figures", static=static_images),
        params.model,
        Path(input_dir) if input_dir else out,
    )
    if per_model:
        return s
    ld = logit_diffs(s)
    s.task_check = check_task(ld.clean, ld.corrupted, ld.clean_accuracy, params.analysis.min_accuracy, params.analysis.min_gap)
    if not s.task_check.performed:
        s.figures.note = "model does not do this task: normalised values are not meaningful"
    show_task_check(s.task_check, params)
    return s


def show_task_check(check: TaskCheck, params: TaskParams) -> None:
    """One line when the model does the task; a prominent banner (HTML in notebooks, text elsewhere) when not."""
    if check.performed:
        print(f"Task check: {check.summary()}")
        return
    text = (
        f"THE MODEL DOES NOT DO THIS TASK: {'; '.join(check.reasons())}. Every normalised number in this notebook "
        "(patching 'recovered', faithfulness, head importance) divides by a clean - corrupted gap the model does not "
        "produce, so it is not evidence of a mechanism whatever its size. Use a model trained on the task, or check the "
        f"template and answers of {params.source.name}; the thresholds are analysis.min_accuracy "
        f"({check.min_accuracy}) and analysis.min_gap ({check.min_gap})."
    )
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        if get_ipython() is not None:
            display(
                HTML(
                    '<div style="border:3px solid #c62828;background:#ffebee;color:#b71c1c;padding:12px;'
                    f'font-size:1.1em"><b>&#9888; Task check failed.</b> {html.escape(text)}</div>'
                )
            )
            return
    except ImportError:
        pass
    print(f"WARNING: {text}")


@dataclass
class LogitDiffs:
    """Per-prompt logit differences of the clean and corrupted runs."""

    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    clean_accuracy: float  # fraction of prompts where the correct answer is the top token

    def table(self, prompts: PromptSet) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "clean prompt": prompts.clean_prompts,
                "corrupted prompt": prompts.corrupted_prompts,
                "clean logit diff": self.clean.cpu().numpy().round(3),
                "corrupted logit diff": self.corrupted.cpu().numpy().round(3),
            }
        )


def logit_diffs(s: Session) -> LogitDiffs:
    """Clean and corrupted logit differences, and how often the correct answer is the argmax (computed once per session)."""
    if s._logit_diffs is None:
        s._logit_diffs = compute_logit_diffs(s.model, s.prompts)
    return s._logit_diffs


def compute_logit_diffs(model, prompts: PromptSet) -> LogitDiffs:
    """Clean and corrupted logit differences of ``prompts`` on ``model``, and how often the correct answer is the argmax
    (the whole vocabulary, at the final position only: Gemma-3's 262k-word unembedding of every position took half of
    this check's time)."""
    with torch.no_grad(), model.hooks(fwd_hooks=[UNEMBED_LAST]):
        clean_logits = model(prompts.clean_tokens)
        corr_logits = model(prompts.corrupted_tokens)
    top = clean_logits[:, -1].argmax(-1)
    acc = (top == prompts.answer_tokens[:, 0]).float().mean().item()
    return LogitDiffs(logit_diff(clean_logits, prompts.answer_tokens).cpu(), logit_diff(corr_logits, prompts.answer_tokens).cpu(), acc)


def task_check_of(model, prompts: PromptSet, params: TaskParams) -> TaskCheck:
    """Does ``model`` do the task of ``params`` on ``prompts`` (``helpers.engine.metrics.TaskCheck``)."""
    ld = compute_logit_diffs(model, prompts)
    return check_task(ld.clean, ld.corrupted, ld.clean_accuracy, params.analysis.min_accuracy, params.analysis.min_gap)


class MissingResults(FileNotFoundError):
    """A template's input JSON (written by an earlier template) is missing."""


def load_results(s: Session, template: str) -> TemplateResults:
    """The typed results ``template`` wrote next to this notebook (``helpers.schema.results``), for the same parameters
    (task, model, prompts, …) as this session; a clear error naming the command that writes it when it is
    missing, does not match its schema, or was computed with other parameters."""
    path = s.input_dir / f"{template}.json"
    if not path.exists():
        raise MissingResults(
            f"{path} not found: run the {template} template for this task and model first "
            f"(make run TASK={s.params.task} MODEL={s.model_name} TEMPLATE={template}, or make all)"
        )
    results = read_results(path, template)
    mine = to_jsonable(s.params)
    theirs = getattr(results, "params", None)
    if isinstance(theirs, dict) and theirs != mine:  # e.g. another n_prompts or model: its numbers are for other prompts
        differing = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise MissingResults(
            f"{path} was computed with other parameters ({', '.join(differing)} differ from this notebook's): "
            f"rerun the {template} template with these parameters first (make run TASK={s.params.task} "
            f"MODEL={s.model_name} TEMPLATE={template}, or make all)"
        )
    return results
