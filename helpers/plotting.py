"""Plotly figures with titled axes, shown inline and saved as static PNGs next to the notebook.

Static export uses kaleido, which needs a Chrome/Chromium (``make`` installs Debian's ``chromium``; on Colab
run ``plotly_get_chrome``). Without one, figures still show inline and a single clear warning says that
the PNGs are skipped. One browser is started per process and kept for every later figure (kaleido's sync
server): about 0.35 s a figure instead of about 5 s for a browser started per figure.

Under the batch runner (``DEFER_ENV`` set to ``"defer"``) a notebook only leaves each figure as plotly JSON
(``<name>.<fmt>.pending.json``) and the runner renders them after the notebook ran (``render_pending``), through
one browser per runner process: a notebook's kernel no longer starts a Chromium that competes with its torch
threads for the cores, and a batch starts one browser instead of one per notebook.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
import torch

from .heads import head_label


def in_colab() -> bool:
    """Whether this runs in a Google Colab kernel."""
    return "google.colab" in sys.modules


def choose_renderer() -> str:
    """Set plotly's renderer for where the notebook runs, and return it: ``"colab"`` in Colab (the renderer Colab
    displays, as plotly's documentation advises: its output frames do not run the notebook renderer's shared
    plotly.js); elsewhere ``"notebook"``, which embeds plotly.js once, so executed notebooks and their HTML work
    offline. (circuitsvis views load their JavaScript from a CDN: Colab shows them; an offline HTML copy does not.)"""
    pio.renderers.default = "colab" if in_colab() else "notebook"
    return pio.renderers.default


_IMAGE_SERVER: dict[str, bool] = {}
SERVER_TIMEOUT_S = 120  # one export through the shared browser; past it, exports go back to a browser each
DEFER_ENV = "CIRCUIT_LAB_IMAGES"  # "defer": leave figures as pending JSON for the runner to render (module docstring)
PENDING_SUFFIX = ".pending.json"
_RENDER_LOCK = threading.Lock()  # one rendering at a time per process (runs in threads share one browser)


def browser_found() -> bool:
    """A Chrome/Chromium at ``$BROWSER_PATH`` or on the PATH (what kaleido needs)."""
    named = os.environ.get("BROWSER_PATH")
    return Path(named).is_file() if named else any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def warm_up_images() -> None:
    """Start kaleido's persistent browser in the background (once per process) when a Chrome/Chromium is on
    the PATH (or at ``$BROWSER_PATH``), so it is ready by the first figure; otherwise do nothing (the first
    export then starts its own browser, or fails with kaleido's message)."""
    if "started" in _IMAGE_SERVER:
        return
    if browser_found():
        _IMAGE_SERVER["started"] = _start_image_server()


def write_image(fig: go.Figure, path: Path, scale: float = 1.5) -> None:
    """``fig.write_image`` through the shared browser when it runs (``warm_up_images``; else the first export
    that works starts it). Raises what ``write_image`` raises (no Chromium, a browser error), or TimeoutError."""
    if not _IMAGE_SERVER.get("started"):
        fig.write_image(path, scale=scale)
        if "started" not in _IMAGE_SERVER:  # a browser exists and works: share one from now on
            _IMAGE_SERVER["started"] = _start_image_server()
        return
    pool = ThreadPoolExecutor(1)  # a browser that died at start would leave the call waiting for ever: bounded here
    try:
        pool.submit(_server_write, fig, path, scale).result(timeout=SERVER_TIMEOUT_S)
    except FuturesTimeout:
        _IMAGE_SERVER["started"] = False
        raise TimeoutError(f"kaleido's shared browser did not answer in {SERVER_TIMEOUT_S} s") from None
    finally:
        pool.shutdown(wait=False)


def _server_write(fig: go.Figure, path: Path, scale: float) -> None:
    with warnings.catch_warnings():  # with a server, plotly notes that per-call browser options are ignored: expected
        warnings.filterwarnings("ignore", message="The kopts argument is ignored if using a server")
        fig.write_image(path, scale=scale)


def _start_image_server() -> bool:
    try:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)  # a background thread; stopped by kaleido at exit
    except Exception:  # noqa: BLE001 - an old kaleido without a server: every export starts its own browser (slower)
        return False
    return True


