"""The intervention engine: values that print and serialise, exact fast starts, honest metrics and dtypes."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from helpers.engine import forward as FW
from helpers.engine import interventions as I
from helpers.engine import shortcuts as SC
from helpers.engine.capabilities import forget
from helpers.engine.metrics import NormalisationWarning, check_normalisation, normalised
from helpers.methods import patching as P
from helpers.schema.artifacts import to_jsonable
from helpers.task.prompts import PromptPair


@pytest.fixture(scope="module")
def llama(family_models):
    return family_models("llama")


def test_intervention_is_a_printable_serialisable_value():
    iv = I.Intervention("blocks.1.attn.hook_z", "clean", torch.zeros(3, 1, 4, 1, dtype=torch.bool))
    assert "blocks.1.attn.hook_z <- clean" in repr(iv) and iv.layer == 1 and iv.n_variants == 3
    assert json.loads(json.dumps(iv.to_json()))["entries_set_per_variant"] == [0, 0, 0]
    with pytest.raises(ValueError, match="source"):
        I.Intervention("blocks.0.attn.hook_z", "median")


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "gpt2"])
def test_fast_start_equals_the_bridge_forward(family, family_models):
    """Skipping the early blocks and unembedding one position equals the bridge's plain start_at_layer forward."""
    model, prompts = family_models(family)
    _, cache = model.run_with_cache(prompts.clean_tokens)
    full = model(prompts.clean_tokens)[:, -1:]
    for layer in range(model.cfg.n_layers):
        fast = FW.forward_from_layer(model, cache[f"blocks.{layer}.hook_resid_pre"], layer, [])
        assert (fast - full).abs().max() <= 1e-5
    assert all(SC.fast_paths(model)[("skip_blocks", layer)] for layer in range(model.cfg.n_layers))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gptj", "opt"])
def test_a_logit_difference_reads_only_the_answers_columns(family, family_models):
    """Inside ``answer_columns`` the unembedding computes the answers' vocabulary columns only (GPT-J's has a bias,
    Gemma's soft-caps), the logit difference through the remapped answers equals the full vocabulary's, the patching
    runner's numbers are unchanged, and the whole unembedding is back afterwards."""
    from helpers.engine.metrics import logit_diff

    model, prompts = family_models(family)
    answers = prompts.answer_tokens
    with torch.no_grad():
        full = model(prompts.clean_tokens)[:, -1:]
        with SC.answer_columns(model, answers) as columns:
            narrow = model(prompts.clean_tokens)[:, -1:]
        after = model(prompts.clean_tokens)[:, -1:]
    assert narrow.shape[-1] == len(answers.unique()) < full.shape[-1] == after.shape[-1]
    assert (logit_diff(narrow, columns) - logit_diff(full, answers)).abs().max() <= 1e-5
    assert SC.fast_paths(model)[("answer_columns",)]
    with torch.no_grad(), SC.answer_columns(model, answers[:1]), SC.answer_columns(model, answers) as nested:
        inner = model(prompts.clean_tokens)[:, -1:]  # nested (a runner inside another): the inner answers' columns
    assert (logit_diff(inner, nested) - logit_diff(full, answers)).abs().max() <= 1e-5
    ctx = P.make_context(model, PromptPair.denoising(prompts.clean_tokens, prompts.corrupted_tokens, answers))
    last = model.cfg.n_layers - 1
    masks = torch.eye(model.cfg.n_heads, dtype=torch.bool)[:, None, :, None]
    ours = P.run_patched_hook(ctx, f"blocks.{last}.attn.hook_z", masks).mean(-1)
    clean_z = ctx.source_cache[f"blocks.{last}.attn.hook_z"]
    with torch.no_grad():
        for h in range(model.cfg.n_heads):

            def patch(z, hook, h=h):
                z[:, :, h] = clean_z[:, :, h]
                return z

            logits = model.run_with_hooks(ctx.base_tokens, fwd_hooks=[(f"blocks.{last}.attn.hook_z", patch)])
            assert abs(float(logit_diff(logits, answers).mean()) - float(ours[h])) <= 1e-4


def test_a_wrong_fast_path_falls_back_to_the_exact_forward(llama, monkeypatch):
    """If skipping blocks changed the output (a new architecture), the engine must notice and use the plain forward."""
    model, prompts = llama
    _, cache = model.run_with_cache(prompts.clean_tokens)
    full = model(prompts.clean_tokens)[:, -1:]
    monkeypatch.setattr(SC, "UNEMBED_LAST", ("unembed.hook_in", lambda x, hook=None: x[:, :1]))  # a broken shortcut: the first position
    forget(model, "fast_paths")
    with pytest.warns(UserWarning, match="falling back"):
        out = FW.forward_from_layer(model, cache["blocks.1.hook_resid_pre"], 1, [])
    assert (out - full).abs().max() <= 1e-5
    assert SC.fast_paths(model)[("skip_blocks", 1)] is False
    forget(model, "fast_paths")


