"""make copy: a template as the researcher's own notebook, parameters filled in, never overwritten."""

from __future__ import annotations

import nbformat

from helpers.runner import workcopy
from helpers.schema import outputs


def test_a_working_copy_has_the_task_parameters_and_is_never_overwritten(tmp_path, capsys):
    dest = workcopy.working_copy("ioi", "minimal_circuit", "toy-ioi", tmp_path / "work")
    assert dest == (tmp_path / "work" / "ioi" / "toy-ioi" / "minimal_circuit.ipynb").resolve()
    nb = nbformat.read(dest, as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'task = "ioi"' in injected.source and 'model_name = "toy-ioi"' in injected.source
    assert f'output_dir = "{dest.parent}"' in injected.source  # running it writes next to itself, not into nb_outputs
    assert f'input_dir = "{outputs.outputs_dir() / "ioi" / "toy-ioi"}"' in injected.source
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code")  # not executed
    assert sum("notes" in c.metadata.get("tags", []) for c in nb.cells) >= 6
    dest.write_text(dest.read_text().replace("Your notes.", "My notes."))
    assert workcopy.main(["--task", "ioi", "--template", "minimal_circuit", "--model", "toy-ioi", "--to", str(tmp_path / "work")]) == 2
    assert "not overwritten" in capsys.readouterr().err and "My notes." in dest.read_text()
    assert workcopy.main(["--task", "nope", "--template", "minimal_circuit", "--to", str(tmp_path / "work")]) == 2
    assert workcopy.main(["--task", "ioi", "--template", "nope", "--to", str(tmp_path / "work")]) == 2
    assert not (tmp_path / "work" / "nope").exists()
