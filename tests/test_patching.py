"""Batched patching sweeps equal transformer_lens.patching; patching everything gives 1, nothing 0."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from helpers.engine import chunks as CH
from helpers.engine import flops as F
from helpers.methods import patching as P
from helpers.task.prompts import PromptPair

FAST_TL_SWEEPS = [n for n in P.SWEEPS if n != "head_pattern_dest_src"]  # dest_src: checked on a subset below


@pytest.fixture(scope="module")
def ctx(toy_ioi, ioi_prompts):
    return P.make_context(
        toy_ioi, PromptPair.denoising(ioi_prompts.clean_tokens[:8], ioi_prompts.corrupted_tokens[:8], ioi_prompts.answer_tokens[:8])
    )


@pytest.fixture(scope="module")
def random_ctx(random_two_layer, ioi_prompts):
    return P.make_context(
        random_two_layer,
        PromptPair.denoising(ioi_prompts.clean_tokens[:6], ioi_prompts.corrupted_tokens[:6], ioi_prompts.answer_tokens[:6]),
    )


@pytest.mark.parametrize("name", FAST_TL_SWEEPS)
def test_equals_transformer_lens_on_toy_ioi(ctx, name):
    if name == "resid_mid":  # TL 4 agrees with the bridge here, and both are wrong: see the test below
        with pytest.raises(P.NotSupported, match="MLP only"):
            P.sweep(ctx, name, progress=False)
        return
    ours = P.sweep(ctx, name, max_variants=5, progress=False)  # small chunks exercise the chunking too
    ref = P.tl_reference(ctx, name)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["resid_pre", "mlp_out", "head_out", "head_pattern", "head_out_by_pos", "head_k_by_pos"])
def test_equals_transformer_lens_on_random_model(random_ctx, name):
    ours = P.sweep(random_ctx, name, progress=False)
    ref = P.tl_reference(random_ctx, name)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("which", ["ctx", "random_ctx"])
def test_pattern_dest_src_equals_transformer_lens_on_sampled_cells(which, request):
    """Every (layer, head, dest, src) cell is 40k TL forwards on toy-ioi; compare 150 cells, both triangles."""
    c = request.getfixturevalue(which)
    ours = P.sweep(c, "head_pattern_dest_src", progress=False)
    cells = torch.stack([torch.randint(0, n, (150,), generator=torch.Generator().manual_seed(0)) for n in ours.shape], 1)
    ref = P.tl_reference(c, "head_pattern_dest_src", cells)
    assert (ours[tuple(cells.T)] - ref).abs().max() <= 1e-4
    upper = torch.ones(ours.shape[-2:], dtype=torch.bool).triu(1)
    assert ours[..., upper].abs().max() == 0  # causal mask: clean == corrupted there, nothing to patch


@pytest.mark.parametrize("name", ["resid_pre", "head_v", "head_out_by_pos", "head_pattern_by_pos"])
def test_tl_reference_on_a_subset_of_cells(random_ctx, name):
    """The subset path (TL's index_df with a setter derived from the layout) agrees with our full sweep."""
    ours = P.sweep(random_ctx, name, progress=False)
    cells = torch.stack([torch.randint(0, n, (20,), generator=torch.Generator().manual_seed(1)) for n in ours.shape], 1)
    assert (ours[tuple(cells.T)] - P.tl_reference(random_ctx, name, cells)).abs().max() <= 1e-4


def test_one_chunk_planner_sizes_every_metric(ctx):
    """``plan_chunks``: whole variants while a variant's prompts fit, else one variant in prompt slices; the logits a
    metric reads count (none for two answer columns, every position's full vocabulary for the losses); memory a
    variant holds besides its forward bounds the variants on its own."""
    from helpers.engine import metrics as M

    model, (batch, n_pos) = ctx.model, ctx.base_tokens.shape
    vocab = model.cfg.d_vocab
    assert CH.logits_bytes(model, M.LOGIT_DIFF, batch, n_pos) == 0
    assert CH.logits_bytes(model, M.ANSWER_PROBABILITY, batch, n_pos) == 4 * batch * vocab
    assert CH.logits_bytes(model, M.LOSSES, batch, n_pos) == 4 * batch * n_pos * vocab
    per_variant = CH.bytes_per_variant(model, batch, n_pos)
    for mb in (1e-9, 0.5 * per_variant / 2**20, 3.5 * per_variant / 2**20, 1024):
        assert CH.plan_chunks(model, batch, n_pos, mb).variants == CH.variants_per_chunk(model, batch, n_pos, mb)
    thirty = 30 * (CH.bytes_per_variant(model, batch, n_pos) + CH.logits_bytes(model, M.LOSSES, batch, n_pos)) / 2**20
    assert CH.plan_chunks(model, batch, n_pos, thirty, M.LOSSES) == CH.ChunkPlan(30, batch)
    assert CH.plan_chunks(model, batch, n_pos, thirty, M.LOGIT_DIFF).variants > 30  # the losses' logits cost memory
    half = CH.plan_chunks(model, batch, n_pos, thirty / 60, M.LOSSES)
    assert half.variants == 1 and half.prompts == batch // 2
    assert CH.plan_chunks(model, batch, n_pos, 1024, held_per_variant=2**30).variants == 1
    assert CH.plan_chunks(model, batch, n_pos, 1024, max_variants=2).variants == 2


def test_forwards_grouped_by_start_layer_cost_least():
    """``by_start_layer``: every variant in exactly one forward of at most ``max_variants``, in order of start; a lone
    early variant runs alone instead of taking a chunk of late ones back to block 0; and no cut of the sorted order
    into chunks costs less (every cut checked on small cases)."""
    import itertools

    def cost(groups, starts, n_layers):
        return sum((len(g) + CH.FORWARD_OVERHEAD) * (n_layers - int(starts[g].min())) for g in groups)

    starts = torch.tensor([17] * 26 + [0])
    groups = CH.by_start_layer(starts, 30, 27)
    assert [g.tolist() for g in groups] == [[26], list(range(26))]
    generator = torch.Generator().manual_seed(0)
    for n, cap in ((1, 1), (5, 2), (7, 3), (8, 8)):
        starts = torch.randint(0, 12, (n,), generator=generator)
        groups = CH.by_start_layer(starts, 12, cap)
        assert sorted(torch.cat(groups).tolist()) == list(range(n)) and max(len(g) for g in groups) <= cap
        order = starts.argsort(stable=True)
        cuts = [
            [order[i:j] for i, j in zip((0, *c), (*c, n))]
            for k in range(n)
            for c in itertools.combinations(range(1, n), k)
            if all(j - i <= cap for i, j in zip((0, *c), (*c, n)))
        ]
        assert cost(groups, starts, 12) <= min(cost(c, starts, 12) for c in cuts) + 1e-9


def test_memory_budget_sets_the_chunk_and_not_the_result(ctx):
    model, (batch, n_pos) = ctx.model, ctx.base_tokens.shape
    per_variant = CH.bytes_per_variant(model, batch, n_pos)
    assert CH.variants_per_chunk(model, batch, n_pos, memory_mb=10 * per_variant / 2**20) == 10
    assert CH.variants_per_chunk(model, batch, n_pos, memory_mb=1e-9) == 1
    tiny = P.sweep(ctx, "head_out_by_pos", memory_mb=1e-9, progress=False)
    full = P.sweep(ctx, "head_out_by_pos", progress=False)
    torch.testing.assert_close(tiny, full, atol=1e-6, rtol=0)  # another batch composition: float rounding only
    assert torch.equal(full, P.sweep(ctx, "head_out_by_pos", progress=False))  # the same call: the same bits


@pytest.mark.parametrize("name", ["head_out_by_pos", "head_pattern_by_pos"])
def test_a_sweep_over_some_heads_equals_the_full_sweep_there(ctx, name):
    """``heads=``: those heads' cells exactly as in the full sweep (every position), every other cell NaN, and the
    FLOP estimate counts only those heads. Layers without a chosen head run nothing."""
    heads = [(0, 1), (2, 3), (2, 0)]
    full = P.sweep(ctx, name, progress=False)
    some = P.sweep(ctx, name, heads=heads, progress=False)
    axis = P.layout(ctx.model, name).index("head") - 1  # among the axes after the layer
    chosen = torch.zeros(full.shape, dtype=torch.bool)
    for layer, head in heads:
        chosen[layer].select(axis, head).fill_(True)
    torch.testing.assert_close(some[chosen], full[chosen], atol=1e-6, rtol=0)
    assert some[~chosen].isnan().all()
    only = P.head_variants(ctx, P.SWEEPS[name], heads)
    assert 0 < P.sweep_flops(ctx, name, only) < P.sweep_flops(ctx, name) and len(only[1]) == 0
    with pytest.raises(ValueError, match="no head axis"):
        P.sweep(ctx, "resid_pre", heads=heads, progress=False)


def test_rank_agreement_reads_the_computed_cells_only():
    from helpers.methods.attribution_patching import rank_agreement

    exact = torch.tensor([[1.0, float("nan")], [3.0, 2.0]])
    assert rank_agreement({"s": exact}, {"s": torch.tensor([[1.0, 99.0], [3.0, 2.0]])})["s"] == pytest.approx(1.0)


def test_rank_agreement_is_not_decided_by_float_noise_where_a_patch_changes_nothing():
    """A by-position sweep: most cells lie before the first position where clean and corrupted differ, where both the
    exact sweep and the estimate hold float noise (1e-9: the two runs round differently) instead of 0. That noise must
    not decide the figure: two draws of it give the same rank correlation, the one recomputed from the values as
    written (six decimals); at full precision they do not."""
    from scipy.stats import spearmanr

    from helpers.engine.metrics import rank_correlation
    from helpers.schema.artifacts import to_jsonable

    gen = torch.Generator().manual_seed(0)
    exact = torch.zeros(18, 15)
    exact[:, 10:] = torch.randn(18, 5, generator=gen) * torch.logspace(-4, 0, 5)  # live from position 10 on
    estimate = exact * (1 + 0.5 * torch.randn(18, 15, generator=gen))  # a rough estimate of the live cells
    dead = exact == 0

    def noise() -> torch.Tensor:
        return torch.where(dead, torch.randn(18, 15, generator=gen) * 1e-9, 0.0)

    noisy = [(exact + noise(), estimate + noise()) for _ in range(2)]
    ours = [rank_correlation(x, e) for x, e in noisy]
    written = spearmanr(np.ravel(to_jsonable(noisy[0][0])), np.ravel(to_jsonable(noisy[0][1])))[0]
    assert ours[0] == ours[1] == pytest.approx(written)
    raw = [spearmanr(x.flatten(), e.flatten())[0] for x, e in noisy]
    assert abs(raw[0] - raw[1]) > 0.01  # what the noise did before
    assert math.isnan(rank_correlation(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])))


