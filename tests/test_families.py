"""Every model family: patching equals transformer_lens.patching, identities hold, unsupported is an error.

Tiny random-init models of GPT-2, OPT, GPT-J, GPT-NeoX (Pythia), Llama (GQA), Mistral, Qwen2 (no BOS),
Gemma-2 and Gemma-3 are built offline from configs (``helpers.toys.families``) and booted through the bridge.
"""

from __future__ import annotations

import pytest
import torch

from helpers.engine.capabilities import decomposition_caveats
from helpers.engine.norms import post_norms
from helpers.methods import patching as P
from helpers.methods import path_patching as PP
from helpers.schema.heads import Head
from helpers.toys.families import FAMILIES

ALL_POS_SWEEPS = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "head_out", "head_q", "head_k", "head_v", "head_pattern"]
BY_POS_SWEEPS = ["head_out_by_pos", "head_q_by_pos", "head_k_by_pos", "head_v_by_pos", "head_pattern_by_pos"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam_ctx(request, family_models):
    model, prompts = family_models(request.param)
    return P.make_context(model, prompts)


# What the bridge cannot do per architecture (checked by probing, not by name): these must raise, not return zeros.
# resid_mid: the bridge passes an edited resid_mid to the MLP only (the residual stream goes on unedited), on every family
UNSUPPORTED = {"resid_mid": set(FAMILIES), "head_pattern": {"opt", "gptj"}}


def _unsupported(family, name):
    return any(family in UNSUPPORTED.get(key, ()) for key in (name, name.split("_by_pos")[0].split("_dest_src")[0]))


BY_POS_FAMILIES_IN_CI = {"gpt2", "llama"}  # the others' by-position sweeps run with make test-all


@pytest.mark.parametrize("name", ALL_POS_SWEEPS + BY_POS_SWEEPS)
def test_sweep_equals_transformer_lens(fam_ctx, name, request):
    family = request.node.callspec.params["fam_ctx"]
    if name in BY_POS_SWEEPS and family not in BY_POS_FAMILIES_IN_CI and "not slow" in request.config.getoption("-m"):
        pytest.skip("by-position sweeps of this family run in make test-all (keeps CI under 15 minutes)")
    assert (name in P.supported_sweeps(fam_ctx.model)) != _unsupported(family, name)
    if _unsupported(family, name):
        with pytest.raises(P.NotSupported, match="not supported for this architecture"):
            P.sweep(fam_ctx, name, progress=False)
        return
    ours = P.sweep(fam_ctx, name, max_variants=7, progress=False)
    ref = P.tl_reference(fam_ctx, name)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


def test_pattern_dest_src_on_sampled_cells(fam_ctx, request):
    if _unsupported(request.node.callspec.params["fam_ctx"], "head_pattern"):
        pytest.skip("pattern edits are discarded on this architecture (tested above)")
    ours = P.sweep(fam_ctx, "head_pattern_dest_src", progress=False)
    cells = torch.stack([torch.randint(0, n, (40,), generator=torch.Generator().manual_seed(0)) for n in ours.shape], 1)
    assert (ours[tuple(cells.T)] - P.tl_reference(fam_ctx, "head_pattern_dest_src", cells)).abs().max() <= 1e-4


def test_patching_everything_gives_one_and_nothing_zero(fam_ctx):
    for layer in range(fam_ctx.model.cfg.n_layers):
        assert P.patch_everything_at(fam_ctx, "resid_pre", layer, everything=True) == pytest.approx(1.0, abs=1e-4)
        assert P.patch_everything_at(fam_ctx, "head_out", layer, everything=False) == pytest.approx(0.0, abs=1e-4)


def test_last_layer_path_equals_output_patching(fam_ctx):
    paths = PP.path_patch_to_logits(fam_ctx)
    activation = P.sweep(fam_ctx, "head_out", progress=False)
    last = fam_ctx.model.cfg.n_layers - 1
    torch.testing.assert_close(paths[last], activation[last], atol=1e-4, rtol=0)
    assert activation.abs().max() > 1e-3  # not a silent zero: head outputs do move the logit difference


@pytest.mark.parametrize("name", ALL_POS_SWEEPS)
def test_patching_a_whole_activation_moves_the_output(fam_ctx, name):
    """Guards against hooks the bridge reports but whose edits it discards: patching everything must act."""
    if name not in P.supported_sweeps(fam_ctx.model):
        pytest.skip("not supported here (tested above)")
    effects = [P.patch_everything_at(fam_ctx, name, layer, everything=True) for layer in range(fam_ctx.model.cfg.n_layers)]
    assert max(abs(e) for e in effects) > 1e-3


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_path_into_every_receiver_head(fam_ctx, component):
    """Receivers of every head index, including those past the number of key/value groups (GQA)."""
    cfg = fam_ctx.model.cfg
    for head in range(cfg.n_heads):
        paths = PP.path_patch_to_receivers(fam_ctx, [Head(cfg.n_layers - 1, head)], component)
        assert paths.shape == (cfg.n_layers, cfg.n_heads)
        assert paths[cfg.n_layers - 1 :].abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_identity_or_an_honest_caveat(family, family_models):
    """Exact families: components sum to the logit diff. Gemma: the caveats are reported and the residual measured."""
    from helpers.analyses import dla as A
    from helpers.engine.hooks import run_with_checked_cache
    from helpers.engine.metrics import logit_diff

    model, prompts = family_models(family)
    logits, cache = run_with_checked_cache(model, prompts.clean_tokens, A.dla_hook_names(model))
    direction = A.logit_diff_direction(model, prompts.answer_tokens)
    target = logit_diff(logits, prompts.answer_tokens) - A.unembed_bias_diff(model, prompts.answer_tokens)
    layer_error = (A.layer_dla(cache, direction)[0].sum(0) - target).abs().max()
    full, labels = A.full_dla(model, cache, direction)
    head_error = (full.sum(0) - target).abs().max()
    lens, _ = A.logit_lens(cache, direction)
    caveats = decomposition_caveats(model)
    assert set(caveats) == ({"layers"} if family == "gemma2" else set())  # soft-capped logits
    tol = 1e-2 if "layers" in caveats else 1e-4
    assert (lens[-1] - target).abs().max() < tol
    assert layer_error < tol
    assert head_error < tol  # per head too, post-norm scales frozen on Gemma-2/3
    assert sum(label.startswith("L") for label in labels) == model.cfg.n_layers * model.cfg.n_heads
    assert post_norms(model) == (["ln1_post", "ln2_post"] if family.startswith("gemma") else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_head_dla_adds_up_to_the_attention_output(family, family_models):
    """Each layer's heads plus its b_O share equal its attention output's DLA on every family (Gemma-2/3: through
    the post-attention norm with its scale frozen). Neurons: ``test_neurons``."""
    from helpers.analyses import dla as A
    from helpers.engine.hooks import run_with_checked_cache

    model, prompts = family_models(family)
    _, cache = run_with_checked_cache(model, prompts.clean_tokens, A.dla_hook_names(model))
    direction = A.logit_diff_direction(model, prompts.answer_tokens)
    layers, labels = A.layer_dla(cache, direction)
    heads = A.head_dla(model, cache, direction)
    full, full_labels = A.full_dla(model, cache, direction)
    for layer in range(model.cfg.n_layers):
        attn = layers[labels.index(f"{layer}_attn_out")]
        rest = attn - heads[layer].sum(0)  # the b_O share
        if post_norms(model):
            assert torch.allclose(rest, full[full_labels.index(f"{layer}_attn_bias")], atol=1e-5)
        else:
            b_O = getattr(model.blocks[layer].attn, "b_O", None)
            expected = 0 if b_O is None else A.project_stack(cache, b_O.expand(1, direction.shape[0], -1), direction)[0]
            assert torch.allclose(rest, expected + torch.zeros_like(rest), atol=1e-5)
        assert float(heads[layer].abs().max()) > 1e-4  # the heads write something


def _direct_edge_by_hand(ctx, sender: Head, component: str) -> torch.Tensor:
    """Layer 1's row of the direct edge from ``sender`` (layer 0), without any fork: the receiver's q (k, v) in the
    corrupted run replaced by its projection of ``ln1(corrupted resid_pre + the sender's clean-minus-corrupted write)``,
    from the Hugging Face modules, one receiver head at a time."""
    model = ctx.model
    z = ctx.source_cache["blocks.0.attn.hook_z"][:, :, sender.head] - ctx.base_cache["blocks.0.attn.hook_z"][:, :, sender.head]
    write = z @ model.blocks[0].attn.W_O[sender.head]
    if "blocks.0.ln1_post.hook_in" in model.hook_dict:  # Gemma: the layer writes ln1_post(sum of heads)
        attn = model.run_with_cache(ctx.base_tokens, names_filter="blocks.0.ln1_post.hook_in")[1]["blocks.0.ln1_post.hook_in"]
        post = model.blocks[0].ln1_post._original_component
        write = post(attn + write) - post(attn)
    resid = ctx.base_cache["blocks.1.hook_resid_pre"] + write
    norm = model.blocks[1].ln1._original_component
    projection = getattr(model.blocks[1].attn, component).original_component
    full = projection(norm(resid)).reshape(*resid.shape[:2], model.cfg.n_heads, -1)
    row = []
    for head in range(model.cfg.n_heads):

        def replace(act, hook, head=head):
            act = act.clone()
            act[:, :, head] = full[:, :, head]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(ctx.base_tokens, fwd_hooks=[(f"blocks.1.attn.hook_{component}", replace)])
        row.append(P.tl_metric(ctx)(logits))
    return torch.stack(row)


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_direct_edge_equals_transformer_lens_or_an_independent_construction(fam_ctx, component):
    """Our batched direct edge equals TL's get_act_patch_direct_path where both define it alike. Where TL refuses for
    want of a pre-q/k/v fork (OPT, GPT-J) or because a norm follows the attention output (Gemma-2/3), ours runs (on the
    forks made at the projections, ``helpers.engine.forks``; with the sender's write through the norm) and equals the
    receiver's q/k/v replaced by hand. Keys and values under grouped-query attention are shared by several heads:
    both refuse."""
    from transformer_lens.patching import get_act_patch_direct_path

    model = fam_ctx.model
    sender = Head(0, model.cfg.n_heads - 1)
    grouped = (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads) != model.cfg.n_heads
    try:
        tl = get_act_patch_direct_path(
            model,
            fam_ctx.base_tokens,
            fam_ctx.source_cache,
            fam_ctx.base_cache,
            P.tl_metric(fam_ctx),
            sender.layer,
            sender.head,
            component,
            verbose=False,
        )
    except (ValueError, NotImplementedError):
        if grouped and component != "q":
            with pytest.raises(ValueError, match="grouped-query"):
                PP.direct_path_effects(fam_ctx, sender, component)
            return
        ours = PP.direct_path_effects(fam_ctx, sender, component)
        torch.testing.assert_close(ours[1], _direct_edge_by_hand(fam_ctx, sender, component).cpu(), atol=1e-4, rtol=0)
        assert ours[1].abs().max() > 1e-3 and not ours[0].any()
        return
    torch.testing.assert_close(PP.direct_path_effects(fam_ctx, sender, component), tl.cpu(), atol=1e-4, rtol=0)
