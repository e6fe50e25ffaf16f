"""Recompute only what a patch can change: later positions from cached keys and values, the last block's MLP at the
final position, on every model family; each saving equals the plain computation or is switched off with a warning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.engine import flops as F
from helpers.engine import forward as FW
from helpers.engine import interventions as I
from helpers.engine import kv_cache as KV
from helpers.engine import shortcuts as SC
from helpers.engine.capabilities import forget, model_state
from helpers.methods import patching as P
from helpers.toys.families import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, family_models):
    model, prompts = family_models(request.param)
    return request.param, P.make_context(model, prompts, warn=False)


def _patch_from(ctx, hook: str, start: int, n_pos: int) -> I.Intervention:
    """Two variants: patch ``hook`` from clean at position ``start`` only, and at every position >= start."""
    mask = torch.zeros(2, n_pos, dtype=torch.bool)
    mask[0, start] = True
    mask[1, start:] = True
    return I.Intervention(hook, "source", mask.reshape(2, n_pos, *[1] * (ctx.source_cache[hook].dim() - 2)))


def test_suffix_runs_equal_full_recompute_on_every_family(fam):
    """A patch from position p: recomputing positions >= p with the corrupted run's cached keys and values equals
    recomputing every position (RoPE offsets, GQA, sliding windows, parallel blocks), at every layer and p."""
    family, ctx = fam
    model, n_pos = ctx.model, ctx.base_tokens.shape[1]
    assert isinstance(ctx.base_kv, KV.KVPrefix) and ctx.base_kv.n_pos == n_pos
    for layer in range(model.cfg.n_layers):
        for hook in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z"):
            for start in (1, n_pos // 2, n_pos - 1):
                iv = [_patch_from(ctx, hook, start, n_pos)]
                assert I.suffix_start(iv, n_pos) == start
                args = (model, ctx.base_tokens, ctx.answer_tokens, iv, P.sources(ctx), 2, ctx.base_cache.cache_dict)
                full, _ = FW.run_interventions(*args)
                suffix, _ = FW.run_interventions(*args, prefix=ctx.base_kv)
                assert (suffix - full).abs().max() <= 1e-4, (family, hook, start)
    # hooks recorded in a suffix run (``record_suffix``): every position, the base run's before the recomputed ones
    last = model.cfg.n_layers - 1
    iv = [_patch_from(ctx, "blocks.0.attn.hook_z", n_pos // 2, n_pos)]
    names = [f"blocks.{last}.hook_resid_pre", "blocks.0.hook_resid_pre"]
    args = (model, ctx.base_tokens, ctx.answer_tokens, iv, P.sources(ctx), 2, ctx.base_cache.cache_dict, names, ctx.base_kv)
    (full, everywhere), (suffix, recorded) = FW.run_interventions(*args), FW.run_interventions(*args, record_suffix=True)
    assert (suffix - full).abs().max() <= 1e-4 and all((recorded[n] - everywhere[n]).abs().max() <= 1e-4 for n in names), family
    assert recorded[names[0]].shape == everywhere[names[0]].shape == (2 * ctx.base_tokens.shape[0], n_pos, model.cfg.d_model)
    paths = SC.fast_paths(model)
    assert all(paths[("suffix", layer)] for layer in range(model.cfg.n_layers)), paths  # used, not silently switched off
    # a run from layer L copies the cached keys and values of blocks L.. only; earlier blocks get a view of the right shape
    cache, kv = ctx.base_kv.cache(2, 3, from_layer=1), ctx.base_kv
    assert (
        cache.layers[0].keys.shape == cache.layers[1].keys.shape == (3 * len(kv.keys[0]), *kv.keys[0].shape[1:2], 2, kv.keys[0].shape[-1])
    )
    assert cache.layers[0].keys.stride(0) == 0 and cache.get_seq_length() == 2
    assert all(torch.equal(c.values, v[:, :, :2].repeat(3, 1, 1, 1)) for c, v in zip(cache.layers[1:], kv.values[1:]))
    assert all(paths[("skip_blocks", layer)] for layer in range(model.cfg.n_layers)), paths
    # the last block's MLP at the final position only: exact everywhere except where a block reshapes by the sequence length
    assert paths[("last_mlp",)] == (family != "opt"), paths


@pytest.mark.parametrize("name", ["resid_pre", "head_out"])
def test_sweeps_run_each_variant_from_the_first_position_it_changes(fam, name, monkeypatch):
    """Variants run grouped by the first position their patch changes, each run on the positions from its earliest:
    a by-position patch at its position, a head patched at every position from the first corrupted token."""
    _, ctx = fam
    n_pos, seen = ctx.base_tokens.shape[1], []
    P.sweep(ctx, name, progress=False)  # the savings are verified on first use (those runs are not counted below)
    plain = FW.forward_from_layer

    def spy(model, resid, layer, hooks, past=None):
        seen.append((layer, resid.shape[1], 0 if past is None else past.get_seq_length()))
        return plain(model, resid, layer, hooks, past)

    monkeypatch.setattr(FW, "forward_from_layer", spy)
    ours = P.sweep(ctx, name, progress=False)
    starts = {(run.layer, run.start) for run in P.sweep_plan(ctx, name)}
    assert {(layer, n_pos - length) for layer, length, _ in seen} == starts
    assert all(cached == n_pos - length for _, length, cached in seen)  # the cache holds exactly the positions not recomputed
    embedded = [cache["blocks.0.hook_resid_pre"] for cache in (ctx.source_cache, ctx.base_cache)]
    first_corrupted = int((embedded[0] != embedded[1]).any(0).any(-1).nonzero()[0])
    assert min(start for _, start in starts) == first_corrupted > 0  # nothing before the first corrupted token changes
    assert ours.shape[0] == ctx.model.cfg.n_layers


def test_a_wrong_suffix_falls_back_to_the_full_recompute(family_models, monkeypatch):
    """If cached keys and values gave another output (a new architecture), the engine must notice and recompute all."""
    model, prompts = family_models("llama")
    ctx = P.make_context(model, prompts, warn=False)
    reference = P.sweep(ctx, "resid_pre", progress=False)
    good = KV.KVPrefix.cache

    def wrong(self, start, n_var=1, n_prompts=None, from_layer=0):  # the right shapes, wrong keys (e.g. another prompt's, or no RoPE)
        cache = good(self, start, n_var, n_prompts, from_layer)
        for layer in cache.layers:
            layer.keys = layer.keys * 1.5
        return cache

    monkeypatch.setattr(KV.KVPrefix, "cache", wrong)
    paths = forget(model, "fast_paths")
    try:
        with pytest.warns(UserWarning, match="falling back"):
            ours = P.sweep(ctx, "resid_pre", progress=False)
        assert not any(v for k, v in SC.fast_paths(model).items() if k[0] == "suffix")
        assert (ours - reference).abs().max() <= 1e-4
    finally:
        forget(model, "fast_paths")
        model_state(model, "fast_paths").update(paths)


def _first_use(ctx, layer: int, prefix) -> tuple[torch.Tensor, int]:
    """A patched run from ``layer`` (a suffix from the middle position) as a model's first use of that start layer: its
    logit differences and how many times the last block ran (checks and the run itself)."""
    model, n_pos = ctx.model, ctx.base_tokens.shape[1]
    iv = [_patch_from(ctx, f"blocks.{layer}.hook_resid_pre", n_pos // 2, n_pos)]
    for key in (("skip_blocks", layer), ("suffix", layer)):
        model_state(model, "fast_paths").pop(key, None)
    runs = []
    handle = model.blocks[-1].register_forward_hook(lambda *args: runs.append(1))
    try:
        out, _ = FW.run_interventions(
            model, ctx.base_tokens, ctx.answer_tokens, iv, P.sources(ctx), 2, ctx.base_cache.cache_dict, prefix=prefix
        )
    finally:
        handle.remove()
    return out, len(runs)


def test_a_patched_runs_start_is_checked_against_the_models_output(fam):
    """A patched run's first use of a start layer settles the skip of the earlier blocks and the suffix recompute from
    one run from that block, checked against the model's own output (``forward.start_run``): the last block runs four
    times (the model's output, once per prefix; the run from the block; the suffix run; the patched run), then three
    a layer; five a layer before (the plain and fast starts, the every-position reference, the suffix run, the patched
    run); on every family, the numbers unchanged."""
    family, ctx = fam
    model = ctx.model
    layer = model.cfg.n_layers // 2
    paths = dict(SC.fast_paths(model))
    try:
        before, _ = _first_use(ctx, layer, ctx.base_kv)  # (also settles what is checked once per model)
        after, runs = _first_use(ctx, layer, dataclasses.replace(ctx.base_kv, probe_logits=None))
        assert runs == 4, family
        assert SC.fast_paths(model)[("skip_blocks", layer)] and SC.fast_paths(model)[("suffix", layer)], family
        assert torch.equal(after, before), family
        _, runs = _first_use(ctx, layer, ctx.base_kv)  # the model's output kept: three
        assert runs == 3, family
    finally:
        forget(model, "fast_paths")
        model_state(model, "fast_paths").update(paths)


def test_a_patched_runs_start_that_misses_the_models_output_settles_nothing(family_models, monkeypatch):
    """Where the run from the block does not reproduce the model's output (here a broken final-position shortcut), the
    plain checks decide as before: the skip is switched off with a warning, and the numbers stay exact."""
    model, prompts = family_models("llama")
    ctx = P.make_context(model, prompts, warn=False)
    layer = model.cfg.n_layers // 2
    paths = dict(SC.fast_paths(model))
    try:
        exact, _ = _first_use(ctx, layer, ctx.base_kv)
        broken = ("unembed.hook_in", lambda x, hook=None: x[:, :1])  # a broken shortcut: the first position
        monkeypatch.setattr(SC, "UNEMBED_LAST", broken)
        monkeypatch.setattr(FW, "UNEMBED_LAST", broken)
        with pytest.warns(UserWarning, match="falling back"):
            out, _ = _first_use(ctx, layer, dataclasses.replace(ctx.base_kv, probe_logits=None))
        assert SC.fast_paths(model)[("skip_blocks", layer)] is False
        assert (out - exact).abs().max() <= 1e-5
    finally:
        forget(model, "fast_paths")
        model_state(model, "fast_paths").update(paths)


def test_hooks_on_the_last_mlp_keep_it_at_every_position(family_models):
    model, prompts = family_models("gpt2")
    last = model.cfg.n_layers - 1
    assert not SC.acts_on_last_mlp_or_later(model, [(f"blocks.{last}.hook_resid_pre", None), (f"blocks.{last}.attn.hook_z", None)])
    for name in (f"blocks.{last}.hook_mlp_out", f"blocks.{last}.mlp.hook_post", f"blocks.{last}.hook_resid_post", "ln_final.hook_scale"):
        assert SC.acts_on_last_mlp_or_later(model, [(name, None)])
    assert SC.acts_on_last_mlp_or_later(model, [(lambda name: True, None)])  # a filter may match anything
    ctx = P.make_context(model, prompts, warn=False)
    torch.testing.assert_close(P.sweep(ctx, "mlp_out", progress=False), P.tl_reference(ctx, "mlp_out"), atol=1e-4, rtol=0)


def test_intervention_positions():
    mask = torch.zeros(3, 5, 4, 1, dtype=torch.bool)
    mask[1, 3, 2] = True
    mask[2, 2:] = True
    iv = I.Intervention("blocks.1.attn.hook_z", "clean", mask)
    assert iv.first_position(5) == 2 and I.suffix_start([iv], 5) == 2
    changes = torch.zeros(5, 4, 1, dtype=torch.bool)
    changes[3:, 2] = True  # the source differs from the base only from position 3, head 2
    assert iv.first_position(5, changes) == 3
    clean, base = torch.zeros(1, 5, 4, 1), torch.zeros(1, 5, 4, 1)
    clean[0, 4, 0] = 1.0  # differs at position 4, head 0 only
    sources, cache = {"clean": {iv.hook: clean}}, {iv.hook: base}
    assert I.suffix_start([iv], 5, sources, cache) == 4  # variant 2 sets position 4 of every head
    assert iv.from_position(2).mask.shape == (3, 3, 4, 1) and iv.from_position(2).mask[1, 1, 2]
    pattern = I.Intervention(
        "blocks.0.attn.hook_pattern", "clean", torch.zeros(1, 4, 5, 5, dtype=torch.bool).index_fill(2, torch.tensor([4]), True)
    )
    assert pattern.first_position(5) == 4 and pattern.from_position(4).mask.shape == (1, 4, 1, 5)  # the destination axis
    assert I.Intervention("blocks.0.hook_resid_pre", "zero", torch.ones(2, 1, 1, dtype=torch.bool)).first_position(5) == 0  # broadcast
    assert I.Intervention("blocks.0.hook_resid_pre", "zero").first_position(5) == 0
    assert I.suffix_start([I.Intervention("blocks.0.hook_resid_pre", "clean", torch.zeros(1, 5, 1, dtype=torch.bool))], 5) == 4
    values = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    assert torch.equal(I.from_position(values, "blocks.0.hook_resid_pre", 3), values[:, 3:])


def test_flop_counts_by_hand():
    shape = F.ModelShape(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, d_head=4, d_mlp=16, gated_mlp=False, d_vocab=10)
    kv, qom = 2 * 2 * 8 * 1 * 4, 2 * 2 * 8 * 2 * 4 + 2 * 2 * 8 * 16
    assert (shape.key_value(), shape.query_output_mlp(), shape.attention(2)) == (kv, qom, 2 * 2 * 2 * 4 * 3)
    block_all = 3 * kv + sum(qom + shape.attention(p) for p in range(3))
    assert shape.block(0, 3) == block_all
    assert shape.block(1, 3, final_only=True) == 2 * kv + qom + shape.attention(2)
    # from layer 0, start 1, 3 positions, 5 prompts: block 0 at positions 1-2, the last block's keys/values at 1-2 and the rest at 2
    expected = 5 * (shape.block(1, 3) + shape.block(1, 3, final_only=True) + 2 * 8 * 10)
    assert F.run_flops(shape, 0, 1, 3, 5) == expected
    assert F.run_flops(shape, 0, 1, 3, 5, columns=2) == expected - 5 * 2 * 8 * (10 - 2)  # a logit difference's two columns
    assert F.forward_flops(shape, 3, 5) == 5 * (2 * block_all + 3 * 2 * 8 * 10) > F.run_flops(shape, 0, 0, 3, 5)
    gated = F.ModelShape(**{**shape.__dict__, "gated_mlp": True})
    assert gated.query_output_mlp() - shape.query_output_mlp() == 2 * 8 * 16


def test_edge_evaluations_recompute_from_the_first_difference(family_models, request):
    """Circuit evaluations (edges kept or removed) start at the first position where clean and corrupted differ, with
    the clean run's keys and values before it: equal to recomputing every position, on each family edges support."""
    import dataclasses

    from helpers.methods import edges as E

    for family in ("gpt2", "llama", "gpt_neox", "qwen2"):
        model, prompts = family_models(family)
        ectx = E.edge_context(model, prompts)
        assert 0 < ectx.first_difference < prompts.clean_tokens.shape[1] - 1
        masks = torch.rand(5, *ectx.graph.allowed.shape, generator=torch.Generator().manual_seed(0)) < 0.5
        masks[0], masks[1] = True, False  # every edge (the clean run) and none (the corrupted run)
        fast = E.evaluate_masks(ectx, masks, per_prompt=True)
        full = E.evaluate_masks(dataclasses.replace(ectx, clean_kv=None), masks, per_prompt=True)
        assert (fast - full).abs().max() <= 1e-4, family
        assert SC.fast_paths(model)[("suffix", 0, "receiver forks")], family


def _metrics_by_hand(logits, tokens, answers, reference) -> dict[str, torch.Tensor]:
    """Independent: each runner metric from every position's full-vocabulary logits, with torch's own losses."""
    final = logits[:, -1].float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    before = logits[:, -2].float()
    return {
        "logit_diff": final.gather(-1, answers[:, :1])[:, 0] - final.gather(-1, answers[:, 1:])[:, 0],
        "answer_probability": final.softmax(-1).gather(-1, answers[:, :1])[:, 0],
        "losses": torch.stack(
            [ce[:, -1], ce.mean(-1), before.gather(-1, answers[:, :1])[:, 0] - before.gather(-1, answers[:, 1:])[:, 0]], -1
        ),
        "kl_divergence": torch.nn.functional.kl_div(
            final.log_softmax(-1), reference.float().log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1),
    }


def test_every_metric_of_the_runner_equals_the_plain_forward(fam):
    """The runner's metric argument: for the logit difference, the answer probability, the losses (every position) and
    the KL divergence from the clean run, ``run_interventions`` from a cached layer and position (what each metric
    reads: two columns, the final position, every position) equals the metric computed by hand from a plain hooked
    forward of every position and the full vocabulary, per variant, on every family."""
    from helpers.engine import metrics as M

    family, ctx = fam
    model, tokens, answers = ctx.model, ctx.base_tokens, ctx.answer_tokens
    n_pos, layer = tokens.shape[1], model.cfg.n_layers - 1
    with torch.no_grad():
        reference = model(ctx.source_cache["blocks.0.hook_resid_pre"], start_at_layer=0)[:, -1]  # the clean run's final logits
    hook, start = f"blocks.{layer}.hook_resid_pre", n_pos // 2
    iv = [_patch_from(ctx, hook, start, n_pos)]
    metrics = [M.LOGIT_DIFF, M.ANSWER_PROBABILITY, M.LOSSES, M.kl_divergence(reference)]
    clean = ctx.source_cache[hook]
    for metric in metrics:
        ours, _ = FW.run_interventions(
            model, tokens, answers, iv, P.sources(ctx), 2, ctx.base_cache.cache_dict, prefix=ctx.base_kv, metric=metric
        )
        assert ours.shape == (2, len(tokens), *((len(metric.outputs),) if metric.outputs else ())), (family, metric.name)
        for variant, last in enumerate((start + 1, n_pos)):

            def patch(act, hook, last=last):
                act = act.clone()
                act[:, start:last] = clean[:, start:last]
                return act

            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, patch)])
            plain = _metrics_by_hand(logits, tokens, answers, reference)[metric.name]
            assert (ours[variant] - plain).abs().max() <= 1e-4 * (1 + plain.abs().max()), (family, metric.name, variant)
    assert "kl_divergence" in repr(metrics[-1]) and M.LOSSES.to_json()["outputs"] == ["answer_loss", "sequence_loss", "logit_diff"]
