"""Plotly figures with titled axes: heatmaps, lines, curves, scatters, bars, circuit diagrams and attention views.

Each builder returns a ``go.Figure``; a template shows and saves it through ``helpers.notebook.figures.Figures``.
"""

from __future__ import annotations

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import torch
from transformer_lens.utilities import get_act_name

from helpers.schema.heads import Head


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def heatmap(
    values,
    title: str,
    x_label: str,
    y_label: str,
    x=None,
    y=None,
    color_label: str = "value",
    zmid: float = 0.0,
    sequential: tuple[float, float] | None = None,
) -> go.Figure:
    """A heatmap with labelled, categorical axes: diverging (red-blue, centred on ``zmid``) for signed effects, or
    ``sequential=(low, high)`` (white to blue over that fixed range) for magnitudes such as scores, attention or
    percentages, where the low end means "nothing" and must not look like a strong signal."""
    arr = _np(values)
    x = [str(i) for i in range(arr.shape[1])] if x is None else x
    y = [str(i) for i in range(arr.shape[0])] if y is None else y
    fig = px.imshow(
        arr, x=x, y=y, labels={"x": x_label, "y": y_label, "color": color_label}, title=title, aspect="auto", **_scale(sequential, zmid)
    )
    return readable(fig, *arr.shape[:2])


def _scale(sequential: tuple[float, float] | None, zmid: float = 0.0) -> dict:
    """``px.imshow``'s colour arguments: white to blue over the fixed range ``sequential``, else red-blue centred on ``zmid``."""
    if sequential is not None:
        return {"color_continuous_scale": "Blues", "range_color": sequential}
    return {"color_continuous_scale": "RdBu", "color_continuous_midpoint": zmid}


def head_grids(
    values, panels: list[str], title: str, color_label: str = "value", sequential: tuple[float, float] | None = None
) -> go.Figure:
    """One [layer × head] heatmap per panel, side by side on one colour scale (``values``: [panel, layer, head]; e.g. a
    head's attention to each named word): every head is a cell at its layer and index, so a real model's 270 heads
    fit one screen, and a head that acts on two panels is at the same place in both. Scales as ``heatmap``'s."""
    arr = _np(values)
    _, n_layers, n_heads = arr.shape
    fig = px.imshow(
        arr,
        facet_col=0,
        x=[str(h) for h in range(n_heads)],
        y=[str(layer) for layer in range(n_layers)],
        labels={"x": "head", "y": "layer", "color": color_label},
        title=title,
        aspect="auto",
        **_scale(sequential),
    )
    fig.for_each_annotation(lambda a: a.update(text=panels[int(a.text.split("=")[-1])]))
    return fig.update_layout(height=max(MIN_HEIGHT, 14 * n_layers + 200), width=max(600, len(panels) * (24 * n_heads + 60) + 200))


ROW_PX, MIN_HEIGHT, MAX_HEIGHT = 13, 450, 4200  # a real model's 270 heads as rows: every label legible


def readable(fig: go.Figure, n_rows: int, n_cols: int) -> go.Figure:
    """Size a heatmap so that every row and column keeps a legible label: a toy's 4 × 4 stays at the default size, a
    real model's 30 layers × 9 heads (270 rows by position) grows tall enough for a 9-point label per row."""
    if n_rows * ROW_PX + 200 > MIN_HEIGHT:
        fig.update_layout(height=min(MAX_HEIGHT, n_rows * ROW_PX + 200))
        fig.update_yaxes(tickfont={"size": 9}, dtick=1 if n_rows * ROW_PX + 200 <= MAX_HEIGHT else None)
    if n_cols > 30:
        fig.update_layout(width=max(900, 16 * n_cols + 250))
        fig.update_xaxes(tickfont={"size": 9})
    return fig


def lines(values, x, title: str, x_label: str, y_label: str, names: list[str] | None = None) -> go.Figure:
    """One line per row of ``values`` (or one line for a vector) against ``x`` labels."""
    arr = _np(values)
    arr = arr[None] if arr.ndim == 1 else arr
    fig = go.Figure()
    for i, row in enumerate(arr):
        fig.add_trace(go.Scatter(x=list(x), y=row, mode="lines+markers", name=(names or [y_label])[i]))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label)
    return fig


