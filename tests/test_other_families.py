"""Architectures beyond the nine families that the bridge loads, where a number would be wrong with no error unless
the engine checks: each either gives the exact number (by the slow exact path) or refuses with the reason.

* BLOOM: the bridge's forward from a block (``start_at_layer``) does not reproduce the model's output (ALiBi, it seems), so every run that starts at a
  block from the cached residual stream is wrong; ``shortcuts.start_exact`` finds it and runs start from the tokens.
* OLMo-2: TransformerLens leaves its final norm weight unfolded; ``models.fold_final_norm`` folds it, so DLA is exact.
* Granite (a logit scale, a residual multiplier): the DLA components do not sum to the logit difference
  (``dla.measured_caveats`` says so: ``exact: false``) and heads do not add up to the attention output (direct-edge
  path patching refuses, ``norms.heads_add_up``).
* Granite and OLMo-2: edge circuits fail their identities through the receiver forks (``edges.identity_failure``) and
  are refused.
* Mixtral: a mixture of experts has no neurons of one dense MLP; neuron analyses refuse.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from helpers.analyses import circuits as C
from helpers.analyses import dla as A
from helpers.analyses import neurons as N
from helpers.engine.capabilities import NotSupported
from helpers.engine.hooks import run_with_checked_cache
from helpers.engine.interventions import hooks_for
from helpers.engine.metrics import logit_diff
from helpers.engine.norms import heads_add_up
from helpers.engine.shortcuts import fast_paths, start_exact
from helpers.methods import edges as E
from helpers.methods import patching as P
from helpers.methods import path_patching as PP
from helpers.schema.heads import Head
from helpers.task.models import fold_final_norm


@pytest.fixture(scope="module")
def bloom(family_models):
    model, prompts = family_models("bloom")
    with pytest.warns(UserWarning, match="start_at_layer"):
        ctx = P.make_context(model, prompts, warn=False)
        assert not start_exact(model, 1)
    return ctx


def test_a_start_that_drops_the_models_own_computation_runs_from_the_tokens(bloom):
    """Patching nothing gives the corrupted run's logit differences and everything the clean run's, per prompt, at every
    layer: the run starts from the tokens (the bridge's start from a block is wrong here; measured above)."""
    model = bloom.model
    assert fast_paths(model)[("start_at_layer", 1)] is False
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        masks = torch.tensor([False, True])[:, None, None].expand(2, *bloom.source_cache[name].shape[1:])
        got = P.run_patched_hook(bloom, name, masks)
        torch.testing.assert_close(got[0], bloom.base_per_prompt, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], bloom.source_per_prompt, atol=1e-5, rtol=0)


def test_its_sweeps_equal_transformer_lens(bloom):
    """Un-normalised: this random model barely separates clean from corrupted, and normalising amplifies float noise."""
    gap = bloom.source_logit_diff - bloom.base_logit_diff
    ours = P.sweep(bloom, "head_out", progress=False) * gap
    theirs = P.tl_reference(bloom, "head_out") * gap
    assert (ours - theirs).abs().max() < 1e-5 and theirs.abs().max() > 1e-3


def test_its_knockouts_run_from_the_tokens(bloom):
    """Circuits whose variants share the first layer start from the tokens too (their shared run ends at a block)."""
    model = bloom.model
    tokens, answers = bloom.base_tokens, bloom.pair.answers
    reference = C.reference_z(model, tokens, "mean")
    keep = torch.rand(2, model.cfg.n_layers, tokens.shape[1], model.cfg.n_heads, generator=torch.Generator().manual_seed(0)) > 0.5
    keep[:, 0] = keep[:1, 0]
    got = C.knockout_logit_diffs(model, tokens, answers, keep, reference)
    values = {C.ABLATION_SOURCES["mean"]: {f"blocks.{l}.attn.hook_z": reference[l] for l in range(model.cfg.n_layers)}}
    for k, value in zip(keep, got):
        with torch.no_grad():
            hooks = hooks_for(C.knockout_interventions(k[None], "mean"), values, 1)
            want = logit_diff(model.run_with_hooks(tokens, fwd_hooks=hooks), answers).mean()
        assert float(value) == pytest.approx(float(want), abs=1e-5)


