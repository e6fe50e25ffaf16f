"""Figures that do not mislead: sequential scales for magnitudes, names on the notable points of scatter plots."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from helpers.notebook import figures, plotting


def test_magnitudes_use_a_fixed_sequential_scale():
    fig = plotting.heatmap(np.array([[0.0, 10.0], [40.0, 5.0]]), "copy score", "head", "layer", color_label="%", sequential=(0, 100))
    axis = fig.layout.coloraxis
    assert (axis.cmin, axis.cmax) == (0, 100) and axis.cmid is None  # 0% is the light end, not the middle of a diverging map
    signed = plotting.heatmap(np.array([[-1.0, 2.0]]), "patching", "head", "layer")
    assert signed.layout.coloraxis.cmid == 0.0


def test_notable_points_are_labelled_by_name():
    x = np.array([0.0, 0.1, 2.0, 0.0, -1.5])
    y = np.array([0.0, 0.1, 2.1, 3.0, 0.0])
    assert plotting.notable_points(x, y, 2) == [2, 3]
    assert plotting.notable_points(x, y, 1, diagonal=True) == [3]  # farthest from y = x as well
    fig = plotting.scatter(x, y, "t", "x", "y", hover=[f"L0H{i}" for i in range(5)], n_labels=2, diagonal=True)
    assert sorted(a.text for a in fig.layout.annotations) == ["L0H2", "L0H3"]
    long = plotting.scatter(x, y, "t", "x", "y", hover=["a whole prompt sentence"] * 5)
    assert not long.layout.annotations  # long hover texts stay hover-only


def test_per_head_panels_are_layer_by_head_grids_on_one_scale():
    """A value per head and named word (attention from the end): one [layer × head] grid per word, titled by it, on one
    fixed colour scale; each head at its own layer and index, the same place in every panel."""
    values = np.zeros((3, 30, 9))
    values[1, 23, 3] = 0.9  # L23H3 attends to the second word
    fig = plotting.head_grids(values, ["to IO", "to S1", "to S2"], "attention", "attention", sequential=(0, 1))
    assert [a.text for a in fig.layout.annotations] == ["to IO", "to S1", "to S2"]
    assert len(fig.data) == 3 and all(np.asarray(t.z).shape == (30, 9) for t in fig.data)
    assert np.asarray(fig.data[1].z)[23, 3] == 0.9 and list(fig.data[1].y)[23] == "23" and list(fig.data[1].x)[3] == "3"
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 1) and fig.layout.height < 1000


def test_a_large_circuit_diagram_draws_its_strongest_edges_in_a_few_traces():
    """A real model's circuit (thousands of edges over 30 layers): the strongest ``max_edges`` drawn, grouped into one
    trace per sign and strength level (not one per edge), each named on hover at its middle; the subtitle says how many
    are drawn; taller with more layers; a small circuit is drawn whole, its nodes labelled."""
    rng = np.random.default_rng(0)
    nodes = [{"label": f"L{l}H{h}", "x": f"H{h}", "layer": l, "role": "head"} for l in range(30) for h in range(9)]
    nodes.append({"label": "logits", "x": "logits", "layer": 30, "role": "logits"})
    pairs = [(a, b) for a in range(len(nodes) - 1) for b in range(len(nodes)) if nodes[a]["layer"] < nodes[b]["layer"]]
    picked = rng.choice(len(pairs), 2000, replace=False)
    weights = rng.normal(size=2000)
    edges = [
        {"source": nodes[pairs[i][0]]["label"], "target": nodes[pairs[i][1]]["label"], "weight": float(w)} for i, w in zip(picked, weights)
    ]
    fig = plotting.circuit_diagram(nodes, edges, "big", max_edges=100)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) <= 12 and sum(list(t.x).count(None) for t in lines) == 100  # 100 segments, in few traces
    hover = next(t for t in fig.data if t.mode == "markers" and t.name is None)
    strongest = sorted(edges, key=lambda e: -abs(e["weight"]))[:100]
    assert list(hover.text) == [f"{e['source']} -> {e['target']}: {e['weight']:+.3f}" for e in strongest]
    assert "the 100 strongest of its 2000 connections drawn" in fig.layout.title.text and fig.layout.height > 520
    assert all(t.mode == "markers" for t in fig.data if t.name in ("head", "logits"))  # 271 nodes: names on hover
    small = plotting.circuit_diagram(nodes[:3] + nodes[-1:], edges[:0] + [{"source": "L0H0", "target": "logits", "weight": -1.0}], "small")
    assert small.layout.title.text == "small" and small.layout.height == 520
    assert [t.line.color for t in small.data if t.mode == "lines"] == ["rgba(200,30,30,1.00)"]  # negative: red
    assert all(t.mode == "markers+text" for t in small.data if t.name in ("head", "logits"))


def test_without_a_browser_figures_show_one_warning_says_why_and_none_is_silently_missing(tmp_path, monkeypatch):
    import pytest

    def no_chrome(fig, path, scale=1):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nInstall it with plotly_get_chrome")

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    monkeypatch.setattr(figures, "_IMAGE_SERVER", {})  # as in a fresh kernel: nothing started yet
    monkeypatch.setattr(go.Figure, "write_image", no_chrome)  # what kaleido does without a browser
    figs = figures.Figures(tmp_path)
    with pytest.warns(UserWarning, match="static images could not be written from a on.*Chrom.*make report"):
        figs.show(plotting.heatmap(np.eye(2), "t", "x", "y"), "a")
    figs.show(plotting.heatmap(np.eye(2), "t", "x", "y"), "b")  # no second warning, no hang
    assert figs.saved == figs.missing == ["figures/a.png", "figures/b.png"] and "Chrome" in figs.skipped_reason
    assert figures.pending_figures(tmp_path) == figs.missing  # kept as plotly JSON for make report


def test_a_shared_browser_that_does_not_answer_is_given_up_not_waited_for(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(figures, "_IMAGE_SERVER", {"started": True})
    monkeypatch.setattr(figures, "SERVER_TIMEOUT_S", 0.2)
    monkeypatch.setattr(figures, "_server_write", lambda fig, path, scale: time.sleep(3))
    monkeypatch.setattr(go.Figure, "write_image", lambda fig, path, scale=1: path.write_bytes(b"png"))
    figs = figures.Figures(tmp_path)
    start = time.time()
    figs.show(plotting.heatmap(np.eye(2), "t", "x", "y"), "a")  # times out, then the retry starts its own browser
    assert time.time() - start < 2 and figs.saved == ["figures/a.png"] and figures._IMAGE_SERVER["started"] is False


def test_under_the_runner_figures_are_left_pending_then_rendered_once(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(
        figures, "write_image", lambda fig, path, scale=1.5: (written.append(fig.layout.title.text), path.write_bytes(b"png"))
    )
    monkeypatch.setattr(figures, "browser_found", lambda: True)
    monkeypatch.setenv(figures.DEFER_ENV, "defer")
    figs = figures.Figures(tmp_path)
    figs.note = "model does not do this task"
    figs.show(plotting.heatmap(np.eye(2), "t", "x", "y"), "a", formats=("png", "svg"))
    assert written == [] and figs.saved == ["figures/a.png", "figures/a.svg"]
    assert sorted(p.name for p in figs.dir.iterdir()) == ["a.png.pending.json", "a.svg.pending.json"]
    assert figures.render_pending(tmp_path) == (2, [], None)
    assert sorted(p.name for p in figs.dir.iterdir()) == ["a.png", "a.svg"]
    assert all("does not do this task" in title for title in written)  # rendered as shown, with the figure's note

    monkeypatch.delenv(figures.DEFER_ENV)
    direct = figures.Figures(tmp_path, folder="direct")
    direct.show(plotting.heatmap(np.eye(2), "t", "x", "y"), "b")
    assert (direct.dir / "b.png").exists() and len(written) == 3  # outside the runner: written at once


def test_a_pending_figure_that_cannot_be_rendered_is_one_line_and_stays_pending(tmp_path, monkeypatch):
    def fail(fig, path, scale=1.5):
        raise RuntimeError("Chrome crashed\nlong trace")

    monkeypatch.setattr(figures, "browser_found", lambda: True)
    monkeypatch.setenv(figures.DEFER_ENV, "defer")
    figs = figures.Figures(tmp_path)
    for name in ("a", "b"):
        figs.show(plotting.heatmap(np.eye(2), "t", "x", "y"), name)
    tries = []
    monkeypatch.setattr(figures, "write_image", lambda fig, path, scale=1.5: tries.append(path.name) or fail(fig, path))
    assert figures.render_pending(tmp_path) == (0, ["figures/a.png", "figures/b.png"], "a.png: RuntimeError: Chrome crashed")
    assert tries == ["a.png"] * 3  # the shared browser, its retry, a browser of its own; b is not waited for
    assert sorted(p.name for p in figs.dir.iterdir()) == ["a.png.pending.json", "b.png.pending.json"]
    monkeypatch.setattr(figures, "write_image", lambda fig, path, scale=1.5: path.write_bytes(b"png"))
    assert figures.render_pending(tmp_path) == (2, [], None)  # a later call renders them
    assert sorted(p.name for p in figs.dir.iterdir()) == ["a.png", "b.png"]


def test_the_renderer_is_the_one_colab_shows_in_colab_and_offline_elsewhere(monkeypatch):
    import sys
    import types

    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)  # restored after the test
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert figures.choose_renderer() == "notebook" == pio.renderers.default
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert figures.choose_renderer() == "colab" == pio.renderers.default
    fig = plotting.heatmap(np.eye(2), "t", "x", "y")
    html = pio.renderers[pio.renderers.default].to_mimebundle(fig.to_dict())["text/html"]
    assert "cdn.plot.ly" in html or "plotly-" in html  # each output loads plotly.js itself, as Colab's frames need
