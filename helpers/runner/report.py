"""The batch report: ``nb_outputs/index.html``, one self-contained page (inline CSS, images embedded, no scripts).

Per task and model: the key numbers (clean/corrupted logit difference, faithfulness when ``minimal_circuit``
ran), the top heads by DLA and by output patching, the role table, and thumbnails of each template's key
figures linking to that executed notebook's HTML. The **cross-task view** answers "which heads do tasks
share?": per model, a heads × tasks matrix of importance (the output-patching effect of each head, i.e. the
fraction of the logit difference it recovers) and the pairwise Jaccard overlap of the tasks' top-k heads.
Templates the report does not know get a card with their thumbnails and link, so new templates show up too.
``python -m helpers.runner.report [--outputs DIR]`` rebuilds it without running anything.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from helpers.schema.heads import HeadScore, rank_heads
from helpers.schema.outputs import MODEL_SCOPE, outputs_dir
from helpers.schema.results import (
    TEMPLATE_OF,
    CircuitDiscoveryResults,
    CircuitExpmsResults,
    HeadFunctionsResults,
    InductionChecksResults,
    MinimalCircuitResults,
    MlpNeuronsResults,
    ResultsSchemaError,
    TaskCheckResult,
    TemplateResults,
    read_results,
    set_missing_figures,
)

TOP_K = 5  # heads per task in the overlap view
T = TypeVar("T", bound=TemplateResults)
THUMB_WIDTH = 520  # px: axis labels and head names stay readable; each thumbnail opens the full-size PNG


@dataclass
class ResultFolder:
    """The typed results of every template run for one task and model (``nb_outputs/<task>/<model>/``)."""

    task: str
    model: str
    path: Path
    results: dict[str, TemplateResults]  # template name -> its results (``helpers.schema.results``)
    errors: dict[str, str] = field(default_factory=dict)  # template name -> why its JSON could not be read
    per_model: ResultFolder | None = None  # the model's once-per-model results (``_models/<model>/``)

    def of(self, template: str) -> TemplateResults | None:
        """A template's results (the per-model folder's for a per-model template), or None when it did not run."""
        if template in self.results or self.per_model is None:
            return self.results.get(template)
        return self.per_model.results.get(template)


def _folder(task: str, model_dir: Path) -> ResultFolder | None:
    results, errors = {}, {}
    for f in sorted(model_dir.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as err:
            errors[f.stem] = f"{f}: not readable JSON ({err})"
            continue
        if not (isinstance(data, dict) and data.get("template") == f.stem):
            continue  # not a template's results (e.g. circuit.json, edge_circuit.json)
        try:
            results[f.stem] = read_results(f)
        except ResultsSchemaError as err:
            errors[f.stem] = str(err)
    return ResultFolder(task, model_dir.name, model_dir, results, errors) if results or errors else None


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []


def collect_per_model(root: Path) -> dict[str, ResultFolder]:
    """Per model: the results of the templates that run once per model (``<root>/_models/<model>/``)."""
    found = {d.name: _folder(MODEL_SCOPE, d) for d in _subfolders(root / MODEL_SCOPE)}
    return {model: folder for model, folder in found.items() if folder}


def collect(root: Path) -> list[ResultFolder]:
    """Every ``<task>/<model>/`` folder under ``root`` holding at least one template's JSON, each linked to its
    model's per-model results."""
    per_model = collect_per_model(root)
    folders = []
    for task_dir in _subfolders(root):
        if task_dir.name == MODEL_SCOPE:
            continue
        for model_dir in _subfolders(task_dir):
            folder = _folder(task_dir.name, model_dir)
            if folder:
                folder.per_model = per_model.get(folder.model)
                folders.append(folder)
    return folders


# ---------------------------------------------------------------- cross-task numbers


def _typed(folder: ResultFolder, cls: type[T]) -> T | None:
    """The folder's results of the template ``cls`` is the schema of, or None when that template did not run."""
    found = folder.of(TEMPLATE_OF[cls])
    return found if isinstance(found, cls) else None


