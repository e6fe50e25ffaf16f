"""Results handed from one template to the next are for the same parameters."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.notebook import session
from helpers.schema.artifacts import to_jsonable, write_json
from helpers.task.params import load_params


def test_results_of_other_parameters_are_refused_by_name(tmp_path):
    params = load_params("ioi")
    s = SimpleNamespace(params=params, model_name=params.model, input_dir=tmp_path)
    real = json.loads((Path(__file__).parent / "data" / "results" / "circuit_expms.json").read_text())  # a template's output
    write_json(tmp_path / "circuit_expms.json", {**real, "params": to_jsonable(params), "model": "m1"})
    assert session.load_results(s, "circuit_expms").model == "m1"
    other = load_params("ioi", n_prompts=params.n_prompts + 1)
    write_json(tmp_path / "circuit_expms.json", {**real, "params": to_jsonable(other)})
    with pytest.raises(session.MissingResults, match=r"other parameters \(n_prompts differ.*rerun the circuit_expms template"):
        session.load_results(s, "circuit_expms")
    with pytest.raises(session.MissingResults, match="head_functions.json not found"):
        session.load_results(s, "head_functions")
