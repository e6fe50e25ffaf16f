"""Executed-notebook tests: the batch runner executes the real templates on the bundled models; the report it writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import nbformat
import numpy as np
import pytest
import yaml

import helpers.runner.run as runner
from helpers import PARAMS_DIR
from helpers.notebook import figures, notes
from helpers.runner import batch, cli, report
from helpers.runner.report import write_report
from helpers.schema import outputs as output_layout  # `outputs` is this file's fixture

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # a displayed figure's div id
OPTIONS = batch.RunOptions(n_prompts=16, threads=2, progress=False)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb_outputs")
    patch = pytest.MonkeyPatch()
    patch.setattr(output_layout, "OUTPUTS_DIR", root)
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def params_copy(tmp_path_factory):
    """A temp params folder: ioi, numseq, and a broken copy of ioi (its answer is two tokens)."""
    folder = tmp_path_factory.mktemp("params")
    for task in ("ioi", "numseq"):
        shutil.copy(PARAMS_DIR / f"{task}.yaml", folder)
    data = yaml.safe_load((PARAMS_DIR / "ioi.yaml").read_text())
    data.update(task="broken", correct=" [S1] and")
    (folder / "broken.yaml").write_text(yaml.safe_dump(data))
    return folder


@pytest.fixture(scope="module")
def first_batch(outputs, params_copy):
    """circuit_expms for every params file of the copy, through the batch runner."""
    return batch.run_batch(templates=["circuit_expms"], params_dir=params_copy, options=OPTIONS)


@pytest.fixture(scope="module")
def ioi_run(first_batch):
    return next(r for r in first_batch.results if r.task == "ioi")


def test_broken_params_file_is_one_red_run(first_batch, params_copy):
    by_task = {r.task: r for r in first_batch.results}
    assert {t: r.status for t, r in by_task.items()} == {"broken": "bad-input", "ioi": "ok", "numseq": "ok"}
    assert str(params_copy / "broken.yaml") in by_task["broken"].message and "correct" in by_task["broken"].message
    assert first_batch.exit_code != 0
    assert str(params_copy / "broken.yaml") in first_batch.table()


def test_rerun_with_nothing_changed_executes_nothing(first_batch, params_copy, outputs):
    before = {p: p.stat().st_mtime_ns for p in outputs.rglob("*.ipynb")}
    again = batch.run_batch(["ioi", "numseq"], templates=["circuit_expms"], params_dir=params_copy, options=OPTIONS)
    assert {r.status for r in again.results} == {"up-to-date"} and not again.executed and again.exit_code == 0
    assert "nothing executed" in again.table()
    assert {p: p.stat().st_mtime_ns for p in outputs.rglob("*.ipynb")} == before


def test_run_succeeds_with_artifacts(ioi_run, outputs):
    assert ioi_run.status == "ok", ioi_run.message
    out = outputs / "ioi" / "toy-ioi"
    assert ioi_run.out_dir == out
    for name in ["circuit_expms.ipynb", "circuit_expms.html", "circuit_expms.json"]:
        assert (out / name).stat().st_size > 0, name
    nb = nbformat.read(out / "circuit_expms.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    stderr = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "stream" and o.name == "stderr"
    )
    assert "TqdmWarning" not in stderr and "helpers/" not in stderr, f"warnings in the saved notebook:\n{stderr[:2000]}"
    assert "patch head_out" not in stderr, "progress bars of the sweeps saved into the notebook"
    for cell in nb.cells:  # each figure shown once (figs.show returns nothing, so a cell's last value is not a repeat)
        figures = [
            UUID.sub("", o["data"]["text/html"])
            for o in cell.get("outputs", [])
            if "Plotly.newPlot" in o.get("data", {}).get("text/html", "")
        ]
        assert len(figures) == len(set(figures)), f"a figure is displayed twice in cell:\n{cell.source[:300]}"
    assert sum("Plotly.newPlot" in o.get("data", {}).get("text/html", "") for c in nb.cells for o in c.get("outputs", [])) >= 10
    assert ".staging-" not in (out / "circuit_expms.ipynb").read_text(), "the published notebook names the staging folder"
    assert not list(outputs.glob(".staging-*")), "staging folder left behind"


def test_json_artifact_contents(ioi_run, outputs):
    data = json.loads((outputs / "ioi" / "toy-ioi" / "circuit_expms.json").read_text())
    assert data["params"]["task"] == "ioi" and data["model"] == "toy-ioi"
    assert data["logit_diff"]["clean"] > data["logit_diff"]["corrupted"]
    assert data["dla"]["identity_error"] < 1e-4
    assert len(data["dla"]["top_positive"]) == data["params"]["analysis"]["top_k"]
    assert {"head_out", "head_v", "head_pattern"} <= set(data["patching"]["top_heads"])
    assert len(data["patching"]["values"]["resid_pre"]) == 4
    assert set(data["head_scores"]["values"]) == {"prev_token", "duplicate_token", "induction"}
    assert data["attribution_patching"]["spearman_vs_exact"]["attribution"]["head_out"] >= 0.8
    last = data["path_patching"]["to_logits"][-1]  # a last-layer sender's path effect is its output-patching effect
    assert last == pytest.approx(data["patching"]["values"]["head_out"][-1], abs=1e-4)
    pngs = data["figures"]
    if figures.browser_found():  # static images need Chromium (the Makefile installs it); without, none are listed
        assert len(pngs) >= 15 and all((outputs / "ioi" / "toy-ioi" / p).stat().st_size > 1000 for p in pngs)
    else:
        assert pngs == []
    # the runner rendered what the kernel left pending, and asks later figures of this process to be written at once
    assert not list(outputs.rglob(f"*{figures.PENDING_SUFFIX}")) and figures.DEFER_ENV not in os.environ


def test_same_seed_same_numbers(ioi_run, outputs):
    first = json.loads((outputs / "ioi" / "toy-ioi" / "circuit_expms.json").read_text())
    again = runner.run_template("ioi", "circuit_expms", "toy-ioi", n_prompts=16, threads=2, progress=False)
    assert again.status == "ok", again.message
    second = json.loads((outputs / "ioi" / "toy-ioi" / "circuit_expms.json").read_text())
    first.pop("figures"), second.pop("figures")
    assert first == second


def test_bad_params_leave_outputs_untouched(ioi_run, outputs, tmp_path):
    out = outputs / "ioi" / "toy-ioi"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    data = yaml.safe_load((PARAMS_DIR / "ioi.yaml").read_text())
    data["correct"] = " [S1] and"  # two tokens
    bad = tmp_path / "ioi.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = runner.run_template(str(bad), "circuit_expms", "toy-ioi", progress=False)
    assert result.status == "bad-input" and "correct" in result.message and str(bad) in result.message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_unknown_model_fails_fast(outputs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    result = runner.run_template("ioi", "circuit_expms", "gpt2-small", progress=False)
    assert result.status == "bad-input" and "not available offline" in result.message and "toy-ioi" in result.message
    assert time.time() - t0 < 10


def test_cli_exit_codes(outputs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["--task", "ioi", "--model", "no-such-model"]) == 2
    assert cli.main(["--task", "no-such-task"]) == 2


@pytest.fixture(scope="module")
def head_functions_run(ioi_run, outputs):
    return runner.run_template("ioi", "head_functions", "toy-ioi", n_prompts=16, threads=2, progress=False)


def executed_errors(path) -> list:
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def test_head_functions_reads_the_circuit_json(head_functions_run, outputs):
    assert head_functions_run.status == "ok", head_functions_run.message
    out = outputs / "ioi" / "toy-ioi"
    assert not executed_errors(out / "head_functions.ipynb")
    circuit = json.loads((out / "circuit_expms.json").read_text())
    data = json.loads((out / "head_functions.json").read_text())
    expected = {
        (h["layer"], h["head"])
        for group in (circuit["dla"]["top_positive"], circuit["dla"]["top_negative"], circuit["patching"]["top_heads"]["head_out"])
        for h in group
    }
    assert {(h["layer"], h["head"]) for h in data["heads"]} == expected
    copy = data["copy_scores"]
    assert all(0 <= v <= 100 for row in copy["positive"] + copy["negative"] for v in row)
    weights = data["weights"]  # from the weights alone: OV copying on the task's words, positional previous-token attention
    assert weights["n_words"] > 10 and len(weights["ov_copying"]) == 4 and len(weights["positional_previous_token"]) == 4
    assert all(
        0 <= v <= 1 for row in weights["ov_copying"] + weights["ov_copying_with_mlp0"] + weights["positional_previous_token"] for v in row
    )
    table = {row["head"]: row for row in data["roles"]["table"]}
    assert set(table) == {f"L{l}H{h}" for l, h in expected}
    assert all(
        row["role"] in {"mover", "negative mover", "inhibition-like", "induction", "duplicate-token", "previous-token", "unclassified"}
        for row in table.values()
    )
    # toy-ioi's dominant head writes the answer (DLA 5.3 of 6.0) from the S2 position without copying the word there
    assert table["L3H2"]["dla"] > 3 and "copy" in table["L3H2"]["evidence"]


def test_head_functions_without_circuit_json_fails_clearly(outputs):
    result = runner.run_template("months", "head_functions", "toy-ioi", n_prompts=8, threads=2, progress=False)
    assert result.status == "failed" and "circuit_expms" in result.message and "MissingResults" in result.message


def test_induction_checks_find_the_induction_circuit(outputs):
    result = runner.run_template("ioi", "induction_checks", "toy-induction", threads=2, progress=False)
    assert result.status == "ok", result.message
    out = outputs / "_models" / "toy-induction"  # it does not depend on the task: once per model
    assert result.out_dir == out and result.task == "_models"
    assert not executed_errors(out / "induction_checks.ipynb")
    data = json.loads((out / "induction_checks.json").read_text())
    assert {h["layer"] for h in data["heads"]["induction"]} == {1} and data["heads"]["prev_token"][0]["layer"] == 0
    assert data["loss"]["second_half"] < 0.3 * data["loss"]["first_half"]
    assert max(data["head_detector_max_abs_diff"].values()) <= 1e-5
    assert data["k_composition"]["pairs"] and max(p["score"] for p in data["k_composition"]["pairs"]) > data["k_composition"]["baseline"]


def test_notes_survive_a_rerun_and_an_edited_notebook_is_kept(outputs):
    published = outputs / "_models" / "toy-induction" / "induction_checks.ipynb"
    if not published.exists():
        assert runner.run_template("ioi", "induction_checks", "toy-induction", threads=2, progress=False).status == "ok"
    assert not notes.was_edited(published)
    nb = nbformat.read(published, as_version=4)
    notes_cells = [c for c in nb.cells if notes.NOTES_TAG in c.metadata.get("tags", [])]
    assert len(notes_cells) >= 6  # one per section and one for conclusions
    notes_cells[0].source = "L0H1 attends to the previous token; compare with gpt2-small"
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "import" in c.source)
    nb.cells.insert(first_code + 1, nbformat.v4.new_markdown_cell("my own cell after the imports"))
    nbformat.write(nb, published)

    again = runner.run_template("ioi", "induction_checks", "toy-induction", threads=2, progress=False)
    assert again.status == "ok" and "notes carried over (1 notes cells, 1 inserted cells)" in again.message, again.message
    sources = [c.source for c in nbformat.read(published, as_version=4).cells]
    assert "L0H1 attends to the previous token; compare with gpt2-small" in sources
    assert "import" in sources[sources.index("my own cell after the imports") - 1]
    assert "compare with gpt2-small" in published.with_suffix(".html").read_text()
    kept = list((published.parent / notes.EDITED_DIR).glob("induction_checks-*.ipynb"))
    assert len(kept) == 1 and "my own cell after the imports" in kept[0].read_text()
    assert not notes.was_edited(published)  # the new notebook is recorded as written


def test_minimal_circuit_reads_head_functions(head_functions_run, outputs):
    result = runner.run_template(
        "ioi",
        "minimal_circuit",
        "toy-ioi",
        n_prompts=16,
        threads=2,
        progress=False,
        extra_parameters={"n_random": 5, "completeness_subsets": 5, "minimality_max_k": 1, "circuit_from": "roles"},
    )
    assert result.status == "ok", result.message
    out = outputs / "ioi" / "toy-ioi"
    assert not executed_errors(out / "minimal_circuit.ipynb")
    data = json.loads((out / "minimal_circuit.json").read_text())
    roles = json.loads((out / "head_functions.json").read_text())["roles"]["table"]
    kept = sorted(r["head"] for r in roles if r["role"] != "unclassified" or abs(r["patch_head_out"]) >= 0.1)  # min_patch_effect
    assert sorted(h for hs in data["circuit"]["groups"].values() for h in hs) == kept
    assert sorted(data["circuit_choice"]["left_out"]) == sorted(r["head"] for r in roles if r["head"] not in kept)
    assert data["faithfulness"]["full model (all heads)"] == pytest.approx(1.0, abs=1e-5)
    groups = data["circuit"]["groups"]
    assert all(set(m["K"]) <= set(groups[m["group"]]) - {h} for h, m in data["minimality"].items())
    assert (out / "circuit.json").exists()
    assert data["backup"]["risers"] and all("in_circuit" in h for h in data["backup"]["risers"])  # read from circuit_expms
    if figures.browser_found():
        assert (out / "minimal_circuit_figures" / "circuit_diagram.svg").stat().st_size > 1000


def test_circuit_discovery_hands_its_circuit_to_minimal_circuit(head_functions_run, outputs):
    from helpers.methods.edges import EdgeCircuit

    result = runner.run_template(
        "ioi",
        "circuit_discovery",
        "toy-ioi",
        n_prompts=16,
        threads=2,
        progress=False,
        extra_parameters={"n_random": 3, "fractions": [0.01, 0.05, 0.2, 1.0], "acdc_thresholds": [0.1]},
    )
    assert result.status == "ok", result.message
    out = outputs / "ioi" / "toy-ioi"
    assert not executed_errors(out / "circuit_discovery.ipynb")
    data = json.loads((out / "circuit_discovery.json").read_text())
    assert data["not_supported"] is None and data["graph"]["edges"] == 479
    for method in ("eap", "eap-ig"):
        curve = data["curves"][method]
        assert curve["cpr"] > curve["random_cpr"] and curve["cmd"] < curve["random_cmd"]
        assert data["agreement_with_exact"][method] > 0.5  # Spearman with exact single-edge patching
    assert len(data["acdc"]) == 1 and data["curves"]["acdc"]["points"][0]["n_edges"] == data["acdc"][0]["n_edges"]
    smallest = data["smallest"]
    assert smallest["reached"] and smallest["circuit"]["faithfulness"] >= 0.8 and smallest["core_heads"]
    circuit = EdgeCircuit.from_json(json.loads((out / "edge_circuit.json").read_text()))
    assert circuit.edges == [e["edge"] for e in smallest["circuit"]["edges"]]
    result = runner.run_template(
        "ioi",
        "minimal_circuit",
        "toy-ioi",
        n_prompts=16,
        threads=2,
        progress=False,
        extra_parameters={"n_random": 5, "completeness_subsets": 3, "minimality_max_k": 1},
    )
    assert result.status == "ok", result.message
    minimal = json.loads((out / "minimal_circuit.json").read_text())
    chosen = minimal["circuit_choice"]
    assert chosen["source"] == "discovery"
    assert sorted(h for hs in chosen["circuit"]["groups"].values() for h in hs) == sorted(smallest["core_heads"])
    # one circuit, one verdict: by default the intervention that found it, and the same number as circuit_discovery's
    assert minimal["ablation"] == "resample" and minimal["normalisation"] == "gap"
    assert minimal["faithfulness"]["circuit"] == pytest.approx(smallest["core_faithfulness"], abs=1e-4)
    assert minimal["alternative"]["ablation"] == "mean" and minimal["alternative"]["normalisation"] == "ratio"
    assert "beats_random" in minimal["alternative"]["versus_random"]
    # the circuit travels: MIB's format, read back as the same edges
    from helpers.analyses import mib_format
    from helpers.methods.edges import Graph
    from helpers.task.models import load_model

    graph = Graph.from_model(load_model("toy-ioi", device="cpu"))
    assert mib_format.load_mib(out / "circuit_mib.json", graph).edges == circuit.edges


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not path:
        pytest.skip("no Chromium: `make install` installs Debian's chromium where it can (root + apt-get); here it could not")
    return path


def test_report_is_self_contained_with_cross_task_view(first_batch, outputs):
    page = write_report(outputs, first_batch)
    text = page.read_text()
    assert "<script" not in text and 'src="http' not in text and 'href="http' not in text, "the report must work offline"
    assert "Shared heads across tasks · toy-ioi" in text and text.count("<img") >= 4 and "data:image/png;base64," in text
    for task in ("ioi", "numseq"):
        assert f"{task}/toy-ioi/circuit_expms.html" in text and (outputs / task / "toy-ioi" / "circuit_expms.html").exists()
    assert "broken.yaml" in text  # the runs table names the red run
    view = next(v for v in report.cross_task(report.collect(outputs)) if v.model == "toy-ioi")
    assert view.tasks == ["ioi", "numseq"] and "L3H2" in view.top["ioi"]
    assert view.overlap[0, 0] == 1.0 and 0 <= view.overlap[0, 1] <= 1


def test_report_renders_in_headless_chromium(first_batch, outputs, tmp_path):
    from PIL import Image

    page = write_report(outputs, first_batch)
    browser = chromium()
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,2400"]
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True, cwd=tmp_path)
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count("<table") >= 5 and dom.count("<img") >= 4 and "Shared heads across tasks" in dom
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1400)
    ink = (pixels.min(axis=2) < 200).mean()
    blue = ((pixels[..., 2] - pixels[..., 0]) > 60).mean()  # the matrix cells and the heatmap thumbnails
    assert ink > 0.02 and blue > 0.002, f"the page looks blank: {ink:.3%} ink, {blue:.3%} blue"


def test_mlp_neurons_opens_up_the_top_mlp_layers(ioi_run, outputs):
    result = runner.run_template("ioi", "mlp_neurons", "toy-ioi", n_prompts=16, threads=2, progress=False, extra_parameters={"n_exact": 8})
    assert result.status == "ok", result.message
    out = outputs / "ioi" / "toy-ioi"
    nb = nbformat.read(out / "mlp_neurons.ipynb", as_version=4)
    assert not executed_errors(out / "mlp_neurons.ipynb")
    stderr = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "stream" and o.name == "stderr"
    )
    assert "Warning" not in stderr and "helpers/" not in stderr, stderr[:2000]
    data = json.loads((out / "mlp_neurons.json").read_text())
    scores = {int(k): v for k, v in data["layer_scores"].items()}
    assert data["layers_patched"] == sorted(sorted(scores, key=scores.get, reverse=True)[:2])  # the top 2 by mlp_out patching
    assert data["neuron_dla"]["identity_error"] < 1e-4
    for check in data["neuron_patching"]["checks"]:
        assert check["all neurons patched"] == pytest.approx(check["mlp_out patched (all positions)"], abs=1e-4)
        assert check["neurons patched exactly"] == 8
    assert len(data["neuron_patching"]["top"]) == 10 and data["neuron_patching"]["spearman_estimate_vs_exact"] > 0.5
    assert all(len(rows) == 5 for rows in data["top_activating"].values()) and data["output_tokens"]