@pytest.mark.parametrize("name", ["resid_pre", "attn_out", "mlp_out", "head_out", "head_v", "head_pattern"])
def test_patching_nothing_gives_zero(ctx, name):
    for layer in range(ctx.model.cfg.n_layers):
        assert P.patch_everything_at(ctx, name, layer, everything=False) == pytest.approx(0.0, abs=1e-5)


def test_patching_the_whole_residual_stream_gives_one(ctx):
    for layer in range(ctx.model.cfg.n_layers):
        assert P.patch_everything_at(ctx, "resid_pre", layer, everything=True) == pytest.approx(1.0, abs=1e-5)


def test_resid_mid_is_refused_because_the_bridge_edits_only_the_mlp_input(ctx):
    """Patching all of resid_mid through the bridge does not give the clean run (the edit reaches the MLP only):
    measured here with a plain hook, the reason the sweep is refused instead of reported."""
    from helpers.engine.metrics import logit_diff, normalised

    model, layer = ctx.model, 1
    name = f"blocks.{layer}.hook_resid_mid"
    clean = model.run_with_cache(ctx.source_cache["blocks.0.hook_resid_pre"], start_at_layer=0, names_filter=name)[1][name]
    logits = model.run_with_hooks(ctx.base_tokens, fwd_hooks=[(name, lambda act, hook: clean)])
    recovered = normalised(logit_diff(logits, ctx.answer_tokens).mean().item(), ctx.source_logit_diff, ctx.base_logit_diff)
    assert recovered < 0.9  # would be 1.0 if the edit reached the residual stream
    assert "resid_mid" not in P.supported_sweeps(model)


