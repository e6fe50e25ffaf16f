"""The real-model tier (``make test-real``): every template on SmolLM2-135M and Gemma-3-270M, executed as ``make all``
runs them, with no error cell, within the memory budget, and the numbers a real model must show.

Long (tens of minutes on a 2-core CPU), so marked ``real`` and left out of ``make test``; ``make test-real`` prepares
both models first. ``CIRCUIT_LAB_REAL_PROMPTS`` sets the prompts per task (default 16).
"""

from __future__ import annotations

import json
import os

import pytest

from helpers.runner import batch
from helpers.schema import outputs
from helpers.task import real_models as R

pytestmark = pytest.mark.real
N_PROMPTS = int(os.environ.get("CIRCUIT_LAB_REAL_PROMPTS", "16"))
PEAK_RSS_GB = 6.0  # the budget at 64 prompts under the default memory budget


@pytest.fixture(scope="module", params=sorted(R.REAL_MODELS))
def real_batch(request, tmp_path_factory):
    if not R.is_prepared(request.param):
        pytest.skip(f"{request.param} not prepared (make real-models)")
    out = tmp_path_factory.mktemp(f"out-{request.param}")
    os.environ["CIRCUIT_LAB_OUTPUTS"] = str(out)
    try:
        report = batch.run_batch(["ioi"], [request.param], options=batch.RunOptions(n_prompts=N_PROMPTS, threads=2, progress=False))
    finally:
        os.environ.pop("CIRCUIT_LAB_OUTPUTS", None)
    return request.param, out, report


def test_every_template_runs_without_error_within_memory(real_batch):
    model, out, report = real_batch
    print(report.table())
    assert report.exit_code == 0, report.table()
    assert {r.template for r in report.results} == set(outputs.available_templates())
    over = {r.template: r.peak_rss_mb for r in report.results if r.peak_rss_mb is None or r.peak_rss_mb / 1024 > PEAK_RSS_GB}
    assert not over, f"peak kernel memory over {PEAK_RSS_GB} GB: {over} MB"


def test_real_model_numbers(real_batch):
    model, out, _ = real_batch
    folder = out / "ioi" / model
    expms = json.loads((folder / "circuit_expms.json").read_text())
    assert expms["task_check"]["task_performed"]
    assert expms["dla"]["exact"]  # Gemma's post-norms too: each head's share goes through the norm with its scale frozen
    if expms["patching"]["by_pos_heads"] is not None:  # more heads than analysis.by_pos_heads: the top ones, exactly
        assert len(expms["patching"]["by_pos_heads"]) == 24
    importance = expms["importance"]
    if importance["heads"] is not None:  # more heads than analysis.importance_heads: the estimate's top ones, exactly
        exact = {(layer, head) for layer, head in importance["heads"]}
        ran = {(layer, head) for layer, row in enumerate(importance["answer_loss"]) for head, v in enumerate(row) if v is not None}
        assert ran == exact and 16 <= len(exact) <= 16 + 16 + 5
    induction = json.loads((out / outputs.MODEL_SCOPE / model / "induction_checks.json").read_text())
    assert induction["heads"]["induction"], "a real model has induction heads"
    assert induction["loss"]["second_half"] < 0.5 * induction["loss"]["first_half"]
    discovery = json.loads((folder / "circuit_discovery.json").read_text())
    if discovery["not_supported"] is None:
        smallest = discovery["smallest"]
        assert smallest["reached"] and max(smallest["random_edges"]) < 0.3
        assert all(v is not None for v in discovery["agreement_with_exact"].values())