def test_a_start_checked_against_the_models_output_settles_the_skip_only_when_it_matches(llama, monkeypatch):
    """``checked_start`` (edge runs' start checks) settles the skip of the earlier blocks in one forward when the fast run
    reproduces the model's own output, and settles nothing when it does not: the plain check then decides and warns."""
    model, prompts = llama
    _, cache = model.run_with_cache(prompts.clean_tokens[:2])
    resid = cache["blocks.1.hook_resid_pre"]
    with torch.no_grad(), SC.full_vocabulary(model):
        full = model(prompts.clean_tokens[:2])[:, -1:]
        forget(model, "fast_paths")
        SC.last_mlp_ok(model)  # checked once per model: not what is counted here
        with SC.skip_blocks_before(model, 1):  # (so are the skipped blocks' output templates)
            pass
        runs = []
        handle = model.blocks[-1].register_forward_hook(lambda *args: runs.append(1))
        try:
            out = FW.checked_start(model, resid, 1, full)
        finally:
            handle.remove()
        assert len(runs) == 1 and SC.fast_paths(model)[("skip_blocks", 1)] is True
        assert (out - full).abs().max() <= 1e-5
        forget(model, "fast_paths")
        broken = ("unembed.hook_in", lambda x, hook=None: x[:, :1])  # a broken shortcut: the first position
        monkeypatch.setattr(SC, "UNEMBED_LAST", broken)
        monkeypatch.setattr(FW, "UNEMBED_LAST", broken)
        with pytest.warns(UserWarning, match="falling back"):
            out = FW.checked_start(model, resid, 1, full)
        assert SC.fast_paths(model)[("skip_blocks", 1)] is False
        assert (out - full).abs().max() <= 1e-5
    forget(model, "fast_paths")


def test_grouped_query_sweeps_are_per_key_value_group(llama):
    model, prompts = llama
    ctx = P.make_context(model, prompts)
    assert model.cfg.n_key_value_heads < model.cfg.n_heads
    assert P.layout(model, "head_v") == ("layer", "kv_group") and P.layout(model, "head_out") == ("layer", "head")
    assert P.sweep(ctx, "head_v", progress=False).shape == (model.cfg.n_layers, model.cfg.n_key_value_heads)


def test_copy_scores_under_grouped_query_attention(llama):
    from helpers.analyses import head_functions as HF

    model, prompts = llama
    cache = HF.clean_cache(model, prompts)
    scores = HF.copy_scores(model, cache, prompts, HF.word_positions(prompts), k=5)
    assert scores.positive.shape == (model.cfg.n_layers, model.cfg.n_heads)


def test_prompts_follow_the_models_bos_convention(family_models):
    model, prompts = family_models("qwen2")  # Qwen: byte-level BPE, no BOS prepended
    assert not model.cfg.default_prepend_bos
    assert prompts.clean_tokens[0, 0].item() != model.tokenizer.bos_token_id
    first_word = prompts.positions["IO"]
    assert model.tokenizer.decode([prompts.clean_tokens[0, first_word]]).strip() == prompts.slot_words[0]["S1"]


def test_normalisation_warns_and_never_writes_infinity():
    with pytest.warns(NormalisationWarning, match="only"):
        assert check_normalisation(1.0, 0.97).status == "small"
    with pytest.warns(NormalisationWarning, match="undefined"):
        check = check_normalisation(0.5, 0.5)
    assert check.status == "zero" and math.isnan(normalised(0.7, 0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_normalisation(3.0, -1.0).status == "ok"
    text = json.dumps(to_jsonable({"v": torch.tensor([1.0, float("nan"), float("-inf")]), "x": float("inf")}), allow_nan=False)
    assert json.loads(text) == {"v": [1.0, None, None], "x": None}


def test_bfloat16_sweeps_within_tolerance_of_float32(family_dirs, llama):
    from helpers.task.models import load_model

    model32, prompts = llama
    model16 = load_model(str(family_dirs("llama")), device="cpu", dtype="bfloat16")
    args = (prompts.clean_tokens, prompts.corrupted_tokens, prompts.answer_tokens)
    ref = P.sweep(P.make_context(model32, PromptPair.denoising(*args)), "head_out", progress=False)
    half = P.sweep(P.make_context(model16, PromptPair.denoising(*args)), "head_out", progress=False)
    assert half.dtype == torch.float32 or half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max() <= 0.1  # stated tolerance for half precision (normalised units)