def curves(series: dict[str, tuple[list[float], list[float]]], title: str, x_label: str, y_label: str, log_x: bool = True) -> go.Figure:
    """One line per named ``(x, y)`` series, each at its own x (e.g. faithfulness over the fraction of edges kept)."""
    fig = go.Figure()
    for name, (x, y) in series.items():
        fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def distribution(values, marker: float, title: str, x_label: str, marker_label: str) -> go.Figure:
    """The spread of ``values`` (a box with every point shown) and one ``marker`` value as a labelled line,
    e.g. random control circuits' faithfulness against the circuit's own."""
    fig = go.Figure(
        go.Box(
            x=_np(values),
            boxpoints="all",
            jitter=0.4,
            pointpos=0,
            name="random",
            orientation="h",
            marker_color="#90a4ae",
            line_color="#607d8b",
        )
    )
    fig.add_vline(
        x=float(marker),
        line_color="#c62828",
        line_width=3,
        annotation_text=f"{marker_label} {float(marker):.3f}",
        annotation_position="top",
    )
    fig.update_layout(title=title, xaxis_title=x_label, showlegend=False, height=320)
    return fig


def scatter(
    x, y, title: str, x_label: str, y_label: str, hover: list[str] | None = None, color=None, diagonal: bool = False, n_labels: int = 5
) -> go.Figure:
    """Labelled scatter plot; ``diagonal`` draws y = x for before/after comparisons. The ``n_labels`` most notable
    points (farthest out, or farthest from the diagonal) carry their ``hover`` name as a text label, so the static
    image names them too (only for short names such as head labels)."""
    xs, ys = _np(x).ravel(), _np(y).ravel()
    fig = px.scatter(x=xs, y=ys, hover_name=hover, color=color, title=title, labels={"x": x_label, "y": y_label})
    if diagonal:
        lo = float(min(xs.min(), ys.min()))
        hi = float(max(xs.max(), ys.max()))
        fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line={"dash": "dot", "color": "grey"})
    if hover is not None and n_labels and all(len(str(h)) <= 12 for h in hover):
        for i in notable_points(xs, ys, n_labels, diagonal):
            fig.add_annotation(
                x=float(xs[i]), y=float(ys[i]), text=str(hover[i]), showarrow=True, arrowhead=0, ax=18, ay=-18, font={"size": 11}
            )
    return fig


def notable_points(x: np.ndarray, y: np.ndarray, k: int, diagonal: bool = False) -> list[int]:
    """Indices of the ``k`` points farthest out: by |x| + |y| (each scaled by its largest value), or with
    ``diagonal`` by that plus the distance from y = x (scaled the same way)."""

    def scaled(v: np.ndarray) -> np.ndarray:
        top = np.nanmax(np.abs(v)) if v.size else 0.0
        return np.abs(v) / top if top > 0 else np.zeros_like(v, dtype=float)

    score = scaled(x) + scaled(y) + (scaled(y - x) if diagonal else 0.0)
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return [int(i) for i in order[:k]]


def bars(values, labels: list[str], title: str, x_label: str, y_label: str, color: list[str] | None = None) -> go.Figure:
    """A bar chart of ``values`` per label (coloured by ``color`` groups when given)."""
    fig = px.bar(x=labels, y=_np(values), color=color, title=title, labels={"x": x_label, "y": y_label, "color": "group"})
    fig.update_xaxes(type="category")
    return fig


DIAGRAM_EDGES = 300  # the strongest edges a circuit diagram draws (a real model's circuit has thousands)
_STRENGTH_LEVELS = 6  # edges are drawn in one trace per sign and level of |weight| (width and opacity)
_LABELLED_NODES = 60  # nodes labelled on the figure up to this many; beyond, by hover only


