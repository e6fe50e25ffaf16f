"""Model loading: bundled names, local dirs, hub aliases offline, and the training script."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from helpers import PROJECT_ROOT
from helpers.models import ModelNotAvailable, bundled_models, load_model, resolve_model


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


def test_compat_mode_and_eval(toy_ioi):
    assert not toy_ioi.training
    assert toy_ioi.cfg.n_layers == 4
    assert toy_ioi.tokenizer.unk_token_id != toy_ioi.tokenizer.bos_token_id


def test_training_script_smoke(tmp_path):
    """A few steps of the real training loop, saved and loaded through the bridge."""
    out = subprocess.run([sys.executable, "-m", "helpers.toy_models", "--model", "toy-induction", "--steps", "3",
                          "--out", str(tmp_path), "--threads", "1"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "toy-induction" / "README.md").exists()
    model = load_model(str(tmp_path / "toy-induction"), device="cpu")
    logits = model(model.to_tokens(" John and Mary"))
    assert torch.isfinite(logits).all()
