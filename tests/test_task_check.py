"""The task-sanity gate: a model that does not do the task gets a banner, ``task_performed: false`` in every JSON,
figures marked as not meaningful, a line in the batch summary and a warning in the report."""

from __future__ import annotations

import json

import nbformat
import pytest
import torch

from helpers.engine.metrics import check_task
from helpers.runner import batch


def test_thresholds():
    good = check_task(torch.tensor([3.0, 2.0, 4.0, -0.5]), torch.tensor([-1.0, -2.0, 0.0, -1.0]), 0.75, 0.75, 1.0)
    assert good.performed and good.accuracy == 0.75 and good.reasons() == []
    flat = check_task(torch.tensor([0.1, -0.2, 0.05, -0.1]), torch.tensor([0.0, 0.1, -0.1, 0.0]), 0.0, 0.75, 1.0)
    assert not flat.performed and len(flat.reasons()) == 2
    assert flat.to_json()["task_performed"] is False and "50%" in flat.reasons()[0]


@pytest.fixture(scope="module")
def unperformed(tmp_path_factory):
    """circuit_expms of toy-induction (trained on repeated tokens only) on the IOI task, through the batch runner."""
    out = tmp_path_factory.mktemp("out")
    patch = pytest.MonkeyPatch()
    patch.setenv("CIRCUIT_LAB_OUTPUTS", str(out))
    report = batch.run_batch(["ioi"], ["toy-induction"], ["circuit_expms"], batch.RunOptions(n_prompts=8, threads=2, progress=False))
    yield out, report
    patch.undo()


def test_model_that_does_not_do_the_task_is_flagged_everywhere(unperformed):
    out, report = unperformed
    (result,) = report.results
    assert result.status == "ok", result.message
    assert result.message.startswith("task NOT performed") and "the model does not do the task" in report.table()
    folder = out / "ioi" / "toy-induction"
    data = json.loads((folder / "circuit_expms.json").read_text())
    assert data["task_check"]["task_performed"] is False and data["task_check"]["reasons"]
    nb = nbformat.read(folder / "circuit_expms.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    html_out = "".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "Task check failed" in html_out and "THE MODEL DOES NOT DO THIS TASK" in html_out
    figures = [o["data"]["text/html"] for o in outputs if "Plotly.newPlot" in o.get("data", {}).get("text/html", "")]
    assert len(figures) >= 10 and all("normalised values are not meaningful" in f for f in figures)
    from helpers.runner.report import write_report

    index = write_report(out).read_text()
    assert "The model does not do this task" in index


def test_circuit_against_random_controls():
    from helpers.analyses.circuits import compare_with_controls

    controls = torch.tensor([0.2, 0.4, 0.5, 0.3, 0.6, 0.1, 0.35, 0.45, 0.25, 0.55] * 2)
    good = compare_with_controls(0.95, controls)
    assert good.beats_random and good.p_value == 1 / 21 and "NOT" not in good.message()
    chance = compare_with_controls(0.5, controls)  # as close to 1 as several random circuits
    assert not chance.beats_random and "NOT better than random" in chance.message()
    assert chance.to_json()["beats_random"] is False
    overshoot = compare_with_controls(1.32, torch.tensor([0.55, 1.38, 0.9, 1.1]))  # the toy-ioi case, in small
    assert not overshoot.beats_random


def test_roles_summary_says_when_no_head_has_a_role():
    import pandas as pd

    from helpers.analyses.roles import roles_summary

    none = pd.DataFrame({"role": ["unclassified"] * 3}, index=["L0H0", "L1H1", "L2H2"])
    assert roles_summary(none).startswith("No head met any role rule") and "thresholds" in roles_summary(none)
    some = pd.DataFrame({"role": ["mover", "unclassified"]}, index=["L3H2", "L0H0"])
    assert roles_summary(some).startswith("Roles proposed: 1 mover")
