"""The results each template writes (``<template>.json``) and the next ones read, as versioned pydantic schemas.

One model per template. ``Session.write_results`` validates a template's results before writing them (a template
that writes a key its schema does not know, or leaves one out, fails there, with the key named);
``load_results`` (later templates) and the report (``helpers.runner.report``) read typed objects through
``read_results``, which names the file, the key and the fix when a file does not match: a renamed or missing key
is an error, never a silently missing number.

Every section a later template or the report reads is typed field by field and refuses unknown keys; payloads
nobody reads back (tables for the notebook reader, per-prompt values) are typed loosely (``Any``). A template
this module does not know is read with ``TemplateResults`` (its common fields, extra keys kept), so a new template
shows up in the report before it has a schema. Bump ``SCHEMA_VERSION`` when a schema changes incompatibly:
files of another version are refused with "rerun the template".

Nothing here imports torch: the report reads every result file through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helpers.schema.artifacts import write_json
from helpers.schema.heads import Head, HeadScore

SCHEMA_VERSION = 2  # 1: the unversioned files written before the schemas (no "schema_version" key)

Matrix = list[list[float | None]]  # a [layer, head] (or [layer, position]) quantity; null where undefined


class ResultsSchemaError(ValueError):
    """A results JSON does not match its template's schema (message: file, key, fix)."""


class Strict(BaseModel):
    """A section of a results file: every key typed, unknown keys refused."""

    model_config = ConfigDict(extra="forbid")


class Loose(BaseModel):
    """A section whose other keys are kept as they are (payloads for the notebook reader)."""

    model_config = ConfigDict(extra="allow")


class BackupRiser(Strict):
    """A head whose DLA rose when the top head was ablated: a candidate backup head (``sections.backup_heads``)."""

    layer: int
    head: int
    dla_before: float | None
    dla_after: float | None
    in_circuit: bool | None = None  # minimal_circuit marks each riser in or out of its circuit

    @property
    def unit(self) -> Head:
        return Head(self.layer, self.head)

    @property
    def label(self) -> str:
        return self.unit.label


class TaskCheckResult(Loose):
    """``metrics.TaskCheck.to_json``: does the model do the task (the gate on every normalised number)."""

    task_performed: bool
    reasons: list[str] = Field(default_factory=list)


class TemplateResults(BaseModel):
    """What every results file holds; a template without a schema of its own is read as this (extra keys kept)."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    template: str
    model: str | None = None  # every known template writes it
    figures: list[str] = Field(default_factory=list)
    key_figures: list[str] = Field(default_factory=list)
    figures_missing: list[str] = Field(default_factory=list)  # of ``figures``: not rendered yet (kept as plotly JSON)
    task_check: TaskCheckResult | None = None  # what ``session.write_results`` adds for a per-task template, typed


class TaskResults(TemplateResults):
    """Results of a per-task template: the params they were computed with and the task check."""

    model_config = ConfigDict(extra="forbid")

    model: str
    params: dict[str, Any]

    @property
    def description(self) -> str | None:
        return self.params.get("description")


# ------------------------------------------------------------------------------------------------ circuit_expms


class LogitDiffResult(Strict):
    clean: float | None
    corrupted: float | None
    clean_accuracy: float | None
    clean_per_prompt: list[float | None]
    corrupted_per_prompt: list[float | None]


class DLAResultJson(Strict):
    identity_error: float | None
    layer_identity_error: float | None
    exact: bool
    caveats: dict[str, Any]
    frozen_scales: list[str] = []  # norm scales held at their values in the run (final norm; Gemma's post-norms)
    logit_lens: dict[str, float | None]
    logit_lens_vocabulary: Any = None
    layers: dict[str, float | None]  # "<layer>_attn_out" / "<layer>_mlp_out" / "embed" ... -> DLA
    heads: Matrix
    top_positive: list[HeadScore]
    top_negative: list[HeadScore]


class PatchingResult(Strict):
    values: dict[str, Any]  # sweep name -> normalised effects (layout in ``layouts``)
    layouts: dict[str, list[str]]
    top_heads: dict[str, list[HeadScore]]
    baselines: dict[str, float | None]
    normalisation: dict[str, Any]
    not_supported: dict[str, str]
    interventions: dict[str, Any]
    by_pos_heads: list[tuple[int, int]] | None = None  # the (layer, head) pairs the by-position sweeps ran over; None: all

    def head_out(self) -> Matrix | None:
        """Each head's output-patching effect [layer, head] (fraction of the logit difference it recovers)."""
        return self.values.get("head_out")


class PathPatchingResult(Strict):
    to_logits: Matrix
    top_senders: list[HeadScore]


