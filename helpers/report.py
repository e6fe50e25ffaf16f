"""The batch report: ``nb_outputs/index.html``, one self-contained page (inline CSS, images embedded, no scripts).

Per task and model: the key numbers (clean/corrupted logit difference, faithfulness when ``minimal_circuit``
ran), the top heads by DLA and by output patching, the role table, and thumbnails of each template's key
figures linking to that executed notebook's HTML. The **cross-task view** answers "which heads do tasks
share?": per model, a heads × tasks matrix of importance (the output-patching effect of each head, i.e. the
fraction of the logit difference it recovers) and the pairwise Jaccard overlap of the tasks' top-k heads.
Templates the report does not know get a card with their thumbnails and link, so new templates show up too.
``python -m helpers.report [--outputs DIR]`` rebuilds it without running anything.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .heads import head_label
from .layout import MODEL_SCOPE

TOP_K = 5  # heads per task in the overlap view
THUMB_WIDTH = 520  # px: axis labels and head names stay readable; each thumbnail opens the full-size PNG


@dataclass
class ResultFolder:
    """The JSON results of every template run for one task and model (``nb_outputs/<task>/<model>/``)."""

    task: str
    model: str
    path: Path
    results: dict[str, dict]  # template name -> its JSON
    per_model: ResultFolder | None = None  # the model's once-per-model results (``_models/<model>/``)

    def get(self, template: str, *keys, default=None):
        """A value of a template's JSON by key path (the per-model folder's for a per-model template)."""
        source = self.results if template in self.results or self.per_model is None else self.per_model.results
        node = source.get(template, {})
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node


def _folder(task: str, model_dir: Path) -> ResultFolder | None:
    results = {}
    for f in sorted(model_dir.glob("*.json")):
        data = json.loads(f.read_text())
        if isinstance(data, dict) and data.get("template") == f.stem:
            results[f.stem] = data
    return ResultFolder(task, model_dir.name, model_dir, results) if results else None


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


def head_importance(folder: ResultFolder) -> dict[str, float]:
    """Each head's output-patching effect (fraction of the logit difference recovered); {} without circuit_expms."""
    values = folder.get("circuit_expms", "patching", "values", "head_out")
    if values is None:
        return {}
    return {head_label({"layer": l, "head": h}): float(v) for l, row in enumerate(values) for h, v in enumerate(row)}


def top_heads(importance: dict[str, float], k: int = TOP_K) -> set[str]:
    """The ``k`` heads with the largest |importance|."""
    return set(sorted(importance, key=lambda h: -abs(importance[h]))[:k])


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


def task_check(folder: ResultFolder) -> dict | None:
    """The task check recorded by any template of the folder (``task_performed``, reasons), or None."""
    for template in ("circuit_expms", *sorted(folder.results)):
        check = folder.get(template, "task_check")
        if check:
            return check
    return None