def test_edge_circuits_and_direct_edges_refuse_a_start_that_is_not_exact(bloom):
    assert "start_at_layer" in E.unsupported_reason(bloom.model)
    with pytest.raises(NotSupported, match="direct-edge path patching"):
        PP.direct_path_effects(bloom, Head(0, 1), "q")


def _dla_identity(model, prompts) -> tuple[float, Tensor]:
    logits, cache = run_with_checked_cache(model, prompts.clean_tokens, A.dla_hook_names(model))
    direction = A.logit_diff_direction(model, prompts.answer_tokens)
    ld = logit_diff(logits, prompts.answer_tokens)
    full, _ = A.full_dla(model, cache, direction)
    return (full.sum(0) + A.unembed_bias_diff(model, prompts.answer_tokens) - ld).abs().max().item(), ld


def test_an_unfolded_final_norm_is_folded_and_dla_adds_up(family_dirs, family_models):
    """OLMo-2: TransformerLens folds no norm, the final one included; ``fold_final_norm`` folds its weight into the
    unembedding (the logits unchanged: equal to Hugging Face's), so DLA is exact again. The nine families come folded."""
    from transformers import AutoModelForCausalLM

    model, prompts = family_models("olmo2")
    weight = model.ln_final._original_component.weight
    assert torch.equal(weight, torch.ones_like(weight))
    error, ld = _dla_identity(model, prompts)
    assert error < 1e-4 and A.measured_caveats(model, error, ld) == {}
    hf = AutoModelForCausalLM.from_pretrained(family_dirs("olmo2")).eval()
    with torch.no_grad():
        assert (logit_diff(hf(prompts.clean_tokens).logits, prompts.answer_tokens) - ld).abs().max() < 1e-5
    for family in ("gpt2", "llama", "gemma3"):  # processed by TransformerLens already: nothing to fold
        assert not fold_final_norm(family_models(family)[0])


def test_dla_that_does_not_add_up_says_so(family_models):
    """Granite divides its logits by ``logits_scaling``: the DLA components do not sum to the logit difference, and
    ``measured_caveats`` names the measured error (on the nine families it is below the tolerance: ``test_families``)."""
    model, prompts = family_models("granite")
    error, ld = _dla_identity(model, prompts)
    caveats = A.measured_caveats(model, error, ld)
    assert error > 0.05 and set(caveats) == {"identity"} and f"{error:.3g}" in caveats["identity"]
    assert A.measured_caveats(model, 1e-6, ld) == {}


def test_heads_that_do_not_add_up_refuse_direct_edges(family_models):
    """Granite scales each sublayer's output by ``residual_multiplier``: z @ W_O is not what a head writes, so the
    direct-edge sender write built from it would be wrong; refused. Every other family here adds up."""
    granite = P.make_context(*family_models("granite"), warn=False)
    assert not heads_add_up(granite.model)
    with pytest.raises(NotSupported, match="do not add up"):
        PP.direct_path_effects(granite, Head(0, 1), "q")
    assert all(heads_add_up(family_models(f)[0]) for f in ("gpt2", "gemma3", "olmo2", "bloom", "mixtral"))


@pytest.mark.parametrize("family", ["granite", "olmo2"])
def test_edge_circuits_whose_identities_fail_are_refused(family, family_models):
    """Measured on two prompts before any edge work: through the receiver forks, a head closure differs from its own
    patched forward on Granite and OLMo-2 (by 0.02 and 0.004), so their edge circuits are refused with the figure."""
    model, prompts = family_models(family)
    with pytest.raises(NotSupported, match="head closure"):
        E.edge_context(model, prompts)


def test_neurons_of_a_mixture_of_experts_are_refused(family_models):
    model, _ = family_models("mixtral")
    with pytest.raises(NotSupported, match="mixture of experts"):
        N.neuron_hook_names(model)
