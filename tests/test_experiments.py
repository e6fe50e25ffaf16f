"""Results handed from one template to the next are for the same parameters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import experiments
from helpers.artifacts import to_jsonable, write_json
from helpers.params import load_params


def test_results_of_other_parameters_are_refused_by_name(tmp_path):
    params = load_params("ioi")
    session = SimpleNamespace(params=params, model_name=params.model, input_dir=tmp_path)
    write_json(tmp_path / "circuit_expms.json", {"params": to_jsonable(params), "value": 1})
    assert experiments.load_results(session, "circuit_expms")["value"] == 1
    other = load_params("ioi", n_prompts=params.n_prompts + 1)
    write_json(tmp_path / "circuit_expms.json", {"params": to_jsonable(other), "value": 2})
    with pytest.raises(experiments.MissingResults, match=r"other parameters \(n_prompts differ.*rerun the circuit_expms template"):
        experiments.load_results(session, "circuit_expms")
    with pytest.raises(experiments.MissingResults, match="head_functions.json not found"):
        experiments.load_results(session, "head_functions")
