"""Exact path patching: identities with activation patching, and no effect from a sender at or after its receiver."""

from __future__ import annotations

import pytest
import torch

from helpers.methods import patching as P
from helpers.methods import path_patching as PP
from helpers.schema.heads import Head
from helpers.task.prompts import PromptPair


@pytest.fixture(scope="module")
def ctx(toy_ioi, ioi_prompts):
    return P.make_context(
        toy_ioi, PromptPair.denoising(ioi_prompts.clean_tokens[:8], ioi_prompts.corrupted_tokens[:8], ioi_prompts.answer_tokens[:8])
    )


def test_last_layer_sender_to_logits_equals_activation_patching(ctx):
    """A last-layer head reaches the logits only directly, so its path effect is its activation-patching effect."""
    paths = PP.path_patch_to_logits(ctx)
    activation = P.sweep(ctx, "head_out", progress=False)
    last = ctx.model.cfg.n_layers - 1
    torch.testing.assert_close(paths[last], activation[last], atol=1e-5, rtol=0)
    assert paths.shape == activation.shape
    assert not torch.allclose(paths[0], activation[0], atol=1e-3)  # earlier heads also act through later heads


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_a_sender_leaves_the_inputs_of_its_own_and_earlier_layers_unchanged(ctx, component):
    """The premise of ``_receiver_run``'s shortcut (a sender at or after every receiver has effect 0, without a run),
    checked on the engine itself: step 1 with the senders of layer 2 records layer 2's q/k/v inputs exactly as in
    the corrupted run; with the senders of layer 1 it does not (so the comparison can fail)."""
    name = PP._receiver_hook_name(2, component)
    n_heads, base = ctx.model.cfg.n_heads, ctx.base_cache[name]
    for layer, same in ((2, True), (1, False)):
        recorded = PP._sender_run(ctx, layer, [name])[1][name].reshape(n_heads, *base.shape)
        close = torch.allclose(recorded, base.expand_as(recorded), atol=1e-6)
        assert close == same, f"senders of layer {layer} into {name}"


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_senders_at_or_after_the_receiver_have_no_effect(ctx, component):
    receiver = Head(2, 1)
    paths = PP.path_patch_to_receivers(ctx, [receiver], component)
    assert paths.shape == (4, 4)
    assert paths[2:].abs().max() <= 1e-5
    assert paths[:2].abs().max() > 1e-4  # earlier senders do reach it


def test_unknown_component_raises(ctx):
    with pytest.raises(ValueError, match="component"):
        PP.path_patch_to_receivers(ctx, [Head(3, 2)], "z")


def test_strongest_senders_ranks_by_effect_into_later_heads():
    heads = {
        "L0H0": Head(0, 0),
        "L0H1": Head(0, 1),
        "L1H0": Head(1, 0),
        "L2H0": Head(2, 0),
    }
    into_l2 = torch.zeros(3, 2)
    into_l2[0, 1], into_l2[1, 0], into_l2[0, 0] = -0.9, 0.5, 0.1
    effects = {("L2H0", "q"): into_l2, ("L1H0", "v"): torch.zeros(3, 2)}
    assert list(PP.strongest_senders(heads, effects, 2)) == ["L0H1", "L1H0"]  # |-0.9| first; L2H0 sends to nothing
    assert list(PP.strongest_senders(heads, effects, None)) == ["L0H1", "L1H0", "L0H0"]


def test_a_circuit_with_no_later_head_has_no_receiver_paths(ctx):
    """Receivers in layer 0 cannot be reached by any sender: no sweep runs, and nothing fails."""
    assert PP.receiver_effects(ctx, {"L0H1": Head(0, 1), "L0H3": Head(0, 3)}) == {}
    assert PP.compare_with_direct_path(ctx, {"L0H1": Head(0, 1)}, {}) == ([], None)


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_direct_edge_equals_transformer_lens_direct_path(ctx, component):
    from transformer_lens.patching import get_act_patch_direct_path

    for sender in (Head(0, 1), Head(2, 2)):
        ours = PP.direct_path_effects(ctx, sender, component)
        tl = get_act_patch_direct_path(
            ctx.model,
            ctx.base_tokens,
            ctx.source_cache,
            ctx.base_cache,
            P.tl_metric(ctx),
            sender.layer,
            sender.head,
            component,
            verbose=False,
        )
        torch.testing.assert_close(ours, tl.cpu(), atol=1e-5, rtol=0)
        assert ours[: sender.layer + 1].abs().max() == 0


def test_exact_path_next_to_its_direct_edge(ctx):
    heads = {"L0H1": Head(0, 1), "L3H2": Head(3, 2)}
    effects = PP.receiver_effects(ctx, heads)
    rows, note = PP.compare_with_direct_path(ctx, heads, effects)
    assert note is None and [(r["sender"], r["receiver"], r["input"]) for r in rows] == [("L0H1", "L3H2", c) for c in "qkv"]
    for r in rows:
        assert r["direct edge"] == pytest.approx(float(PP.direct_path_effects(ctx, heads["L0H1"], r["input"])[3, 2]), abs=1e-6)
        assert r["through other paths"] == pytest.approx(r["exact path"] - r["direct edge"], abs=1e-9)


def test_chosen_senders_equal_the_full_sweep_there(ctx):
    """``senders`` computes only those senders' rows (the circuit's own edges): each chosen cell equals the sweep
    over every sender, every other cell is NaN. Senders of one layer share a run, so two heads of layer 0 check
    that variants map back to the right heads."""
    receivers = {"L2H1": Head(2, 1), "L3H2": Head(3, 2)}
    senders = [Head(0, 3), Head(0, 1), Head(1, 2), Head(3, 2)]
    full = PP.receiver_effects(ctx, receivers)
    some = PP.receiver_effects(ctx, receivers, senders=senders)
    assert some.keys() == full.keys()
    chosen = torch.zeros(4, 4, dtype=torch.bool)
    for s in senders:
        chosen[s.layer, s.head] = True
    for key in full:
        torch.testing.assert_close(some[key][chosen], full[key][chosen], atol=1e-5, rtol=0)
        assert some[key][~chosen].isnan().all()
    assert full[("L3H2", "q")][0, 1] != full[("L3H2", "q")][0, 3]  # so a swap of the two layer-0 heads would show


def test_direct_edges_into_chosen_receivers_equal_every_receiver_there(ctx):
    """``receivers`` computes only those cells (two heads of one layer share a run); later cells are NaN, cells at or
    before the sender stay 0 (nothing can be reached there)."""
    sender, receivers = Head(0, 0), [Head(1, 3), Head(2, 3), Head(1, 1), Head(0, 3)]
    full = PP.direct_path_effects(ctx, sender, "q")
    some = PP.direct_path_effects(ctx, sender, "q", receivers)
    cells = [(1, 3), (2, 3), (1, 1)]
    for l, h in cells:
        assert some[l, h] == pytest.approx(float(full[l, h]), abs=1e-7)
    assert full[1, 3] != pytest.approx(float(full[1, 1]), abs=1e-3)  # so swapped heads would show
    others = torch.ones(4, 4, dtype=torch.bool)
    others[:1] = False
    for l, h in cells:
        others[l, h] = False
    assert some[others].isnan().all() and (some[:1] == 0).all()
