"""Neurons on every family: neuron DLA sums to the MLP's DLA, patching all neurons equals mlp_out patching, and one
neuron's patching equals a plain hook on the bridge's own forward."""

from __future__ import annotations

import pytest
import torch

from helpers.analyses import neurons
from helpers.analyses.dla import dla_hook_names, logit_diff_direction
from helpers.engine.hooks import run_with_checked_cache
from helpers.engine.metrics import logit_diff, normalised
from helpers.engine.norms import post_norms
from helpers.methods import patching
from helpers.toys.families import FAMILIES


def _context(model, prompts):
    return patching.make_context(model, prompts, extra_hooks=neurons.neuron_hook_names(model))


def _dla(model, prompts):
    _, cache = run_with_checked_cache(model, prompts.clean_tokens, dla_hook_names(model) + neurons.neuron_hook_names(model))
    return neurons.neuron_dla(model, cache, logit_diff_direction(model, prompts.answer_tokens), chunk=7)


def _plain_neuron_patch(ctx, layer: int, neuron: int) -> float:
    """Independent: the corrupted run through model.run_with_hooks with one neuron's activation set to its clean value."""
    clean = ctx.source_cache[neurons.post_hook(layer)]

    def patch(act, hook):
        act = act.clone()
        act[..., neuron] = clean[..., neuron]
        return act

    with torch.no_grad():
        logits = ctx.model.run_with_hooks(ctx.base_tokens, fwd_hooks=[(neurons.post_hook(layer), patch)])
    ld = logit_diff(logits, ctx.answer_tokens).mean()
    return float(normalised(ld, ctx.source_logit_diff, ctx.base_logit_diff))


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_dla_sums_to_the_mlp_dla(family, family_models):
    model, prompts = family_models(family)
    dla = _dla(model, prompts)
    d_mlp = model.blocks[0].mlp.W_out.shape[0]  # not cfg.d_mlp: the bridge reports 4 * d_model for OPT's ffn_dim
    assert dla.per_prompt.shape[:2] == (model.cfg.n_layers, d_mlp)
    assert dla.identity_error < 1e-4, dla.identity_error  # Gemma-2/3 too: through the post-MLP norm, scale frozen
    assert any("post-MLP" in s for s in dla.frozen_scales) == ("ln2_post" in post_norms(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_neurons_patched_equal_mlp_out_patched_and_one_neuron_equals_a_plain_hook(family, family_models):
    model, prompts = family_models(family)
    ctx = _context(model, prompts)
    layer = model.cfg.n_layers - 1
    everywhere = torch.ones((1, 1, 1), dtype=torch.bool)
    mlp_out = patching.run_patched_hook(ctx, f"blocks.{layer}.hook_mlp_out", everywhere).mean()
    expected = float(normalised(mlp_out, ctx.source_logit_diff, ctx.base_logit_diff))
    assert neurons.all_neurons_patched(ctx, layer) == pytest.approx(expected, abs=1e-4)
    assert neurons.all_neurons_patched(ctx, layer, f"blocks.{layer}.hook_mlp_out") == pytest.approx(expected, abs=1e-6)
    effects = neurons.neuron_patching(ctx, [layer, 0], memory_mb=1)  # small chunks: the batching is exercised
    d_mlp = ctx.source_cache[neurons.post_hook(0)].shape[-1]
    assert effects.shape == (2, d_mlp)
    for row, lay in ((0, layer), (1, 0)):
        for neuron in (0, d_mlp - 1, int(effects[row].abs().argmax())):
            assert float(effects[row, neuron]) == pytest.approx(_plain_neuron_patch(ctx, lay, neuron), abs=1e-4)
    picked = torch.tensor([3, 0, d_mlp - 2])
    subset = neurons.neuron_patching(ctx, [layer], only={layer: picked})[0]
    # the same numbers as the full sweep, to float32 rounding (other chunk sizes sum in another order: 1e-6 failed on gpt_neox here)
    assert torch.allclose(subset[picked], effects[0, picked], atol=1e-5)
    rest = torch.ones(d_mlp, dtype=torch.bool)
    rest[picked] = False
    assert subset[rest].isnan().all()  # not computed is NaN, never a made-up 0


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_attribution_adds_up_to_the_mlp_out_attribution(family, family_models):
    from helpers.methods.attribution_patching import attribution_patch

    model, prompts = family_models(family)
    est = neurons.neuron_attribution(model, prompts)
    mlp = attribution_patch(model, prompts, ["mlp_out"]).values["mlp_out"]
    assert est.shape[0] == model.cfg.n_layers
    if "ln2_post" not in post_norms(model):  # mlp_out is linear in the neurons: first-order estimates add up exactly
        assert torch.allclose(est.sum(1), mlp.sum(1), atol=1e-4, rtol=1e-4), (est.sum(1), mlp.sum(1))
    chosen = neurons.candidates(est, [0], 3)[0]
    assert est[0, chosen].abs().min() >= est[0].abs().sort(descending=True).values[2] - 1e-9


def test_toy_ioi_top_neurons_their_tokens_and_activations(toy_ioi, ioi_prompts):
    dla = _dla(toy_ioi, ioi_prompts)
    assert dla.identity_error < 1e-4 and dla.frozen_scales == ["the final norm's"]
    top = dla.top(3)
    assert len(top) == 3 and abs(top[0]["dla"]) >= abs(top[-1]["dla"])
    assert top[0]["dla"] == pytest.approx(float(dla.values[top[0]["layer"], top[0]["neuron"]]))
    words = neurons.output_tokens(toy_ioi, top[0]["layer"], top[0]["neuron"], k=4)
    assert len(words["promoted"]) == 4 and words["promoted"][0][1] >= words["promoted"][-1][1]
    _, cache = run_with_checked_cache(toy_ioi, ioi_prompts.clean_tokens, neurons.neuron_hook_names(toy_ioi))
    rows = neurons.top_activating(cache, ioi_prompts.clean_tokens, toy_ioi.to_str_tokens, top[0]["layer"], top[0]["neuron"], k=3)
    acts = cache[neurons.post_hook(top[0]["layer"])][..., top[0]["neuron"]]
    assert rows[0]["activation"] == pytest.approx(float(acts.max())) and rows[0]["activation"] >= rows[-1]["activation"]
    assert rows[0]["activation"] == pytest.approx(float(acts[rows[0]["prompt"], rows[0]["pos"]]))