class Figures:
    """Shows figures and saves each as ``<out_dir>/<folder>/<name>.png``; records the paths it saved."""

    def __init__(self, out_dir: Path | str, folder: str = "figures", static: bool = True):
        self.folder = folder
        self.dir = Path(out_dir) / folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.static = static
        self.saved: list[str] = []
        self.key: list[str] = []  # the saved images the batch report shows as thumbnails
        self.skipped_reason: str | None = None
        self.note: str | None = None  # a warning printed under every figure's title (e.g. the task check failed)
        # Under the runner, with a browser it can use: leave the rendering to the runner (module docstring).
        self.deferred = static and os.environ.get(DEFER_ENV) == "defer" and browser_found()
        if static and not self.deferred:
            warm_up_images()

    def show(self, fig: go.Figure, name: str, formats: tuple[str, ...] = ("png",), key: bool = False) -> None:
        """Display ``fig`` (once: returns nothing, so a cell ending in ``figs.show(...)`` does not display it again)
        and write it as PNG (and any other ``formats``, e.g. svg). A failed export is retried once (kaleido's
        browser sometimes drops a message); a second failure skips static export for the rest of the notebook
        with one warning. ``key`` figures are the report's thumbnails (``key_figures``). Under the runner the files
        are written after the notebook ran (``render_pending``)."""
        if self.note:
            fig.update_layout(
                title_text=f"{fig.layout.title.text or ''}<br><sup><span style='color:#c62828'>&#9888; {self.note}</span></sup>",
                margin_t=max(fig.layout.margin.t or 0, 110),
            )
        fig.show()
        if not self.static or self.skipped_reason is not None:
            return
        for fmt in formats:
            if self.deferred:
                fig.write_json(self.dir / f"{name}.{fmt}{PENDING_SUFFIX}")
            else:
                try:
                    write_image_retried(fig, self.dir / f"{name}.{fmt}")
                except Exception as err:  # kaleido without Chromium, no kaleido, or a browser error twice
                    self.skipped_reason = failure_line(err)
                    warnings.warn(
                        f"static images are skipped from {name} on (figures still show inline): "
                        f"{self.skipped_reason}. Install Chromium (apt-get install chromium) or run "
                        "plotly_get_chrome.",
                        stacklevel=2,
                    )
                    return
            self.saved.append(f"{self.folder}/{name}.{fmt}")
            if key and fmt == "png":
                self.key.append(self.saved[-1])


def failure_line(err: Exception) -> str:
    """``"<Error>: <first non-empty line>"`` of an export failure."""
    return f"{type(err).__name__}: {next((ln for ln in str(err).splitlines() if ln.strip()), '')}"


def write_image_retried(fig: go.Figure, path: Path) -> None:
    """``write_image``, retried once: kaleido's browser sometimes drops a message."""
    try:
        write_image(fig, path)
    except Exception:  # noqa: BLE001 - the second attempt raises what is wrong
        write_image(fig, path)


