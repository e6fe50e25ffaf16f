"""Experiment set-ups the templates call: each function is one notebook section's computation.

Templates hold the narrative and the plots; the quantities are computed here so that every template, and
the tests, use one implementation.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from . import OUTPUTS_DIR
from .artifacts import to_jsonable, write_json
from .attribution import (
    decomposition_caveats,
    dla_hook_names,
    full_dla,
    head_dla,
    layer_dla,
    logit_diff_direction,
    logit_lens,
    unembed_bias_diff,
)
from .components import Head, rank_heads
from .figures import Figures, choose_renderer
from .hooks import run_with_checked_cache
from .interventions import Intervention, hooks_for
from .layout import model_folder_name, owner, scope_of
from .metrics import TaskCheck, check_task, group_mean, logit_diff
from .models import load_model, set_threads
from .params import TaskParams, load_params
from .prompts import PromptSet, make_prompts
from .results import SCHEMA_VERSION, CircuitExpmsResults, TemplateResults, read_results, validate_results


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
        template's schema (``helpers.results``): a key the schema does not know, or a missing one, fails here."""
        check = {"task_check": self.task_check.to_json()} if self.task_check else {}
        data = to_jsonable({**results, **check})
        validate_results(template, data, where=f"the results of {template}")
        return write_json(self.out_dir / f"{template}.json", {"schema_version": SCHEMA_VERSION, **data})


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
    torch.manual_seed(0)
    params = load_params(params_file or task, model=model_name, n_prompts=n_prompts)
    model = load_model(params.model, device=device, dtype=dtype)
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

    clean: Float[Tensor, batch]
    corrupted: Float[Tensor, batch]
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
    if s._logit_diffs is not None:
        return s._logit_diffs
    with torch.no_grad():
        clean_logits = s.model(s.prompts.clean_tokens)
        corr_logits = s.model(s.prompts.corrupted_tokens)
    top = clean_logits[:, -1].argmax(-1)
    acc = (top == s.prompts.answer_tokens[:, 0]).float().mean().item()
    s._logit_diffs = LogitDiffs(
        logit_diff(clean_logits, s.prompts.answer_tokens).cpu(), logit_diff(corr_logits, s.prompts.answer_tokens).cpu(), acc
    )
    return s._logit_diffs


@dataclass
class DLAResult:
    """Direct logit attribution of the clean run, averaged over prompts."""

    cache: ActivationCache
    lens: Float[Tensor, component]
    lens_labels: list[str]
    layers: Float[Tensor, component]
    layer_labels: list[str]
    heads: Float[Tensor, "layer head"]
    identity_error: float  # max over prompts |sum of all components + bias diff - logit diff|
    logit_diff: float  # mean clean logit difference of the same forward pass
    layer_identity_error: float = 0.0  # the same for the per-layer decomposition (embeddings, attention, MLP outputs)
    caveats: dict[str, str] = field(default_factory=dict)  # why the decomposition is not exact here (empty: exact)
    heads_per_prompt: Float[Tensor, "layer head batch"] | None = None  # per-head DLA of each prompt (``heads`` is its mean)

    @property
    def exact(self) -> bool:
        return not self.caveats

    def summary(self) -> str:
        """One honest line: the identity errors, and the architecture's caveats if any."""
        line = (
            f"DLA identity: max |sum of components + bias diff - logit diff| = {self.identity_error:.2e} (per head), "
            f"{self.layer_identity_error:.2e} (per layer), against a mean logit diff of {self.logit_diff:.3f}"
        )
        if self.caveats:
            line += "\nNOT an exact decomposition on this architecture:\n" + "\n".join(f"  - {k}: {v}" for k, v in self.caveats.items())
        return line


@torch.no_grad()  # weights require grad; these numbers are read, never differentiated
def direct_logit_attribution(s: Session) -> DLAResult:
    """Logit lens, per-layer and per-head DLA of the clean prompts, and the DLA identity error."""
    logits, cache = run_with_checked_cache(s.model, s.prompts.clean_tokens, dla_hook_names(s.model))
    direction = logit_diff_direction(s.model, s.prompts.answer_tokens)
    lens, lens_labels = logit_lens(cache, direction)
    layers, layer_labels = layer_dla(cache, direction)
    heads = head_dla(s.model, cache, direction)
    full, _ = full_dla(cache, direction)
    bias = unembed_bias_diff(s.model, s.prompts.answer_tokens)
    ld = logit_diff(logits, s.prompts.answer_tokens)
    error = (full.sum(0) + bias - ld).abs().max().item()
    layer_error = (layers.sum(0) + bias - ld).abs().max().item()
    return DLAResult(
        cache,
        lens.mean(-1).cpu(),
        lens_labels,
        layers.mean(-1).cpu(),
        layer_labels,
        heads.mean(-1).cpu(),
        error,
        ld.mean().item(),
        layer_error,
        decomposition_caveats(s.model),
        heads.detach().cpu(),
    )


