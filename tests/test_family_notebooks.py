"""Every template executes with no error cell on every model family (tiny random-init models).

Random weights do not do the task: the notebooks must then say so (the normalisation warning in the JSON)
rather than print nonsense silently. Llama (rotary, RMSNorm, GQA) runs in the default suite; the other
families are marked slow (``make test-all``); the bundled models' notebooks run in ``test_notebooks``.
"""

from __future__ import annotations

import json

import nbformat
import pytest

from helpers.runner import batch
from helpers.schema import outputs
from helpers.toys.families import FAMILIES

FAST = {"llama"}
TEMPLATES = sorted(p.stem for p in outputs.templates_dir().glob("*.py"))  # every template, as make all runs them


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES])
def test_every_template_executes(family, family_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "OUTPUTS_DIR", tmp_path)
    model_dir = family_dirs(family)
    options = batch.RunOptions(
        n_prompts=4, threads=2, progress=False, extra_parameters={"static_images": False}
    )  # PNG export: test_notebooks
    report = batch.run_batch(["ioi"], models=[str(model_dir)], options=options)
    assert {r.template: r.status for r in report.results} == dict.fromkeys(TEMPLATES, "ok"), report.table()
    out = tmp_path / "ioi" / model_dir.name
    for template in TEMPLATES:  # a per-model template (induction_checks) runs once per model, into _models/
        folder = tmp_path / "_models" / model_dir.name if outputs.scope_of(template) == "model" else out
        nb = nbformat.read(folder / f"{template}.ipynb", as_version=4)
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    results = json.loads((out / "circuit_expms.json").read_text())
    assert results["patching"]["normalisation"]["status"] in {"ok", "small", "zero"}
    assert results["dla"]["exact"] == (family != "gemma2")  # Gemma-2 soft-caps its logits: DLA is approximate there
    assert bool(results["patching"]["not_supported"]) == (family in {"opt", "gptj"})  # pattern edits are discarded there
    discovery = json.loads((out / "circuit_discovery.json").read_text())
    assert discovery["not_supported"] is None, discovery["not_supported"]  # edges on every family (issue 30)
    choice = json.loads((out / "minimal_circuit.json").read_text())["circuit_choice"]
    core = (discovery["smallest"] or {}).get("core_heads")
    assert choice["source"] == ("discovery" if core else "roles"), choice  # the discovered heads wherever discovery found some