def render_pending(folder: Path) -> tuple[int, str | None]:
    """Render every figure a notebook left under ``folder`` as ``<name>.<fmt>.pending.json`` into ``<name>.<fmt>``
    (through this process's shared browser) and remove the JSON. Returns (figures written, the first failure as one
    line or None); after a failure the remaining pending files are removed unrendered."""
    pending = sorted(Path(folder).rglob(f"*{PENDING_SUFFIX}"))
    written, failure = 0, None
    with _RENDER_LOCK:
        for path in pending:
            if failure is None:
                try:
                    write_image_retried(pio.read_json(path), path.with_name(path.name[: -len(PENDING_SUFFIX)]))
                    written += 1
                except Exception as err:  # noqa: BLE001 - reported as one line by the runner
                    failure = f"{path.name[: -len(PENDING_SUFFIX)]}: {failure_line(err)}"
            path.unlink()
    return written, failure


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
    colours = (
        {"color_continuous_scale": "Blues", "range_color": sequential}
        if sequential is not None
        else {"color_continuous_scale": "RdBu", "color_continuous_midpoint": zmid}
    )
    return px.imshow(arr, x=x, y=y, labels={"x": x_label, "y": y_label, "color": color_label}, title=title, aspect="auto", **colours)


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


def circuit_diagram(nodes: list[dict], edges: list[dict], title: str, x_title: str = "position where the head is kept") -> go.Figure:
    """Heads as nodes at (x, layer) coloured by role, weighted edges between them, the logits as the sink on top.

    ``nodes``: ``{label, x, layer, role}`` (one node labelled ``logits`` sits above the last layer);
    ``edges``: ``{source, target, weight}``, drawn with width and opacity by |weight|, red if negative.
    """
    columns = list(dict.fromkeys(n["x"] for n in nodes))
    cells: dict[tuple, list[str]] = {}
    for n in nodes:  # heads sharing a (column, layer) cell are spread side by side
        cells.setdefault((n["x"], n["layer"]), []).append(n["label"])
    where = {}
    for (col, layer), labels in cells.items():
        for i, label in enumerate(labels):
            where[label] = (columns.index(col) + (i - (len(labels) - 1) / 2) * 0.8 / max(len(labels), 1), layer)
    biggest = max([abs(e["weight"]) for e in edges] + [1e-9])
    fig = go.Figure()
    for e in sorted(edges, key=lambda e: abs(e["weight"])):
        (x0, y0), (x1, y1) = where[e["source"]], where[e["target"]]
        strength = abs(e["weight"]) / biggest
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                hoverinfo="text",
                showlegend=False,
                text=f"{e['source']} -> {e['target']}{' (' + e['via'] + ')' if e.get('via') else ''}: {e['weight']:+.3f}",
                line={
                    "width": 1 + 7 * strength,
                    "color": f"rgba({'200,30,30' if e['weight'] < 0 else '30,80,200'},{0.15 + 0.85 * strength:.2f})",
                },
            )
        )
    roles = sorted({n["role"] for n in nodes}, key=lambda r: (r == "logits", r))
    for i, role in enumerate(roles):
        members = [n for n in nodes if n["role"] == role]
        fig.add_trace(
            go.Scatter(
                x=[where[n["label"]][0] for n in members],
                y=[n["layer"] for n in members],
                mode="markers+text",
                name=role,
                text=[n["label"] for n in members],
                textposition="top center",
                marker={"size": 22, "color": px.colors.qualitative.Set2[i % 8], "line": {"width": 1, "color": "black"}},
            )
        )
    fig.update_layout(
        title=title, xaxis_title=x_title, yaxis_title="layer", height=520, width=820, template="plotly_white", legend_title="role"
    )
    fig.update_xaxes(tickvals=list(range(len(columns))), ticktext=columns, range=[-0.6, len(columns) - 0.4])
    return fig


def attention_view(model, cache, tokens, chosen: list[dict], prompt_index: int = 0):
    """circuitsvis view of the attention patterns of ``chosen`` heads (``{layer, head}``) on one prompt."""
    import circuitsvis as cv

    patterns = torch.stack([cache[f"blocks.{h['layer']}.attn.hook_pattern"][prompt_index, h["head"]] for h in chosen])
    return cv.attention.attention_heads(
        attention=patterns.cpu(), tokens=model.to_str_tokens(tokens[prompt_index]), attention_head_names=[head_label(h) for h in chosen]
    )