def head_importance(folder: ResultFolder) -> list[HeadScore]:
    """Every head's output-patching effect (fraction of the logit difference recovered), largest |effect| first;
    [] without circuit_expms (or when its head_out sweep was not supported)."""
    circuit = _typed(folder, CircuitExpmsResults)
    values = circuit.patching.head_out() if circuit else None
    return rank_heads(values, None, "abs") if values is not None else []


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass
class CrossTask:
    """One model's heads × tasks importance matrix and the tasks' pairwise top-k Jaccard overlap."""

    model: str
    tasks: list[str]
    heads: list[str]
    importance: np.ndarray  # [head, task]
    overlap: np.ndarray  # [task, task]
    top: dict[str, list[str]]


def task_check(folder: ResultFolder) -> TaskCheckResult | None:
    """The task check recorded by any template of the folder (``task_performed``, reasons), or None."""
    for template in ("circuit_expms", *sorted(folder.results)):
        check = getattr(folder.of(template), "task_check", None)
        if check:
            return check
    return None


def performed(folder: ResultFolder) -> bool:
    """False only when a template recorded that the model does not do the task."""
    check = task_check(folder)
    return check is None or check.task_performed


def cross_task(folders: list[ResultFolder], k: int = TOP_K) -> list[CrossTask]:
    """Per model with ≥1 task that ran circuit_expms; heads listed when in some task's top k, strongest first.
    Tasks the model does not do (task check failed) are left out: their head importances are noise."""
    views = []
    for model in sorted({f.model for f in folders}):
        ranked = {f.task: head_importance(f) for f in folders if f.model == model and performed(f)}
        per_task = {t: {h.label: h.value for h in heads} for t, heads in ranked.items() if heads}
        if not per_task:
            continue
        tasks = sorted(per_task)
        top = {t: [h.label for h in ranked[t][:k]] for t in tasks}
        heads = sorted(set().union(*top.values()), key=lambda h: -max(abs(per_task[t].get(h, 0.0)) for t in tasks))
        importance = np.array([[per_task[t].get(h, np.nan) for t in tasks] for h in heads])
        overlap = np.array([[jaccard(set(top[a]), set(top[b])) for b in tasks] for a in tasks])
        views.append(CrossTask(model, tasks, heads, importance, overlap, top))
    return views


# ---------------------------------------------------------------- HTML pieces


def colour(value: float, scale: float) -> str:
    """Background for a signed value: blue positive, red negative, white at 0 (like the notebooks' RdBu maps)."""
    if value is None or not np.isfinite(value) or scale <= 0:
        return "#f4f4f4"
    a = min(abs(value) / scale, 1.0)
    r, g, b = (33, 102, 172) if value > 0 else (178, 24, 43)
    mix = lambda c: round(255 - a * (255 - c))
    return f"rgb({mix(r)},{mix(g)},{mix(b)})"


def table(header: list[str], rows: list[list], colours: list[list[str | None]] | None = None, cls: str = "") -> str:
    """An HTML table (pandas' Styler): cells escaped, floats shown to 3 decimals, optional per-cell backgrounds."""
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    styler = frame.style.hide(axis="index").format(
        lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)), escape="html"
    )
    if colours:
        css = [[f"background-color: {c}" if c else "" for c in row] for row in colours]
        styler = styler.apply(lambda _: pd.DataFrame(css, index=frame.index, columns=frame.columns), axis=None)
    uid = hashlib.sha1(repr((header, rows, colours, cls)).encode()).hexdigest()[:10]  # ids unique per table, stable per content
    return styler.set_uuid(uid).set_table_attributes(f'class="{cls}"').to_html()


