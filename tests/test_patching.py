"""Batched patching sweeps equal transformer_lens.patching; patching everything gives 1, nothing 0."""

from __future__ import annotations

import pytest
from transformer_lens import patching as tlp

from helpers import patching as P

TL_SWEEPS = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "attn_out": tlp.get_act_patch_attn_out,
    "mlp_out": tlp.get_act_patch_mlp_out,
    "head_out": tlp.get_act_patch_attn_head_out_all_pos,
    "head_q": tlp.get_act_patch_attn_head_q_all_pos,
    "head_k": tlp.get_act_patch_attn_head_k_all_pos,
    "head_v": tlp.get_act_patch_attn_head_v_all_pos,
    "head_pattern": tlp.get_act_patch_attn_head_pattern_all_pos,
}


@pytest.fixture(scope="module")
def ctx(toy_ioi, ioi_prompts):
    return P.make_context(toy_ioi, ioi_prompts.clean_tokens[:8], ioi_prompts.corrupted_tokens[:8], ioi_prompts.answer_tokens[:8])


@pytest.fixture(scope="module")
def random_ctx(random_two_layer, ioi_prompts):
    return P.make_context(random_two_layer, ioi_prompts.clean_tokens[:6], ioi_prompts.corrupted_tokens[:6], ioi_prompts.answer_tokens[:6])


@pytest.mark.parametrize("name", sorted(TL_SWEEPS))
def test_equals_transformer_lens_on_toy_ioi(ctx, name):
    ours = P.sweep(ctx, name, max_variants=5, progress=False)  # small chunks exercise the chunking too
    ref = TL_SWEEPS[name](ctx.model, ctx.corrupted_tokens, ctx.clean_cache, P.tl_metric(ctx))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["resid_pre", "head_out", "head_pattern"])
def test_equals_transformer_lens_on_random_model(random_ctx, name):
    ours = P.sweep(random_ctx, name, progress=False)
    ref = TL_SWEEPS[name](random_ctx.model, random_ctx.corrupted_tokens, random_ctx.clean_cache, P.tl_metric(random_ctx))
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["resid_pre", "attn_out", "mlp_out", "head_out", "head_v", "head_pattern"])
def test_patching_nothing_gives_zero(ctx, name):
    for layer in range(ctx.model.cfg.n_layers):
        assert P.patch_everything_at(ctx, name, layer, everything=False) == pytest.approx(0.0, abs=1e-5)


def test_patching_the_whole_residual_stream_gives_one(ctx):
    for layer in range(ctx.model.cfg.n_layers):
        assert P.patch_everything_at(ctx, "resid_pre", layer, everything=True) == pytest.approx(1.0, abs=1e-5)


def test_positions_where_prompts_agree_have_no_effect_at_layer_0(ctx, ioi_prompts):
    """resid_pre at layer 0 depends only on token and position: where clean == corrupted, patching does nothing."""
    values = P.sweep(ctx, "resid_pre", progress=False)
    same = (ctx.corrupted_tokens == ioi_prompts.clean_tokens[:8]).all(0)
    assert values[0, same].abs().max().item() < 1e-6
    assert values[0, ioi_prompts.positions["S2"]].item() == pytest.approx(1.0, abs=1e-5)


def test_unknown_sweep_raises(ctx):
    with pytest.raises(KeyError, match="unknown sweep"):
        P.sweep(ctx, "head_attn", progress=False)
