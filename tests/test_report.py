"""The report's numbers on synthetic results: importance matrix, Jaccard overlap, cards for unknown templates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import report


def write_result(root, task, model, template, data):
    folder = root / task / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{template}.json").write_text(json.dumps({"template": template, **data}))
    return folder


def patching(values):
    return {"patching": {"values": {"head_out": values}}, "logit_diff": {"clean": 3.0, "corrupted": -1.0}}


def test_jaccard():
    assert report.jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert report.jaccard(set(), set()) == 1.0


def test_cross_task_matrix_and_overlap(tmp_path):
    # 2 layers x 3 heads; task A's top 2 = {L0H0, L1H2}, task B's = {L1H2, L0H1}
    write_result(tmp_path, "a", "m", "circuit_expms", patching([[0.9, 0.0, 0.1], [0.0, 0.05, -0.5]]))
    write_result(tmp_path, "b", "m", "circuit_expms", patching([[0.0, 0.4, 0.0], [0.0, 0.0, 0.8]]))
    write_result(tmp_path, "c", "other", "circuit_expms", patching([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    (view, other) = report.cross_task(report.collect(tmp_path), k=2)
    assert view.model == "m" and view.tasks == ["a", "b"] and other.tasks == ["c"]
    assert view.top == {"a": ["L0H0", "L1H2"], "b": ["L1H2", "L0H1"]}
    assert view.heads == ["L0H0", "L1H2", "L0H1"]  # strongest |importance| in any task first
    np.testing.assert_allclose(view.importance, [[0.9, 0.0], [-0.5, 0.8], [0.0, 0.4]])
    np.testing.assert_allclose(view.overlap, [[1.0, 1 / 3], [1 / 3, 1.0]])


def test_unknown_template_gets_a_card_and_non_results_are_ignored(tmp_path):
    folder = write_result(tmp_path, "a", "m", "my_new_template", {"figures": []})
    (folder / "circuit.json").write_text(json.dumps({"groups": {}}))  # no "template" key: not a template's results
    (tmp_path / ".failed" / "a" / "m").mkdir(parents=True)
    folders = report.collect(tmp_path)
    assert [(f.task, f.model, sorted(f.results)) for f in folders] == [("a", "m", ["my_new_template"])]
    page = report.write_report(tmp_path).read_text()
    assert "my_new_template" in page and "a/m/my_new_template.html" in page and "Shared heads" not in page


def test_per_model_results_are_shared_by_every_task_and_run_times_shown(tmp_path):
    write_result(tmp_path, "a", "m", "circuit_expms", patching([[0.9, 0.0, 0.1], [0.0, 0.05, -0.5]]))
    write_result(tmp_path, "b", "m", "circuit_expms", patching([[0.0, 0.4, 0.0], [0.0, 0.0, 0.8]]))
    shared = write_result(
        tmp_path,
        "_models",
        "m",
        "induction_checks",
        {"heads": {"induction": [{"layer": 1, "head": 2, "value": 0.9}]}, "loss": {"second_half": 0.25}},
    )
    (shared / "induction_checks.ipynb").write_text(json.dumps({"metadata": {"papermill": {"duration": 41.6}}, "cells": []}))
    folders = report.collect(tmp_path)
    assert [f.task for f in folders] == ["a", "b"]  # _models is not a task
    assert all(f.get("induction_checks", "loss", "second_half") == 0.25 for f in folders)
    assert report.run_seconds(folders[0].per_model, "induction_checks") == pytest.approx(41.6)
    assert report.run_seconds(folders[0], "circuit_expms") is None  # no notebook: no time, no error
    page = report.write_report(tmp_path).read_text()
    assert page.count('id="_models-m"') == 1 and "m · every task" in page and "42 s" in page
    assert page.count("loss on the repeat (induction)") == 2  # in each task's key numbers


def test_the_card_lists_the_top_neurons_when_mlp_neurons_ran(tmp_path):
    from helpers.report import ResultFolder, folder_section

    neurons = {
        "layers_patched": [0, 3],
        "neuron_dla": {"top": [{"layer": 3, "neuron": 17, "dla": 0.52}]},
        "neuron_patching": {"top": [{"layer": 0, "neuron": 5, "patching": -0.21}]},
    }
    card = folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {"mlp_neurons": neurons}), tmp_path)
    assert "L3N17 (+0.52)" in card and "L0N5 (-0.21)" in card and "MLP layers 0, 3" in card
    assert "top neurons" not in folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {}), tmp_path)


def test_the_card_shows_the_discovered_circuit_or_why_not(tmp_path):
    from helpers.report import ResultFolder, folder_section

    found = {
        "not_supported": None,
        "curves": {"eap-ig": {"cpr": 0.96, "random_cpr": 0.27, "cmd": 0.04, "random_cmd": 0.73}},
        "smallest": {
            "circuit": {"method": "eap-ig", "n_edges": 17, "heads": ["L0H0", "L3H2"], "faithfulness": 0.871},
            "target": 0.8,
            "reached": True,
            "core_heads": ["L3H2"],
            "core_faithfulness": 0.8,
            "random_core": [0.0, 0.1],
        },
    }
    card = folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {"circuit_discovery": found}), tmp_path)
    assert "CPR 0.960 (random 0.270)" in card and "17 edges over 2 heads, faithfulness 0.871" in card
    assert "L3H2: 0.800 (random head sets of that size: 0.050)" in card
    refused = folder_section(ResultFolder("ioi", "m", tmp_path, {"circuit_discovery": {"not_supported": "no q/k/v fork"}}), tmp_path)
    assert "Circuit discovery</b>: no q/k/v fork" in refused
    assert "Circuit discovery" not in folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {}), tmp_path)
