"""The report's numbers on results files: importance matrix, Jaccard overlap, cards, and unreadable files.

Fixtures are real results (``tests/data/results/``: every template run on a tiny Llama by
``test_family_notebooks``), changed where a test needs other numbers: they pass the schemas as a template's
own output does, so a schema change that real files would not pass fails here too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from helpers.runner import report
from helpers.schema import results

FIXTURES = Path(__file__).parent / "data" / "results"


def fixture(template: str, changes: dict | None = None) -> dict:
    """A real results file of ``template`` with ``changes`` ({"dotted.key": value}) applied."""
    data = json.loads((FIXTURES / f"{template}.json").read_text())
    for key, value in (changes or {}).items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[last] = copy.deepcopy(value)
    return data


def typed(template: str, changes: dict | None = None) -> results.TemplateResults:
    return results.validate_results(template, fixture(template, changes))


def write_result(root, task, model, template, changes=None, data=None):
    folder = root / task / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{template}.json").write_text(json.dumps(data if data is not None else fixture(template, changes)))
    return folder


def patching(values):
    return {"patching.values.head_out": values, "logit_diff.clean": 3.0, "logit_diff.corrupted": -1.0}


def performing(changes: dict | None = None) -> dict:
    return {"task_check.task_performed": True, "task_check.reasons": [], **(changes or {})}


def test_jaccard():
    assert report.jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert report.jaccard(set(), set()) == 1.0


def test_cross_task_matrix_and_overlap(tmp_path):
    # 2 layers x 3 heads; task A's top 2 = {L0H0, L1H2}, task B's = {L1H2, L0H1}
    write_result(tmp_path, "a", "m", "circuit_expms", performing(patching([[0.9, 0.0, 0.1], [0.0, 0.05, -0.5]])))
    write_result(tmp_path, "b", "m", "circuit_expms", performing(patching([[0.0, 0.4, 0.0], [0.0, 0.0, 0.8]])))
    write_result(tmp_path, "c", "other", "circuit_expms", performing(patching([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])))
    write_result(tmp_path, "d", "m", "circuit_expms", patching([[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]]))  # task not performed: left out
    (view, other) = report.cross_task(report.collect(tmp_path), k=2)
    assert view.model == "m" and view.tasks == ["a", "b"] and other.tasks == ["c"]
    assert view.top == {"a": ["L0H0", "L1H2"], "b": ["L1H2", "L0H1"]}
    assert view.heads == ["L0H0", "L1H2", "L0H1"]  # strongest |importance| in any task first
    np.testing.assert_allclose(view.importance, [[0.9, 0.0], [-0.5, 0.8], [0.0, 0.4]])
    np.testing.assert_allclose(view.overlap, [[1.0, 1 / 3], [1 / 3, 1.0]])


def test_unknown_template_gets_a_card_and_non_results_are_ignored(tmp_path):
    folder = write_result(tmp_path, "a", "m", "my_new_template", data={"template": "my_new_template", "figures": [], "anything": 1})
    (folder / "circuit.json").write_text(json.dumps({"groups": {}}))  # no "template" key: not a template's results
    (tmp_path / ".failed" / "a" / "m").mkdir(parents=True)
    folders = report.collect(tmp_path)
    assert [(f.task, f.model, sorted(f.results)) for f in folders] == [("a", "m", ["my_new_template"])]
    page = report.write_report(tmp_path).read_text()
    assert "my_new_template" in page and "a/m/my_new_template.html" in page and "Shared heads" not in page


def test_per_model_results_are_shared_by_every_task_and_run_times_shown(tmp_path):
    write_result(tmp_path, "a", "m", "circuit_expms", performing(patching([[0.9, 0.0, 0.1], [0.0, 0.05, -0.5]])))
    write_result(tmp_path, "b", "m", "circuit_expms", performing(patching([[0.0, 0.4, 0.0], [0.0, 0.0, 0.8]])))
    shared = write_result(
        tmp_path,
        "_models",
        "m",
        "induction_checks",
        {"heads.induction": [{"layer": 1, "head": 2, "value": 0.9}], "loss.second_half": 0.25},
    )
    heaviest = {"index": 7, "first_line": "scores = heads.induction_scores(model)", "peak_rss_mb": 3072.0}
    meta = {"papermill": {"duration": 41.6}, "circuit_lab": {"peak_rss_mb": 3100.0, "heaviest_cell": heaviest}}
    (shared / "induction_checks.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    folders = report.collect(tmp_path)
    assert [f.task for f in folders] == ["a", "b"]  # _models is not a task
    assert all(f.of("induction_checks").loss["second_half"] == 0.25 for f in folders)
    assert report.run_resources(folders[0].per_model, "induction_checks").seconds == pytest.approx(41.6)
    assert report.run_resources(folders[0], "circuit_expms") == report.RunResources()  # no notebook: no time, no error
    page = report.write_report(tmp_path).read_text()
    assert page.count('id="_models-m"') == 1 and "m · every task" in page and "42 s" in page
    assert "3.03 GB" in page and "cell 7 (scores = heads.induction_scores(model)): 3.00 GB" in page
    assert page.count("loss on the repeat (induction)") == 2  # in each task's key numbers
    assert "L1H2 (+0.90)" in page  # the induction heads, at the threshold the notebook used


def test_the_card_lists_the_top_neurons_when_mlp_neurons_ran(tmp_path):
    from helpers.runner.report import ResultFolder, folder_section

    neurons = typed(
        "mlp_neurons",
        {
            "layers_patched": [0, 3],
            "neuron_dla.top": [{"layer": 3, "neuron": 17, "dla": 0.52}],
            "neuron_patching.top": [{"layer": 0, "neuron": 5, "patching": -0.21}],
        },
    )
    card = folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {"mlp_neurons": neurons}), tmp_path)
    assert "L3N17 (+0.52)" in card and "L0N5 (-0.21)" in card and "MLP layers 0, 3" in card
    assert "top neurons" not in folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {}), tmp_path)


def test_the_card_shows_the_discovered_circuit_or_why_not(tmp_path):
    from helpers.runner.report import ResultFolder, folder_section

    found = typed(
        "circuit_discovery",
        {
            "curves": {"eap-ig": {"method": "eap-ig", "cpr": 0.96, "random_cpr": 0.27, "cmd": 0.04, "random_cmd": 0.73}},
            "smallest.circuit": {"method": "eap-ig", "n_edges": 17, "heads": ["L0H0", "L3H2"], "faithfulness": 0.871},
            "smallest.target": 0.8,
            "smallest.reached": True,
            "smallest.core_heads": ["L3H2"],
            "smallest.core_faithfulness": 0.8,
            "smallest.random_core": [0.0, 0.1],
        },
    )
    card = folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {"circuit_discovery": found}), tmp_path)
    assert "CPR 0.960 (random 0.270)" in card and "17 edges over 2 heads, faithfulness 0.871" in card
    assert "L3H2: 0.800 (random head sets of that size: 0.050)" in card
    refused = typed("circuit_discovery", {"not_supported": "no q/k/v fork", "smallest": None, "curves": {}})
    card = folder_section(ResultFolder("ioi", "m", tmp_path, {"circuit_discovery": refused}), tmp_path)
    assert "Circuit discovery</b>: no q/k/v fork" in card
    assert "Circuit discovery" not in folder_section(ResultFolder("ioi", "toy-ioi", tmp_path, {}), tmp_path)


# ---------------------------------------------------------------- the schemas


@pytest.mark.parametrize("template", sorted(results.SCHEMAS))
def test_every_fixture_is_a_template_s_real_output_and_passes_its_schema(template):
    typed_ = typed(template)
    assert type(typed_) is results.SCHEMAS[template] and typed_.template == template


def test_a_renamed_key_is_a_clear_error_on_the_page_and_in_the_exit_code_not_a_missing_row(tmp_path, capsys):
    renamed = fixture("circuit_expms", performing())
    renamed["dla"]["top_pos"] = renamed["dla"].pop("top_positive")
    write_result(tmp_path, "ioi", "m", "circuit_expms", data=renamed)
    write_result(tmp_path, "ioi", "m", "head_functions", performing())
    (folder,) = report.collect(tmp_path)
    assert sorted(folder.results) == ["head_functions"] and list(folder.errors) == ["circuit_expms"]
    why = folder.errors["circuit_expms"]
    assert "circuit_expms.json does not match the circuit_expms results schema" in why
    assert "dla.top_positive: missing" in why and "dla.top_pos: not a key of this schema" in why and "Rerun the circuit_expms" in why
    assert report.main(["--outputs", str(tmp_path)]) == 1
    assert "dla.top_positive: missing" in capsys.readouterr().err
    page = (tmp_path / "index.html").read_text()
    assert "circuit_expms.json could not be read" in page and "dla.top_positive: missing" in page
    with pytest.raises(results.ResultsSchemaError, match=r"dla\.top_positive: missing"):
        results.read_results(tmp_path / "ioi" / "m" / "circuit_expms.json")


def test_a_file_of_another_schema_version_or_not_json_is_refused_with_the_fix(tmp_path):
    old = fixture("head_functions")
    del old["schema_version"]  # written before the schemas
    path = tmp_path / "head_functions.json"
    path.write_text(json.dumps(old))
    with pytest.raises(results.ResultsSchemaError, match="schema version 1; this code reads version 2. Rerun the head_functions"):
        results.read_results(path)
    path.write_text("{not json")
    with pytest.raises(results.ResultsSchemaError, match="not a readable results file"):
        results.read_results(path)


def test_results_are_validated_before_they_are_written(tmp_path):
    """A template's last cell fails on a key its schema does not know, naming it, and writes nothing."""
    from types import SimpleNamespace

    from helpers.notebook.session import Session

    s = SimpleNamespace(task_check=None, out_dir=tmp_path, figures=SimpleNamespace(missing=[]))
    data = fixture("induction_checks")
    data["treshold"] = data.pop("thresholds")
    with pytest.raises(results.ResultsSchemaError, match=r"thresholds: missing[\s\S]*treshold: not a key"):
        Session.write_results(s, "induction_checks", data)
    assert not (tmp_path / "induction_checks.json").exists()
    good = Session.write_results(s, "induction_checks", fixture("induction_checks"))
    assert results.read_results(good).heads.keys() == {"prev_token", "duplicate_token", "induction"}


def test_typed_results_read_heads_as_heads():
    from helpers.schema.heads import Head, HeadScore

    circuit = typed("circuit_expms")
    assert all(isinstance(h, HeadScore) for h in circuit.dla.top_positive)
    assert isinstance(circuit.backup.ablated, Head)
    assert circuit.important_heads() == sorted(
        {h.unit for h in circuit.dla.top_positive + circuit.dla.top_negative} | {h.unit for h in circuit.patching.top_heads["head_out"]}
    )
