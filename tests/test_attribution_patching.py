"""Attribution patching: gradients checked by finite differences, IG completeness, agreement with exact patching."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from helpers.engine import chunks as CH
from helpers.engine.metrics import logit_diff
from helpers.methods import attribution_patching as A
from helpers.methods import patching as P
from helpers.task.prompts import PromptPair
from helpers.toys.families import FAMILIES


@pytest.fixture(scope="module")
def inputs(toy_ioi, ioi_prompts):
    return toy_ioi, ioi_prompts.clean_tokens, ioi_prompts.corrupted_tokens, ioi_prompts.answer_tokens


@pytest.fixture(scope="module")
def attribution(inputs):
    return A.attribution_patch(inputs[0], PromptPair.denoising(*inputs[1:]), ["resid_pre", "head_out", "head_out_by_pos", "head_pattern"])


def metric_with_partial_patch(model, clean, corrupted, answers, hook: str, mask: torch.Tensor, eps: float) -> float:
    """Mean logit diff of the corrupted run with ``corrupted + eps * (clean - corrupted)`` on ``mask`` at ``hook``."""
    _, clean_cache = model.run_with_cache(clean, names_filter=[hook])
    clean_act = clean_cache[hook]

    def nudge(act, hook=None):
        return act + eps * mask * (clean_act - act)

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, nudge)]):
        return logit_diff(model(corrupted), answers).mean().item()


@pytest.mark.parametrize("layer,head", [(3, 2), (0, 1), (2, 0)])
def test_head_attribution_is_the_directional_derivative(inputs, attribution, layer, head):
    """Attribution of head z = d metric / d eps of patching eps of the way to clean (central difference)."""
    model, clean, corrupted, answers = inputs
    hook = f"blocks.{layer}.attn.hook_z"
    mask = torch.zeros(1, 1, model.cfg.n_heads, 1)
    mask[0, 0, head] = 1
    eps = 1e-2
    plus, minus = (metric_with_partial_patch(model, clean, corrupted, answers, hook, mask, e) for e in (eps, -eps))
    scale = attribution.clean_logit_diff - attribution.corrupted_logit_diff
    fd = (plus - minus) / (2 * eps) / scale
    assert attribution.values["head_out"][layer, head].item() == pytest.approx(fd, abs=2e-3)


def test_layouts_match_exact_sweeps(attribution, ioi_prompts):
    n_pos = ioi_prompts.clean_tokens.shape[1]
    assert attribution.values["resid_pre"].shape == (4, n_pos)
    assert attribution.values["head_out_by_pos"].shape == (4, n_pos, 4)
    # summing the by-position estimates over positions gives the all-positions estimate (linearity)
    torch.testing.assert_close(attribution.values["head_out_by_pos"].sum(1), attribution.values["head_out"], atol=1e-5, rtol=1e-4)


def test_integrated_gradients_are_complete_at_the_embeddings(inputs, attribution):
    """IG along the embedding path: the layer-0 resid_pre estimates sum to the exact total effect, 1.0."""
    ig = A.attribution_patch(inputs[0], PromptPair.denoising(*inputs[1:]), ["resid_pre"], ig_steps=16)
    assert ig.values["resid_pre"][0].sum().item() == pytest.approx(1.0, abs=5e-3)
    assert abs(attribution.values["resid_pre"][0].sum().item() - 1.0) > 0.05  # plain gradients are not complete


def test_rank_agreement_with_exact_head_patching(inputs, attribution):
    ctx = P.make_context(inputs[0], PromptPair.denoising(*inputs[1:]))
    exact = P.sweep(ctx, "head_out", progress=False)
    rho = spearmanr(exact.flatten(), attribution.values["head_out"].flatten())[0]
    assert rho >= 0.8
    assert attribution.clean_logit_diff == pytest.approx(ctx.source_logit_diff, abs=1e-4)


def test_unknown_sweep_raises(inputs):
    with pytest.raises(KeyError, match="unknown sweep"):
        A.attribution_patch(inputs[0], PromptPair.denoising(*inputs[1:]), ["head_attn"])


@pytest.mark.parametrize("ig_steps", [0, 3])
def test_gradients_in_memory_bounded_chunks_equal_one_batch(inputs, ig_steps):
    """Rows (IG steps × prompts) run in chunks to bound memory (64 prompts × 8 steps in one batch took 17.5 GB on
    SmolLM2); the estimates equal the one-batch computation, also when a chunk boundary falls inside a step."""
    model, clean = inputs[:2]
    mb = 5.5 * 1024 / CH.rows_per_chunk(model, clean.shape[1], 1024.0)  # about 5 rows per chunk: not a divisor of the batch
    assert 1 < CH.rows_per_chunk(model, clean.shape[1], mb) < clean.shape[0]
    one = A.attribution_patch(
        inputs[0], PromptPair.denoising(*inputs[1:]), ["head_out", "resid_pre"], ig_steps=ig_steps, memory_mb=1e6
    ).values
    chunked = A.attribution_patch(
        inputs[0], PromptPair.denoising(*inputs[1:]), ["head_out", "resid_pre"], ig_steps=ig_steps, memory_mb=mb
    ).values
    for name in one:
        torch.testing.assert_close(chunked[name], one[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_from_the_first_difference_equals_every_position(family, family_models, monkeypatch):
    """Attribution (plain and integrated gradients) with gradients from the first token where the prompts differ
    (earlier keys and values cached, the earlier positions' estimates 0: nothing changes there) equals the estimate
    from forwards over every position, on every family; the saving is verified and used. Patterns (whose axis 1 is
    not the position) run over every position."""
    from helpers.engine.shortcuts import fast_paths

    model, prompts = family_models(family)
    names = ["resid_pre", "head_out_by_pos", "head_v"]
    fast = {ig: A.attribution_patch(model, prompts, names, ig_steps=ig).values for ig in (0, 3)}
    verdicts = [ok for key, ok in fast_paths(model).items() if key[0] == "gradient_suffix"]
    assert verdicts and all(verdicts)
    monkeypatch.setattr(A, "SUFFIX_GRADIENTS", False)
    for ig, values in fast.items():
        full = A.attribution_patch(model, prompts, names, ig_steps=ig).values
        for name in names:
            assert (values[name] - full[name]).abs().max() <= 1e-5 * (1 + full[name].abs().max()), (family, ig, name)
        assert full["resid_pre"].abs().max() > 0