def thumbnail(png: Path, width: int = THUMB_WIDTH) -> str:
    """A PNG shrunk to ``width`` px, as a data URI (keeps the page small and self-contained)."""
    from PIL import Image

    with Image.open(png) as img:
        img = img.convert("RGB")
        img.thumbnail((width, width * 4))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_links(folder: ResultFolder, root: Path, template: str, limit: int = 3) -> str:
    """Thumbnails of a template's key figures (else its first ones), each opening the full-size PNG; the title
    links to the notebook's HTML."""
    data = folder.results[template]
    figs = data.key_figures or data.figures[:limit]
    link = html.escape(str((folder.path / f"{template}.html").relative_to(root)))
    items = []
    for rel in figs:
        png = folder.path / rel
        if png.suffix == ".png" and png.exists():
            full = html.escape(str(png.relative_to(root)))
            items.append(
                f'<a href="{full}" title="{html.escape(png.stem)}: open full size"><img src="{thumbnail(png)}" '
                f'alt="{html.escape(png.stem)}"></a>'
            )
    items = items or ['<span class="muted">(no static images: Chromium missing when it ran)</span>']
    if data.figures_missing:
        names = ", ".join(Path(m).name for m in data.figures_missing)
        items.insert(
            0,
            f'<p class="failed">{len(data.figures_missing)} of {len(data.figures)} figures not rendered ({html.escape(names)}): '
            "kept as plotly JSON next to where they belong; <code>make report</code> renders them once a browser works</p>",
        )
    return f'<div class="fig"><h4><a href="{link}">{html.escape(template)}</a></h4>{"".join(items)}</div>'


@dataclass(frozen=True)
class RunResources:
    """What one template's run took: papermill's execution time (s), the kernel's peak resident memory (MB) and
    the code cell that needed the most ("cell N (first line)"), read from the published notebook; None where not
    recorded (older notebooks, runs outside the runner)."""

    seconds: float | None = None
    peak_mb: float | None = None
    heaviest_cell: str | None = None