def template_breakdown(
    s: Session, ld: LogitDiffs, dla: DLAResult | None = None, head_out: Float[Tensor, "template layer head"] | None = None
) -> pd.DataFrame:
    """One row per sentence template of the task: its prompts' clean and corrupted logit differences and accuracy,
    and (when given) its top DLA head and its top output-patching head (``patching.run_sweep(groups=...)``, each
    normalised by that template's own baselines). A template that behaves unlike the others shows here."""
    rows = []
    for i, (name, mask) in enumerate(s.prompts.template_masks().items()):
        row = {
            "template": name,
            "prompts": int(mask.sum()),
            "clean logit diff": float(ld.clean[mask].mean()),
            "corrupted logit diff": float(ld.corrupted[mask].mean()),
            "accuracy (logit diff > 0)": float((ld.clean[mask] > 0).float().mean()),
        }
        if dla is not None and dla.heads_per_prompt is not None:
            row["top DLA head"] = str(rank_heads(dla.heads_per_prompt[..., mask].mean(-1), 1, "abs")[0])
        if head_out is not None:
            row["top output-patching head"] = str(rank_heads(head_out[i], 1, "abs")[0])
        rows.append(row)
    return pd.DataFrame(rows).set_index("template")


def layer_bands(s: Session) -> dict[str, list[int]]:
    """The params' layer groups, or early/middle/late thirds of the layers."""
    if s.params.analysis.layer_groups:
        return s.params.analysis.layer_groups
    n = s.model.cfg.n_layers
    cuts = [0, -(-n // 3), -(-2 * n // 3), n]
    names = ["early", "middle", "late"]
    return {names[i]: list(range(cuts[i], cuts[i + 1])) for i in range(3) if cuts[i] < cuts[i + 1]}


@dataclass(frozen=True, order=True)
class BackupRiser(Head):
    """A head whose DLA rose when another head was ablated: a candidate backup head."""

    dla_before: float = 0.0
    dla_after: float = 0.0

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "dla_before": round(self.dla_before, 6), "dla_after": round(self.dla_after, 6)}


@dataclass
class BackupResult:
    """Per-head DLA before and after mean-ablating one head at the final position."""

    ablated: Head
    dla_before: Float[Tensor, "layer head"]
    dla_after: Float[Tensor, "layer head"]
    logit_diff_before: float
    logit_diff_after: float
    ln_scale_ratio: float  # mean final-LN scale after / before at the final position
    risers: list[BackupRiser] = field(default_factory=list)


@torch.no_grad()  # weights require grad; these numbers are read, never differentiated
def backup_heads(s: Session, dla: DLAResult, head: Head, k: int) -> BackupResult:
    """Mean-ablate ``head`` at the final position (mean over the prompts of each template) and recompute every head's DLA.

    Heads whose DLA rises when the top head is gone are candidate backup heads (IOI paper §3.4). The final
    LN scale ratio shows how much of a change is only the LayerNorm re-normalising the residual stream.
    """
    end = s.prompts.n_pos - 1
    head = Head.of(head)
    name = get_act_name("z", head.layer)
    z = dla.cache[name]
    where = torch.zeros(1, *z.shape[1:3], 1, dtype=torch.bool)  # [variant, pos, head, d_head]
    where[0, end, head.head] = True
    ablation = Intervention(name, "mean", where)
    with s.model.hooks(fwd_hooks=hooks_for([ablation], {"mean": {name: group_mean(z, s.prompts.templates)}}, 1)):
        logits, cache = run_with_checked_cache(s.model, s.prompts.clean_tokens, dla_hook_names(s.model))
    direction = logit_diff_direction(s.model, s.prompts.answer_tokens)
    after = head_dla(s.model, cache, direction).mean(-1).cpu()
    delta = after - dla.heads
    delta[head.index] = float("-inf")  # the ablated head is not its own backup
    risers = [BackupRiser(h.layer, h.head, float(dla.heads[h.index]), float(after[h.index])) for h in rank_heads(delta, k, "pos")]
    scale_before = dla.cache["ln_final.hook_scale"][:, end].mean().item()
    scale_after = cache["ln_final.hook_scale"][:, end].mean().item()
    return BackupResult(
        head,
        dla.heads,
        after,
        dla.logit_diff,
        logit_diff(logits, s.prompts.answer_tokens).mean().item(),
        scale_after / scale_before,
        risers,
    )


class MissingResults(FileNotFoundError):
    """A template's input JSON (written by an earlier template) is missing."""


def load_results(s: Session, template: str) -> TemplateResults:
    """The typed results ``template`` wrote next to this notebook (``helpers.results``), for the same parameters
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


def important_heads(s: Session, circuit: CircuitExpmsResults, override: list[str] | None = None) -> list[Head]:
    """Heads to analyse: ``override`` labels, else the union of the top DLA (both signs) and output-patching heads."""
    if override:
        return [Head.parse(h, s.model.cfg.n_layers, s.model.cfg.n_heads) for h in override]
    return circuit.important_heads()


__all__ = [
    "Session",
    "start_session",
    "logit_diffs",
    "direct_logit_attribution",
    "layer_bands",
    "backup_heads",
    "load_results",
    "important_heads",
]