def circuit_diagram(
    nodes: list[dict], edges: list[dict], title: str, x_title: str = "position where the head is kept", max_edges: int = DIAGRAM_EDGES
) -> go.Figure:
    """Heads as nodes at (x, layer) coloured by role, weighted edges between them, the logits as the sink on top.

    ``nodes``: ``{label, x, layer, role}`` (one node labelled ``logits`` sits above the last layer);
    ``edges``: ``{source, target, weight}`` (optional ``via``), drawn with width and opacity by |weight|, red if negative;
    each edge's name and weight show on hover at its middle. Only the ``max_edges`` strongest are drawn (the subtitle
    says so): a real model's circuit of thousands of edges is otherwise a solid
    mesh, and one plotly trace per edge made multi-megabyte notebooks. Edges are grouped into one trace per sign and
    strength level. The height grows with the number of layers; past ``_LABELLED_NODES`` nodes, names are on hover.
    """
    columns = list(dict.fromkeys(n["x"] for n in nodes))
    cells: dict[tuple, list[str]] = {}
    for n in nodes:  # heads sharing a (column, layer) cell are spread side by side
        cells.setdefault((n["x"], n["layer"]), []).append(n["label"])
    where = {}
    for (col, layer), labels in cells.items():
        for i, label in enumerate(labels):
            where[label] = (columns.index(col) + (i - (len(labels) - 1) / 2) * 0.8 / max(len(labels), 1), layer)
    strongest = sorted(edges, key=lambda e: -abs(e["weight"]))[:max_edges]
    biggest = max([abs(e["weight"]) for e in strongest] + [1e-9])
    fig = go.Figure()
    groups: dict[tuple[bool, int], list[dict]] = {}
    for e in strongest:
        level = min(_STRENGTH_LEVELS - 1, int(abs(e["weight"]) / biggest * _STRENGTH_LEVELS))
        groups.setdefault((e["weight"] < 0, level), []).append(e)
    for (negative, level), group in sorted(groups.items(), key=lambda item: item[0][1]):  # the strongest drawn last, on top
        strength = (level + 1) / _STRENGTH_LEVELS
        xs, ys = [], []
        for e in group:
            (x0, y0), (x1, y1) = where[e["source"]], where[e["target"]]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                showlegend=False,
                line={"width": 1 + 7 * strength, "color": f"rgba({'200,30,30' if negative else '30,80,200'},{0.15 + 0.85 * strength:.2f})"},
            )
        )
    if strongest:  # each edge's name and weight on hover, at its middle
        middles = [tuple((a + b) / 2 for a, b in zip(where[e["source"]], where[e["target"]])) for e in strongest]
        fig.add_trace(
            go.Scatter(
                x=[m[0] for m in middles],
                y=[m[1] for m in middles],
                mode="markers",
                marker={"size": 6, "opacity": 0},
                showlegend=False,
                hovertemplate="%{text}<extra></extra>",
                text=[
                    f"{e['source']} -> {e['target']}{' (' + e['via'] + ')' if e.get('via') else ''}: {e['weight']:+.3f}" for e in strongest
                ],
            )
        )
    n_rows = len({n["layer"] for n in nodes})
    labelled = len(nodes) <= _LABELLED_NODES
    roles = sorted({n["role"] for n in nodes}, key=lambda r: (r == "logits", r))
    for i, role in enumerate(roles):
        members = [n for n in nodes if n["role"] == role]
        fig.add_trace(
            go.Scatter(
                x=[where[n["label"]][0] for n in members],
                y=[n["layer"] for n in members],
                mode="markers+text" if labelled else "markers",
                name=role,
                text=[n["label"] for n in members],
                hovertemplate="%{text}<extra></extra>",
                textposition="top center",
                marker={
                    "size": 22 if n_rows <= 12 else 12,
                    "color": px.colors.qualitative.Set2[i % 8],
                    "line": {"width": 1, "color": "black"},
                },
            )
        )
    if len(edges) > len(strongest):
        title = f"{title}<br><sup>the {len(strongest)} strongest of its {len(edges)} connections drawn</sup>"
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title="layer",
        height=max(520, 160 + 24 * n_rows),
        width=820,
        template="plotly_white",
        legend_title="role",
    )
    fig.update_xaxes(tickvals=list(range(len(columns))), ticktext=columns, range=[-0.6, len(columns) - 0.4])
    return fig


def attention_view(model, cache, tokens, chosen: list[Head], prompt_index: int = 0):
    """circuitsvis view of the attention patterns of ``chosen`` heads on one prompt."""
    import circuitsvis as cv

    patterns = torch.stack([cache[get_act_name("pattern", h.layer)][prompt_index, h.head] for h in chosen])
    return cv.attention.attention_heads(
        attention=patterns.cpu(), tokens=model.to_str_tokens(tokens[prompt_index]), attention_head_names=[h.label for h in chosen]
    )