def cross_task(folders: list[ResultFolder], k: int = TOP_K) -> list[CrossTask]:
    """Per model with ≥1 task that ran circuit_expms; heads listed when in some task's top k, strongest first.
    Tasks the model does not do (task check failed) are left out: their head importances are noise."""
    views = []
    for model in sorted({f.model for f in folders}):
        per_task = {f.task: head_importance(f) for f in folders if f.model == model and (task_check(f) or {}).get("task_performed", True)}
        per_task = {t: values for t, values in per_task.items() if values}
        if not per_task:
            continue
        tasks = sorted(per_task)
        top = {t: sorted(top_heads(per_task[t], k), key=lambda h: -abs(per_task[t][h])) for t in tasks}
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
    """An HTML table; cells are escaped, floats shown to 3 decimals, optional per-cell backgrounds."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            bg = colours[i][j] if colours and colours[i][j] else None
            style = f' style="background:{bg}"' if bg else ""
            cells.append(f"<td{style}>{html.escape(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


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
    figs = data.get("key_figures") or data.get("figures", [])[:limit]
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
    return f'<div class="fig"><h4><a href="{link}">{html.escape(template)}</a></h4>{"".join(items)}</div>'


def run_seconds(folder: ResultFolder, template: str) -> float | None:
    """How long the template's notebook took to execute (papermill's record in the published notebook)."""
    try:
        return float(json.loads((folder.path / f"{template}.ipynb").read_text())["metadata"]["papermill"]["duration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def runs_table(folder: ResultFolder, root: Path) -> str:
    """One row per template run in the folder: its execution time and links to the notebook."""
    rows, total = [], 0.0
    for template in folder.results:
        seconds = run_seconds(folder, template)
        total += seconds or 0.0
        rows.append(
            f"<tr><td>{html.escape(template)}</td><td>{'' if seconds is None else f'{seconds:.0f} s'}</td>"
            f'<td><a href="{html.escape(str((folder.path / f"{template}.html").relative_to(root)))}">html</a> · '
            f'<a href="{html.escape(str((folder.path / f"{template}.ipynb").relative_to(root)))}">ipynb</a></td></tr>'
        )
    return (
        f'<table class="runs"><thead><tr><th>notebook</th><th>run time</th><th>open</th></tr></thead><tbody>{"".join(rows)}'
        f"<tr><td><b>total</b></td><td><b>{total:.0f} s</b></td><td></td></tr></tbody></table>"
    )


def head_list(heads: list[dict] | None) -> str:
    return ", ".join(f"{head_label(h)} ({h['value']:+.2f})" for h in heads or []) or "—"


def key_numbers(folder: ResultFolder) -> list[list]:
    """Rows (quantity, value) of the numbers a reader checks first."""
    rows = []
    for name, keys in [
        ("clean logit diff", ("circuit_expms", "logit_diff", "clean")),
        ("corrupted logit diff", ("circuit_expms", "logit_diff", "corrupted")),
        ("clean accuracy", ("circuit_expms", "logit_diff", "clean_accuracy")),
        ("DLA identity error", ("circuit_expms", "dla", "identity_error")),
        ("faithfulness of the circuit", ("minimal_circuit", "faithfulness", "circuit")),
        ("loss on the repeat (induction)", ("induction_checks", "loss", "second_half")),
    ]:
        value = folder.get(*keys)
        if value is not None:
            rows.append([name, float(value)])
    for name, value in (folder.get("minimal_circuit", "faithfulness") or {}).items():
        if name.startswith("random"):
            rows.append([f"faithfulness, {name}", float(value)])
    return rows


def role_rows(folder: ResultFolder) -> list[list]:
    table_ = folder.get("head_functions", "roles", "table") or []
    return [[r["head"], r["role"], r["evidence"]] for r in sorted(table_, key=lambda r: r["role"] == "unclassified")]


def folder_section(folder: ResultFolder, root: Path) -> str:
    """The card of one task × model."""
    parts = [
        f'<section class="card" id="{html.escape(folder.task)}-{html.escape(folder.model)}">',
        f"<h2>{html.escape(folder.task)} · {html.escape(folder.model)}</h2>",
    ]
    description = folder.get("circuit_expms", "params", "description") or folder.get("head_functions", "params", "description")
    if description:
        parts.append(f'<p class="muted">{html.escape(description)}</p>')
    check = task_check(folder)
    if check and not check.get("task_performed", True):
        parts.append(
            '<p class="failed"><b>&#9888; The model does not do this task</b>: '
            f"{html.escape('; '.join(check.get('reasons', [])))}. Normalised numbers below (patching, faithfulness, "
            "head importance) are not meaningful.</p>"
        )
    versus = folder.get("minimal_circuit", "versus_random")
    if versus and not versus.get("beats_random", True):
        parts.append(f'<p class="failed"><b>&#9888; Circuit no better than chance</b>: {html.escape(versus["message"])}</p>')
    no_roles = folder.get("head_functions", "roles", "summary")
    if no_roles and no_roles.startswith("No head met"):
        parts.append(f'<p class="muted"><b>No head roles</b>: {html.escape(no_roles)}</p>')
    numbers = key_numbers(folder)
    if numbers:
        parts.append(table(["quantity", "value"], numbers, cls="numbers"))
    if "circuit_expms" in folder.results:
        rows = [
            ["DLA, positive", head_list(folder.get("circuit_expms", "dla", "top_positive"))],
            ["DLA, negative", head_list(folder.get("circuit_expms", "dla", "top_negative"))],
            ["output patching", head_list(folder.get("circuit_expms", "patching", "top_heads", "head_out"))],
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


def neuron_list(neurons: list[dict] | None, key: str) -> str:
    return ", ".join(f"L{n['layer']}N{n['neuron']} ({n[key]:+.2f})" for n in neurons or []) or "—"


def neuron_table(folder: ResultFolder, k: int = TOP_K) -> str:
    """Top neurons by DLA and by patching ('' without mlp_neurons results)."""
    by_dla = folder.get("mlp_neurons", "neuron_dla", "top")
    if by_dla is None:
        return ""
    by_patching = folder.get("mlp_neurons", "neuron_patching", "top") or []
    layers = folder.get("mlp_neurons", "layers_patched") or []
    return table(
        ["top neurons by", "neurons (value)"],
        [
            ["neuron DLA", neuron_list(by_dla[:k], "dla")],
            [f"neuron patching (MLP layers {', '.join(map(str, layers))})", neuron_list(by_patching[:k], "patching")],
        ],
        cls="heads",
    )


def discovery_table(folder: ResultFolder) -> str:
    """The circuit ``circuit_discovery`` found and its curves' areas ('' without its results; a line when the
    architecture is not supported)."""
    if "circuit_discovery" not in folder.results:
        return ""
    reason = folder.get("circuit_discovery", "not_supported")
    if reason:
        return f'<p class="muted"><b>Circuit discovery</b>: {html.escape(reason)}</p>'
    smallest = folder.get("circuit_discovery", "smallest") or {}
    circuit = smallest.get("circuit") or {}
    rows = [
        [f"{m} curve", f"CPR {c['cpr']:.3f} (random {c['random_cpr']:.3f}), CMD {c['cmd']:.3f} (random {c['random_cmd']:.3f})"]
        for m, c in (folder.get("circuit_discovery", "curves") or {}).items()
    ]
    if circuit:
        random_core = smallest.get("random_core") or []
        rows += [
            [
                f"smallest circuit ({circuit.get('method')})",
                f"{circuit.get('n_edges')} edges over {len(circuit.get('heads', []))} heads, faithfulness {circuit.get('faithfulness', float('nan')):.3f}"
                f" (target {smallest.get('target')}{'' if smallest.get('reached') else ', NOT reached'})",
            ],
            [
                "core heads",
                f"{', '.join(smallest.get('core_heads', [])) or '—'}: {smallest.get('core_faithfulness', float('nan')):.3f}"
                + (f" (random head sets of that size: {sum(random_core) / len(random_core):.3f})" if random_core else ""),
            ],
        ]
    return "<h3>Circuit discovery</h3>" + table(["edges", "result"], rows, cls="heads") if rows else ""


def induction_table(folder: ResultFolder) -> str:
    """Heads above the induction_checks threshold per pattern ('' without induction_checks results)."""
    induction = folder.get("induction_checks", "heads")
    return table(["pattern", "heads above threshold"], [[k, head_list(v)] for k, v in induction.items()], cls="heads") if induction else ""


def model_section(folder: ResultFolder, root: Path) -> str:
    """The card of one model's once-per-model notebooks (e.g. induction checks)."""
    parts = [
        f'<section class="card" id="{MODEL_SCOPE}-{html.escape(folder.model)}">',
        f"<h2>{html.escape(folder.model)} · every task</h2>",
        '<p class="muted">Notebooks that do not depend on the task: run once per model.</p>',
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


def write_report(root: Path, batch=None) -> Path:
    """Write ``root/index.html`` (and ``root/runs.json`` for a batch); returns the page's path."""
    root.mkdir(parents=True, exist_ok=True)
    runs_file = root / "runs.json"
    if batch is not None:
        runs_file.write_text(json.dumps(batch.to_json(), indent=1))
    runs = json.loads(runs_file.read_text())["runs"] if runs_file.exists() else None
    page = root / "index.html"
    page.write_text(render(collect(root), root, runs, collect_per_model(root)))
    return page


def main(argv: list[str] | None = None) -> int:
    from .run import outputs_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=None, help="results folder (default nb_outputs/)")
    args = parser.parse_args(argv)
    print(write_report(args.outputs or outputs_dir()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