class HeadScoresResult(Strict):
    values: dict[str, Matrix]  # prev_token / duplicate_token / induction -> [layer, head]
    top: dict[str, list[HeadScore]]
    seq_len: int


class BackupResultJson(Strict):
    ablated: Head
    logit_diff_before: float | None
    logit_diff_after: float | None
    ln_scale_ratio: float | None
    risers: list[BackupRiser]


class CircuitExpmsResults(TaskResults):
    template: Literal["circuit_expms"]
    prompts: dict[str, Any]
    logit_diff: LogitDiffResult
    dla: DLAResultJson
    patching: PatchingResult
    attribution_patching: dict[str, Any]
    path_patching: PathPatchingResult
    importance: dict[str, Any]
    templates: dict[str, Any]
    head_scores: HeadScoresResult
    backup: BackupResultJson
    layer_bands: dict[str, list[int]]

    def important_heads(self) -> list[Head]:
        """The union of the top DLA heads (both signs) and the top output-patching heads, in (layer, head) order."""
        ranked = self.dla.top_positive + self.dla.top_negative + self.patching.top_heads.get("head_out", [])
        return sorted({h.unit for h in ranked})


# ------------------------------------------------------------------------------------------------ head_functions


class RoleRow(Loose):
    """One head of the role table (``roles.assign_roles``): its role, the evidence, and the numbers behind it."""

    head: str
    role: str
    evidence: str
    patch_head_out: float | None = None


class RolesResult(Strict):
    thresholds: dict[str, float]
    table: list[RoleRow]
    summary: str


class HeadFunctionsResults(TaskResults):
    template: Literal["head_functions"]
    heads: list[Head]
    words: dict[str, Any]
    copy_scores: dict[str, Any]
    attention_vs_contribution: dict[str, Any]
    attention_between: dict[str, Any]
    weights: dict[str, Any]
    signals: dict[str, Any]
    roles: RolesResult


# ------------------------------------------------------------------------------------------------ induction_checks


class InductionChecksResults(TemplateResults):
    model_config = ConfigDict(extra="forbid")

    template: Literal["induction_checks"]
    model: str
    sequences: dict[str, int]
    scores: dict[str, Matrix]
    heads: dict[str, list[HeadScore]]  # score kind -> heads at or above its threshold
    thresholds: dict[str, float]
    loss: dict[str, float | None]
    head_detector_max_abs_diff: dict[str, float | None]
    k_composition: dict[str, Any]
    sentence: str


# ------------------------------------------------------------------------------------------------ circuit_discovery


class CurveResult(Loose):
    """``discovery.FaithfulnessCurve.to_json``: the areas the report shows (points kept as they are)."""

    method: str
    cpr: float | None
    cmd: float | None
    random_cpr: float | None
    random_cmd: float | None


class EdgeCircuitResult(Loose):
    method: str
    faithfulness: float | None
    n_edges: int
    heads: list[str]


class SmallestResult(Loose):
    """``discovery.Discovered.to_json``: the smallest circuit reaching the target, and its core heads."""

    circuit: EdgeCircuitResult
    target: float
    reached: bool
    core_heads: list[str]
    core_faithfulness: float | None
    random_core: list[float | None] = Field(default_factory=list)


class CircuitDiscoveryResults(TaskResults):
    template: Literal["circuit_discovery"]
    not_supported: str | None
    graph: dict[str, int] | None
    edge_definition: str | None = None  # what removing an edge does on this architecture (``edges.Graph.definition``)
    baselines: dict[str, float | None] | None
    timings: dict[str, Any]
    agreement_with_exact: dict[str, Any]  # method -> Spearman with exact single-edge patching
    exact_check: dict[str, Any] | None  # which edges were patched exactly: {"edges", "of", "how"} (every edge, or a sample)
    curves: dict[str, CurveResult]
    acdc: list[dict[str, Any]]
    smallest: SmallestResult | None


# ------------------------------------------------------------------------------------------------ minimal_circuit


class VersusRandomResult(Loose):
    beats_random: bool
    message: str


class MinimalBackupResult(Strict):
    ablated: Head
    logit_diff_after: float | None
    risers: list[BackupRiser]


class MinimalCircuitResults(TaskResults):
    template: Literal["minimal_circuit"]
    circuit: dict[str, Any]
    circuit_choice: dict[str, Any] | None
    ablation: str
    reference: str
    normalisation: Literal["ratio", "gap"]  # circuits.NORMALISATIONS: F(C)/F(M), or the share of the clean - corrupted gap
    alternative: dict[str, Any]  # the same circuit under the other intervention (mean ablation or patching from corrupted)
    interventions: list[dict[str, Any]]
    full_logit_diff: float | None
    faithfulness: dict[str, float | None]  # "circuit", "empty circuit", "random circuits (mean of N)", ...
    random_controls: list[float | None]
    versus_random: VersusRandomResult
    minimality: dict[str, Any]
    completeness: list[dict[str, Any]]
    path_patching: dict[str, Any]
    backup: MinimalBackupResult