def test_positions_where_prompts_agree_have_no_effect_at_layer_0(ctx, ioi_prompts):
    """resid_pre at layer 0 depends only on token and position: where clean == corrupted, patching does nothing."""
    values = P.sweep(ctx, "resid_pre", progress=False)
    same = (ctx.base_tokens == ioi_prompts.clean_tokens[:8]).all(0)
    assert values[0, same].abs().max().item() < 1e-6
    assert values[0, ioi_prompts.positions["S2"]].item() == pytest.approx(1.0, abs=1e-5)


def test_unknown_sweep_raises(ctx):
    with pytest.raises(KeyError, match="unknown sweep"):
        P.sweep(ctx, "head_attn", progress=False)


def test_a_long_sweep_says_how_long_before_it_starts(ctx, capsys, monkeypatch):
    gflop, seconds = P.estimate_seconds(ctx, "head_out_by_pos")
    assert gflop == P.sweep_flops(ctx, "head_out_by_pos") / 1e9 > 0 and seconds > 0
    assert P.sweep_flops(ctx, "head_out_by_pos") > P.sweep_flops(ctx, "head_out")  # one run per position costs more
    shape, (batch, n_pos) = F.ModelShape.of(ctx.model.cfg), ctx.base_tokens.shape
    runs = P.sweep_plan(ctx, "head_out", minimal=True)  # the logit difference unembeds two columns, not the vocabulary
    assert P.sweep_flops(ctx, "head_out") == sum(F.run_flops(shape, r.layer, r.start, n_pos, r.n_variants * batch, columns=2) for r in runs)
    assert ctx.forward_gflops > 0  # timed on the context's corrupted forward; a slow forward slows the estimate
    slow = dataclasses.replace(ctx, forward_gflops=ctx.forward_gflops / 1000)
    assert P.estimate_seconds(slow, "head_out_by_pos")[1] == pytest.approx(gflop / slow.forward_gflops)
    monkeypatch.setattr(P, "LONG_SWEEP_S", 0.0)
    P.sweep(ctx, "head_out", max_variants=4)
    assert "patch head_out:" in capsys.readouterr().out
    monkeypatch.setattr(P, "LONG_SWEEP_S", 1e9)
    P.sweep(ctx, "head_out", max_variants=4)
    assert "patch head_out:" not in capsys.readouterr().out


def test_the_pair_says_which_run_is_patched(toy_ioi, ioi_prompts):
    """Noising (``prompts.noising()``): the clean run is the base and the corrupted run the source; its baselines are
    the denoising context's exchanged, and patching everything from the source gives 1, nothing 0, as denoising does."""
    den = P.make_context(toy_ioi, ioi_prompts)
    noi = P.make_context(toy_ioi, ioi_prompts.noising(), warn=False)
    assert noi.base_tokens is ioi_prompts.clean_tokens and den.base_tokens is ioi_prompts.corrupted_tokens
    assert noi.base_logit_diff == pytest.approx(den.source_logit_diff, abs=1e-5)
    assert noi.source_logit_diff == pytest.approx(den.base_logit_diff, abs=1e-5)
    for layer in (0, toy_ioi.cfg.n_layers - 1):
        assert P.patch_everything_at(noi, "resid_pre", layer, True) == pytest.approx(1.0, abs=1e-4)
        assert P.patch_everything_at(noi, "resid_pre", layer, False) == pytest.approx(0.0, abs=1e-4)
