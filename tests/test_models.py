"""Model loading: bundled names, local dirs, hub aliases offline, and the training script."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from helpers import PROJECT_ROOT
from helpers.task.models import ModelNotAvailable, bundled_models, load_model, resolve_model
from helpers.task.params import load_params
from helpers.task.prompts import make_prompts
from helpers.toys.families import FAMILIES


def test_bundled_models_present():
    assert {"toy-ioi", "toy-induction"} <= set(bundled_models())
    for name in bundled_models():
        size = sum(p.stat().st_size for p in (PROJECT_ROOT / "models" / name).iterdir())
        assert size < 10 * 2**20, f"{name} is {size / 2**20:.1f} MB"


def test_gpt2_small_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelNotAvailable, match="not available offline.*toy-ioi"):
        resolve_model("gpt2-small")
    assert time.time() - t0 < 5


def test_bad_local_dir(tmp_path):
    with pytest.raises(ModelNotAvailable, match="config.json"):
        resolve_model(str(tmp_path))


def test_missing_tokenizer_config_is_an_error(tmp_path):
    """Without tokenizer_config.json the bridge would silently map all text to id 0 (TransformerLens 4.x)."""
    import shutil

    src = PROJECT_ROOT / "models" / "toy-induction"
    for f in ["config.json", "model.safetensors", "tokenizer.json"]:
        shutil.copy(src / f, tmp_path / f)
    with pytest.raises(ModelNotAvailable, match="tokenizer_config.json"):
        load_model(str(tmp_path), device="cpu")


def test_compat_mode_and_eval(toy_ioi):
    """load_model turns compatibility mode on (DLA and the logit lens need it) and the model is in eval mode."""
    assert toy_ioi.compatibility_mode is True
    assert all(getattr(block, "compatibility_mode", True) for block in toy_ioi.blocks)  # every component, not only the top
    assert "blocks.0.hook_resid_pre" in toy_ioi.hook_dict  # the HookedTransformer names it provides
    assert not toy_ioi.training
    assert toy_ioi.cfg.n_layers == 4
    assert toy_ioi.tokenizer.unk_token_id != toy_ioi.tokenizer.bos_token_id


def test_training_script_smoke(tmp_path):
    """A few steps of the real training loop, saved and loaded through the bridge."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "helpers.toys.toy_models",
            "--model",
            "toy-induction",
            "--steps",
            "3",
            "--out",
            str(tmp_path),
            "--threads",
            "1",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "toy-induction" / "README.md").exists()
    model = load_model(str(tmp_path / "toy-induction"), device="cpu")
    logits = model(model.to_tokens(" John and Mary"))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("task, min_accuracy", [("ioi", 0.9), ("numseq", 0.9), ("months", 0.9), ("days", 0.9)])
def test_toy_ioi_does_the_shipped_tasks(toy_ioi, task, min_accuracy):
    """Through the bridge, on the shipped params: the correct answer is the top token and beats the incorrect one."""
    from helpers.engine.metrics import logit_diff
    from helpers.task.params import load_params
    from helpers.task.prompts import make_prompts

    ps = make_prompts(load_params(task), toy_ioi.tokenizer, verbose=False)
    with torch.no_grad():
        clean, corrupted = toy_ioi(ps.clean_tokens), toy_ioi(ps.corrupted_tokens)
    accuracy = (clean[:, -1].argmax(-1) == ps.answer_tokens[:, 0]).float().mean().item()
    assert accuracy >= min_accuracy
    assert logit_diff(clean, ps.answer_tokens).mean() > logit_diff(corrupted, ps.answer_tokens).mean() + 1.0


def test_model_cards_report_measurements():
    import json

    for name in ["toy-ioi", "toy-ioi-llama", "toy-induction"]:
        card = (PROJECT_ROOT / "models" / name / "README.md").read_text()
        metrics = json.loads((PROJECT_ROOT / "models" / name / "training_metrics.json").read_text())
        assert "wall-clock" in card and "Induction evidence" in card
        assert metrics["config"]["name"] == name and metrics["train_wall_clock_s"] > 0
    for name in ["toy-ioi", "toy-ioi-llama"]:
        ioi = json.loads((PROJECT_ROOT / "models" / name / "training_metrics.json").read_text())
        assert ioi["final"]["ioi_train_templates"]["accuracy"] >= 0.95


def test_shipped_gpt2_tokenizer_reproduces_gpt2_ids():
    from helpers.task.models import load_tokenizer

    tok = load_tokenizer("gpt2-small")
    ids = tok("When Mary and John went to the store, John gave a drink to", add_special_tokens=False)["input_ids"]
    assert ids == [2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284]
    assert len(tok) == 50257 and tok.bos_token_id == 50256


def test_every_shipped_task_validates_against_gpt2_offline(capsys):
    from helpers.runner.cli import check_params as main

    assert main(["--model", "gpt2-small"]) == 0
    assert capsys.readouterr().out.count("gpt2-small's tokenizer") >= 4


@pytest.fixture(scope="module")
def toy_ioi_llama():
    return load_model("toy-ioi-llama", device="cpu")


def test_toy_ioi_llama_is_a_llama_that_does_ioi(toy_ioi_llama):
    from helpers.engine.metrics import check_normalisation
    from helpers.methods.patching import make_context

    m = toy_ioi_llama
    assert type(m.original_model).__name__ == "LlamaForCausalLM"
    assert (
        m.cfg.n_key_value_heads < m.cfg.n_heads
        and m.cfg.positional_embedding_type == "rotary"
        and m.cfg.normalization_type.startswith("RMS")
    )
    ps = make_prompts(load_params("ioi", n_prompts=16), m.tokenizer, verbose=False, prepend_bos=m.cfg.default_prepend_bos)
    ctx = make_context(m, ps)
    assert ctx.source_logit_diff > 2.0 and check_normalisation(ctx.source_logit_diff, ctx.base_logit_diff).status == "ok"


@pytest.mark.parametrize("name", ["resid_pre", "attn_out", "head_out", "head_v", "head_pattern", "head_q_by_pos"])
def test_toy_ioi_llama_sweeps_equal_transformer_lens(toy_ioi_llama, name):
    from helpers.methods import patching as P

    m = toy_ioi_llama
    ps = make_prompts(load_params("ioi", n_prompts=6), m.tokenizer, verbose=False, prepend_bos=m.cfg.default_prepend_bos)
    ctx = P.make_context(m, ps)
    assert (P.sweep(ctx, name, progress=False) - P.tl_reference(ctx, name)).abs().max() <= 1e-4


LEAN = {"llama", "mistral", "gemma2", "gemma3"}  # RMS norms, no value biases, float32: the lean path


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_processing_equals_transformer_lens_default_to_the_bit(family, family_dirs):
    """``enable_compatibility`` (the lean path where safe) gives exactly the weights and logits of TransformerLens's
    ``enable_compatibility_mode()``, on every family; the path it takes is the expected one."""
    from transformer_lens.model_bridge import TransformerBridge

    from helpers.task.models import enable_compatibility

    ours, theirs = (TransformerBridge.boot_transformers(str(family_dirs(family)), dtype=torch.float32, device="cpu") for _ in "ab")
    assert enable_compatibility(ours) == ("lean" if family in LEAN else "default")
    theirs.enable_compatibility_mode()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(ours(tokens), theirs(tokens))