# ------------------------------------------------------------------------------------------------ mlp_neurons


class NeuronResult(Loose):
    layer: int
    neuron: int


class NeuronDLAResult(Strict):
    identity_error: float | None
    caveats: dict[str, Any] = {}  # written before post-norm scales were frozen (now always exact)
    frozen_scales: list[str] = []  # norm scales held at their values in the run
    top: list[NeuronResult]


class NeuronPatchingResult(Strict):
    layers: list[int]
    exact: dict[str, dict[str, float | None]]
    estimate: Any
    spearman_estimate_vs_exact: float | None
    top: list[NeuronResult]
    checks: list[dict[str, Any]]


class MlpNeuronsResults(TaskResults):
    template: Literal["mlp_neurons"]
    layer_scores: dict[str, float | None]
    layers_patched: list[int]
    neuron_dla: NeuronDLAResult
    neuron_patching: NeuronPatchingResult
    top_activating: dict[str, Any]
    output_tokens: dict[str, Any]


SCHEMAS: dict[str, type[TemplateResults]] = {
    "circuit_expms": CircuitExpmsResults,
    "head_functions": HeadFunctionsResults,
    "induction_checks": InductionChecksResults,
    "circuit_discovery": CircuitDiscoveryResults,
    "minimal_circuit": MinimalCircuitResults,
    "mlp_neurons": MlpNeuronsResults,
}


TEMPLATE_OF: dict[type[TemplateResults], str] = {schema: template for template, schema in SCHEMAS.items()}


def schema_of(template: str) -> type[TemplateResults]:
    """The schema of ``template``'s results (``TemplateResults`` for a template without one)."""
    return SCHEMAS.get(template, TemplateResults)


def _mismatch(where: str, template: str, err: ValidationError, fix: str) -> ResultsSchemaError:
    lines = []
    for e in err.errors()[:8]:
        key = ".".join(str(part) for part in e["loc"]) or "(top level)"
        what = {"missing": "missing", "extra_forbidden": "not a key of this schema"}.get(e["type"], e["msg"])
        lines.append(f"  {key}: {what}")
    more = f"\n  … and {err.error_count() - 8} more" if err.error_count() > 8 else ""
    return ResultsSchemaError(
        f"{where} does not match the {template} results schema (version {SCHEMA_VERSION}):\n" + "\n".join(lines) + more + f"\n{fix}"
    )


def validate_results(template: str, data: dict, where: str = "results") -> TemplateResults:
    """``data`` (JSON-ready: ``artifacts.to_jsonable``) as ``template``'s typed results; ResultsSchemaError naming
    each wrong key otherwise. Used on write: a template's last cell fails here instead of writing a file no
    reader understands."""
    try:
        return schema_of(template).model_validate(data)
    except ValidationError as err:
        raise _mismatch(
            where, template, err, f"Fix the results the {template} template writes, or its schema in helpers/schema/results.py."
        ) from None


def read_results(path: Path | str, template: str | None = None) -> TemplateResults:
    """The typed results in ``path`` (``<template>.json``). ResultsSchemaError, naming the file, the keys and the fix
    (rerun the template), when it is not JSON, was written by another schema version, or does not match."""
    path = Path(path)
    template = template or path.stem
    rerun = f"Rerun the {template} template for this task and model (make run TEMPLATE={template}, or make all) to rewrite it."
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ResultsSchemaError(f"{path}: not a readable results file ({err}). {rerun}") from None
    if not isinstance(data, dict):
        raise ResultsSchemaError(f"{path}: a results file is a JSON object, not {type(data).__name__}. {rerun}")
    version = data.get("schema_version", 1)
    if template in SCHEMAS and version != SCHEMA_VERSION:  # a template without a schema is read as it is
        raise ResultsSchemaError(
            f"{path}: written with results schema version {version}; this code reads version {SCHEMA_VERSION}. {rerun}"
        )
    try:
        return schema_of(template).model_validate(data)
    except ValidationError as err:
        raise _mismatch(str(path), template, err, rerun) from None


def set_missing_figures(path: Path, missing: list[str]) -> None:
    """Record in the results file ``path`` which of its ``figures`` are not rendered (``figures_missing``; the key is
    dropped once none is). Nothing happens where the file does not exist (a template that wrote no results)."""
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if sorted(missing) == sorted(data.get("figures_missing", [])):
        return
    if missing:
        data["figures_missing"] = sorted(missing)
    else:
        data.pop("figures_missing", None)
    write_json(path, data, digits=None)