def run_resources(folder: ResultFolder, template: str) -> RunResources:
    """The resources of ``template``'s run in ``folder`` (see ``RunResources``)."""
    try:
        meta = json.loads((folder.path / f"{template}.ipynb").read_text())["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return RunResources()
    seconds, ours = meta.get("papermill", {}).get("duration"), meta.get("circuit_lab", {})
    peak, heaviest = ours.get("peak_rss_mb"), ours.get("heaviest_cell")
    return RunResources(
        None if seconds is None else float(seconds),
        None if peak is None else float(peak),
        f"cell {heaviest['index']} ({heaviest['first_line']}): {heaviest['peak_rss_mb'] / 1024:.2f} GB" if heaviest else None,
    )


def runs_table(folder: ResultFolder, root: Path) -> str:
    """One row per template run in the folder: its execution time, its kernel's peak memory (and the cell that
    needed it) and links to the notebook."""
    rows, total, most = [], 0.0, 0.0
    for template in folder.results:
        used = run_resources(folder, template)
        total, most = total + (used.seconds or 0.0), max(most, used.peak_mb or 0.0)
        rows.append(
            f"<tr><td>{html.escape(template)}</td><td>{'' if used.seconds is None else f'{used.seconds:.0f} s'}</td>"
            f"<td>{'' if used.peak_mb is None else f'{used.peak_mb / 1024:.2f} GB'}</td>"
            f"<td><small>{html.escape(used.heaviest_cell or '')}</small></td>"
            f'<td><a href="{html.escape(str((folder.path / f"{template}.html").relative_to(root)))}">html</a> · '
            f'<a href="{html.escape(str((folder.path / f"{template}.ipynb").relative_to(root)))}">ipynb</a></td></tr>'
        )
    return (
        f'<table class="runs"><thead><tr><th>notebook</th><th>run time</th><th>peak memory</th><th>heaviest cell</th><th>open</th></tr></thead><tbody>{"".join(rows)}'
        f"<tr><td><b>total</b></td><td><b>{total:.0f} s</b></td><td><b>{f'{most / 1024:.2f} GB' if most else ''}</b></td><td></td><td></td></tr></tbody></table>"
    )


def head_list(heads: list[HeadScore] | None) -> str:
    return ", ".join(f"{h.label} ({h.value:+.2f})" for h in heads or []) or "—"


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def key_numbers(folder: ResultFolder) -> list[list]:
    """Rows (quantity, value) of the numbers a reader checks first."""
    circuit, minimal = _typed(folder, CircuitExpmsResults), _typed(folder, MinimalCircuitResults)
    induction = _typed(folder, InductionChecksResults)
    named = []
    if circuit:
        named += [
            ("clean logit diff", circuit.logit_diff.clean),
            ("corrupted logit diff", circuit.logit_diff.corrupted),
            ("clean accuracy", circuit.logit_diff.clean_accuracy),
            ("DLA identity error", circuit.dla.identity_error),
        ]
    if minimal:
        named.append(("faithfulness of the circuit", minimal.faithfulness.get("circuit")))
    if induction:
        named.append(("loss on the repeat (induction)", induction.loss.get("second_half")))
    rows = [[name, float(value)] for name, value in named if value is not None]
    if minimal:
        rows += [[f"faithfulness, {name}", _number(v)] for name, v in minimal.faithfulness.items() if name.startswith("random")]
    return rows


def role_rows(folder: ResultFolder) -> list[list]:
    functions = _typed(folder, HeadFunctionsResults)
    rows = functions.roles.table if functions else []
    return [[r.head, r.role, r.evidence] for r in sorted(rows, key=lambda r: r.role == "unclassified")]


def errors_section(folder: ResultFolder) -> str:
    """A prominent box per results file that could not be read (schema mismatch, old version, broken JSON)."""
    return "".join(
        f'<p class="failed"><b>&#9888; {html.escape(t)}.json could not be read</b>: <code>{html.escape(why)}</code></p>'
        for t, why in folder.errors.items()
    )


def folder_section(folder: ResultFolder, root: Path) -> str:
    """The card of one task × model."""
    parts = [
        f'<section class="card" id="{html.escape(folder.task)}-{html.escape(folder.model)}">',
        f"<h2>{html.escape(folder.task)} · {html.escape(folder.model)}</h2>",
        errors_section(folder),
    ]
    circuit, functions = _typed(folder, CircuitExpmsResults), _typed(folder, HeadFunctionsResults)
    minimal = _typed(folder, MinimalCircuitResults)
    description = (circuit and circuit.description) or (functions and functions.description)
    if description:
        parts.append(f'<p class="muted">{html.escape(description)}</p>')
    check = task_check(folder)
    if check and not check.task_performed:
        parts.append(
            '<p class="failed"><b>&#9888; The model does not do this task</b>: '
            f"{html.escape('; '.join(check.reasons))}. Normalised numbers below (patching, faithfulness, "
            "head importance) are not meaningful.</p>"
        )
    if minimal and not minimal.versus_random.beats_random:
        parts.append(f'<p class="failed"><b>&#9888; Circuit no better than chance</b>: {html.escape(minimal.versus_random.message)}</p>')
    if functions and functions.roles.summary.startswith("No head met"):
        parts.append(f'<p class="muted"><b>No head roles</b>: {html.escape(functions.roles.summary)}</p>')
    numbers = key_numbers(folder)
    if numbers:
        parts.append(table(["quantity", "value"], numbers, cls="numbers"))
    if circuit:
        rows = [
            ["DLA, positive", head_list(circuit.dla.top_positive)],
            ["DLA, negative", head_list(circuit.dla.top_negative)],
            ["output patching", head_list(circuit.patching.top_heads.get("head_out"))],
        ]
        parts.append(table(["top heads by", "heads (value)"], rows, cls="heads"))
    parts.append(discovery_table(folder))
    parts.append(neuron_table(folder))
    parts.append(induction_table(folder))
    roles = role_rows(folder)
    if roles:
        parts.append("<h3>Head roles</h3>" + table(["head", "role", "evidence"], roles, cls="roles"))
    parts.append(runs_table(folder, root))
    if folder.per_model:
        parts.append(
            f'<p class="muted">Per-model notebooks ({", ".join(folder.per_model.results)}): see '
            f'<a href="#{MODEL_SCOPE}-{html.escape(folder.model)}">{html.escape(folder.model)}</a>.</p>'
        )
    parts.append('<div class="figs">' + "".join(figure_links(folder, root, t) for t in folder.results) + "</div>")
    return "\n".join(parts + ["</section>"])


def neuron_list(neurons: list, key: str) -> str:
    return ", ".join(f"L{n.layer}N{n.neuron} ({_number(getattr(n, key, None)):+.2f})" for n in neurons) or "—"


def neuron_table(folder: ResultFolder, k: int = TOP_K) -> str:
    """Top neurons by DLA and by patching ('' without mlp_neurons results)."""
    found = _typed(folder, MlpNeuronsResults)
    if found is None:
        return ""
    layers = found.layers_patched
    return table(
        ["top neurons by", "neurons (value)"],
        [
            ["neuron DLA", neuron_list(found.neuron_dla.top[:k], "dla")],
            [f"neuron patching (MLP layers {', '.join(map(str, layers))})", neuron_list(found.neuron_patching.top[:k], "patching")],
        ],
        cls="heads",
    )


def discovery_table(folder: ResultFolder) -> str:
    """The circuit ``circuit_discovery`` found and its curves' areas ('' without its results; a line when the
    architecture is not supported)."""
    found = _typed(folder, CircuitDiscoveryResults)
    if found is None:
        return ""
    if found.not_supported:
        return f'<p class="muted"><b>Circuit discovery</b>: {html.escape(found.not_supported)}</p>'
    rows = [
        [
            f"{m} curve",
            f"CPR {_number(c.cpr):.3f} (random {_number(c.random_cpr):.3f}), CMD {_number(c.cmd):.3f} (random {_number(c.random_cmd):.3f})",
        ]
        for m, c in found.curves.items()
    ]
    smallest = found.smallest
    if smallest:
        circuit = smallest.circuit
        random_core = [v for v in smallest.random_core if v is not None]
        rows += [
            [
                f"smallest circuit ({circuit.method})",
                f"{circuit.n_edges} edges over {len(circuit.heads)} heads, faithfulness {_number(circuit.faithfulness):.3f}"
                f" (target {smallest.target}{'' if smallest.reached else ', NOT reached'})",
            ],
            [
                "core heads",
                f"{', '.join(smallest.core_heads) or '—'}: {_number(smallest.core_faithfulness):.3f}"
                + (f" (random head sets of that size: {sum(random_core) / len(random_core):.3f})" if random_core else ""),
            ],
        ]
    return "<h3>Circuit discovery</h3>" + table(["edges", "result"], rows, cls="heads") if rows else ""


def induction_table(folder: ResultFolder) -> str:
    """Heads at or above the induction_checks thresholds per pattern ('' without induction_checks results)."""
    found = _typed(folder, InductionChecksResults)
    if not found or not found.heads:
        return ""
    rows = [[f"{kind} (>= {found.thresholds.get(kind, float('nan')):.2f})", head_list(heads)] for kind, heads in found.heads.items()]
    return table(["pattern", "heads at or above threshold"], rows, cls="heads")


def model_section(folder: ResultFolder, root: Path) -> str:
    """The card of one model's once-per-model notebooks (e.g. induction checks)."""
    parts = [
        f'<section class="card" id="{MODEL_SCOPE}-{html.escape(folder.model)}">',
        f"<h2>{html.escape(folder.model)} · every task</h2>",
        '<p class="muted">Notebooks that do not depend on the task: run once per model.</p>',
        errors_section(folder),
    ]
    parts.append(induction_table(folder))
    parts.append(runs_table(folder, root))
    parts.append('<div class="figs">' + "".join(figure_links(folder, root, t) for t in folder.results) + "</div>")
    return "\n".join(parts + ["</section>"])


def cross_task_section(view: CrossTask) -> str:
    scale = float(np.nanmax(np.abs(view.importance))) if view.importance.size else 1.0
    rows = [[h] + [None if np.isnan(v) else float(v) for v in row] for h, row in zip(view.heads, view.importance)]
    colours = [[None] + [colour(v, scale) for v in row] for row in view.importance]
    overlap_rows = [[t] + [float(v) for v in row] for t, row in zip(view.tasks, view.overlap)]
    overlap_colours = [[None] + [colour(v, 1.0) for v in row] for row in view.overlap]
    return (
        f'<section class="card"><h2>Shared heads across tasks · {html.escape(view.model)}</h2>'
        f'<p class="muted">Importance = output-patching effect of each head (fraction of the logit difference it recovers); '
        f"heads shown are in some task's top {TOP_K} by |importance|. Overlap = Jaccard index of the tasks' top-{TOP_K} sets.</p>"
        f'<div class="row">{table(["head"] + view.tasks, rows, colours, cls="matrix")}'
        f"{table(['Jaccard'] + view.tasks, overlap_rows, overlap_colours, cls='matrix')}</div></section>"
    )


def runs_section(runs: list[dict]) -> str:
    rows = [[r["status"], r["task"], Path(r["model"]).name, r["template"], f"{r['seconds']:.1f}s", r["message"]] for r in runs]
    colours = [[{"ok": "#d9f2d9", "up-to-date": "#e8f0fb"}.get(r["status"], "#f8d7da")] + [None] * 5 for r in runs]
    return (
        '<section class="card"><h2>Runs of the last batch</h2>'
        + table(["status", "task", "model", "template", "time", "message"], rows, colours, cls="runs")
        + "</section>"
    )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin-bottom:4px} .muted{color:#666;font-size:13px} .failed{border:2px solid #c62828;background:#ffebee;color:#b71c1c;padding:8px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 18px;margin:16px 0}
table{border-collapse:collapse;margin:8px 16px 8px 0;font-size:13px} th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f0f0f0} table.matrix td{text-align:right;min-width:56px} .row{display:flex;flex-wrap:wrap;align-items:flex-start}
.figs{display:flex;flex-wrap:wrap;gap:12px} .fig{border:1px solid #eee;padding:6px} .fig img{display:block;margin:4px 0;max-width:520px}
nav a{margin-right:12px}
"""


def render(
    folders: list[ResultFolder], root: Path, runs: list[dict] | None = None, per_model: dict[str, ResultFolder] | None = None
) -> str:
    """The whole page."""
    per_model = per_model or {}
    nav = " ".join(
        [f'<a href="#{html.escape(f.task)}-{html.escape(f.model)}">{html.escape(f.task)} · {html.escape(f.model)}</a>' for f in folders]
        + [f'<a href="#{MODEL_SCOPE}-{html.escape(m)}">{html.escape(m)} · every task</a>' for m in per_model]
    )
    body = [
        f"<h1>circuit-lab results</h1><p class='muted'>{len(folders)} task × model folders under {html.escape(str(root))} · "
        f"built {time.strftime('%Y-%m-%d %H:%M')}</p><nav>{nav}</nav>"
    ]
    body += [cross_task_section(v) for v in cross_task(folders)]
    body += [folder_section(f, root) for f in folders]
    body += [model_section(f, root) for f in per_model.values()]
    if runs:
        body.append(runs_section(runs))
    if not folders:
        body.append("<p>No results yet: run <code>make all</code>.</p>")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>circuit-lab results</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def render_missing(root: Path) -> dict[str, list[str]]:
    """Render the figures that runs under ``root`` left as plotly JSON (``figures.render_pending``; where a browser is
    found) and record in each results file what is still missing (``figures_missing``). Returns, per run folder, the
    figures still missing. Staging and failed folders (hidden) are left alone."""
    from helpers.notebook import figures

    pending = [p for p in root.rglob(f"*{figures.PENDING_SUFFIX}") if not any(x.startswith(".") for x in p.relative_to(root).parts)]
    left: dict[str, list[str]] = {}
    for folder in sorted({p.parent.parent for p in pending}):
        still = figures.render_pending(folder)[1] if figures.browser_found() else figures.pending_figures(folder)
        for figure_dir in folder.glob("*_figures"):
            mine = [m for m in still if m.startswith(f"{figure_dir.name}/")]
            set_missing_figures(folder / f"{figure_dir.name.removesuffix('_figures')}.json", mine)
        if still:
            left[str(folder.relative_to(root))] = still
    return left


def write_report(root: Path, batch=None) -> Path:
    """Write ``root/index.html`` (and ``root/runs.json`` for a batch), first rendering the figures runs left
    unrendered (``render_missing``); returns the page's path."""
    root.mkdir(parents=True, exist_ok=True)
    render_missing(root)
    runs_file = root / "runs.json"
    if batch is not None:
        runs_file.write_text(json.dumps(batch.to_json(), indent=1))
    runs = json.loads(runs_file.read_text())["runs"] if runs_file.exists() else None
    page = root / "index.html"
    page.write_text(render(collect(root), root, runs, collect_per_model(root)))
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=None, help="results folder (default nb_outputs/)")
    args = parser.parse_args(argv)
    root = args.outputs or outputs_dir()
    print(write_report(root))
    unreadable = [why for f in [*collect(root), *collect_per_model(root).values()] for why in f.errors.values()]
    for why in unreadable:  # also shown on the page; a non-zero exit so that a script notices
        print(f"error: {why}", file=sys.stderr)
    return 1 if unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
