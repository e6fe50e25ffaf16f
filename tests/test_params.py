"""Params validation: every bad input names the file and the field, and the CLI exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import PARAMS_DIR
from helpers.runner.cli import check_params as main
from helpers.task.params import ParamsError, load_params
from helpers.task.prompts import make_prompts


def write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((PARAMS_DIR / "ioi.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("task", ["ioi", "numseq", "months", "days"])
def test_shipped_params_are_valid(task):
    assert load_params(task).task == task


@pytest.mark.parametrize(
    "changes, field, hint",
    [
        ({"template": None}, "template", "required field is missing"),
        ({"template": "When [S1] and [S9] went to"}, "template", "[S9]"),
        ({"slots": {"S1": "names", "S2": "nosuchpool", "S3": "places", "S4": "objects", "S5": "names"}}, "slots", "nosuchpool"),
        ({"positions": {"IO": "S7"}}, "positions.IO", "0 occurrence"),
        ({"n_prompts": 0}, "n_prompts", "greater than or equal to 1"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"corruption": "resample:S2#2"}, "corrupted_template", "exactly one of"),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path, changes, field, hint):
    path = write(tmp_path, **changes)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg and hint in msg, msg


@pytest.mark.parametrize(
    "changes, field, hint",
    [
        ({"correct": " [S1] and"}, "correct", "2 token(s)"),
        ({"correct": " Zyzzyva"}, "correct", "unknown word"),
        ({"corrupted_template": "When [S1] and [S2] went to the [S3], [S5] gave a [S4] to the"}, "same token length", "corrupted"),
        ({"n_prompts": 3000, "slots": {s: "days" for s in ["S1", "S2", "S3", "S4", "S5"]}}, "n_prompts", "allow only 2520"),
        ({"template": "When [S1] and [S2] strolled to the [S3], [S2] gave a [S4] to"}, "template", "words unknown"),
    ],
)
def test_prompt_errors_name_file_and_field(tmp_path, toy_ioi, changes, field, hint):
    path = write(tmp_path, **changes)
    with pytest.raises(ParamsError) as err:
        make_prompts(load_params(path), toy_ioi.tokenizer, verbose=False)
    msg = str(err.value)
    assert field in msg and hint in msg, msg


def test_named_corruption_derives_abc_template(tmp_path, toy_ioi):
    p = load_params(write(tmp_path, corrupted_template=None, corruption="resample:S2#2"))
    ps = make_prompts(p, toy_ioi.tokenizer, verbose=False)
    assert all(w["S2_corrupt"] not in (w["S1"], w["S2"]) for w in ps.slot_words)
    assert p.corrupted == "When [S1] and [S2] went to the [S3], [S2_corrupt] gave a [S4] to"


def test_cli_exit_code(tmp_path, capsys):
    assert main([str(write(tmp_path, template=None))]) == 1
    assert "template" in capsys.readouterr().err
    assert main([str(PARAMS_DIR / "ioi.yaml")]) == 0


def test_circuit_in_params_is_validated(tmp_path):
    data = yaml.safe_load((PARAMS_DIR / "ioi.yaml").read_text())
    data["circuit"] = {"groups": {"mover": ["L3H2"]}, "positions": {"L3H2": ["end"]}}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(data))
    assert load_params(str(good)).circuit.groups == {"mover": ["L3H2"]}
    for bad_circuit, message in [
        ({"groups": {"mover": ["3.2"]}}, "L<layer>H<head>"),
        ({"groups": {"mover": ["L3H2"]}, "positions": {"L3H2": ["nowhere"]}}, "not named under positions"),
        ({"groups": {"mover": ["L3H2"]}, "positions": {"L0H0": ["end"]}}, "in no group"),
    ]:
        data["circuit"] = bad_circuit
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(data))
        with pytest.raises(ParamsError, match=message):
            load_params(str(bad))


def test_the_params_seed_seeds_torch_in_the_notebook(tmp_path):
    """A notebook's session seeds torch's global generator with the params' ``seed`` (not a fixed 0)."""
    import torch

    from helpers.notebook import session

    data = yaml.safe_load((PARAMS_DIR / "ioi.yaml").read_text()) | {"seed": 7}
    path = tmp_path / "ioi_seed7.yaml"
    path.write_text(yaml.safe_dump(data))
    s = session.start_session("circuit_expms", "ioi", str(path), None, 4, str(tmp_path / "out"), "cpu", None, False)
    assert s.params.seed == 7 and torch.initial_seed() == 7
