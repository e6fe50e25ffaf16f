"""Exact path patching: identities with activation patching, and no effect from a sender at or after its receiver."""

from __future__ import annotations

import pytest
import torch

from helpers import patching as P
from helpers import path_patching as PP


@pytest.fixture(scope="module")
def ctx(toy_ioi, ioi_prompts):
    return P.make_context(toy_ioi, ioi_prompts.clean_tokens[:8], ioi_prompts.corrupted_tokens[:8], ioi_prompts.answer_tokens[:8])


def test_last_layer_sender_to_logits_equals_activation_patching(ctx):
    """A last-layer head reaches the logits only directly, so its path effect is its activation-patching effect."""
    paths = PP.path_patch_to_logits(ctx)
    activation = P.sweep(ctx, "head_out", progress=False)
    last = ctx.model.cfg.n_layers - 1
    torch.testing.assert_close(paths[last], activation[last], atol=1e-5, rtol=0)
    assert paths.shape == activation.shape
    assert not torch.allclose(paths[0], activation[0], atol=1e-3)  # earlier heads also act through later heads


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_senders_at_or_after_the_receiver_have_no_effect(ctx, component):
    receiver = {"layer": 2, "head": 1}
    paths = PP.path_patch_to_receivers(ctx, [receiver], component)
    assert paths.shape == (4, 4)
    assert paths[2:].abs().max() <= 1e-5
    assert paths[:2].abs().max() > 1e-4  # earlier senders do reach it


def test_unknown_component_raises(ctx):
    with pytest.raises(ValueError, match="component"):
        PP.path_patch_to_receivers(ctx, [{"layer": 3, "head": 2}], "z")


def test_strongest_senders_ranks_by_effect_into_later_heads():
    heads = {
        "L0H0": {"layer": 0, "head": 0},
        "L0H1": {"layer": 0, "head": 1},
        "L1H0": {"layer": 1, "head": 0},
        "L2H0": {"layer": 2, "head": 0},
    }
    into_l2 = torch.zeros(3, 2)
    into_l2[0, 1], into_l2[1, 0], into_l2[0, 0] = -0.9, 0.5, 0.1
    effects = {("L2H0", "q"): into_l2, ("L1H0", "v"): torch.zeros(3, 2)}
    assert list(PP.strongest_senders(heads, effects, 2)) == ["L0H1", "L1H0"]  # |-0.9| first; L2H0 sends to nothing
    assert list(PP.strongest_senders(heads, effects, None)) == ["L0H1", "L1H0", "L0H0"]


def test_a_circuit_with_no_later_head_has_no_receiver_paths(ctx):
    """Receivers in layer 0 cannot be reached by any sender: no sweep runs, and nothing fails."""
    assert PP.receiver_effects(ctx, {"L0H1": {"layer": 0, "head": 1}, "L0H3": {"layer": 0, "head": 3}}) == {}
    assert PP.compare_with_direct_path(ctx, {"L0H1": {"layer": 0, "head": 1}}, {}) == ([], None)


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_direct_edge_equals_transformer_lens_direct_path(ctx, component):
    from transformer_lens.patching import get_act_patch_direct_path

    for sender in ({"layer": 0, "head": 1}, {"layer": 2, "head": 2}):
        ours = PP.direct_path_effects(ctx, sender, component)
        tl = get_act_patch_direct_path(
            ctx.model,
            ctx.corrupted_tokens,
            ctx.clean_cache,
            ctx.corrupted_cache,
            P.tl_metric(ctx),
            sender["layer"],
            sender["head"],
            component,
            verbose=False,
        )
        torch.testing.assert_close(ours, tl.cpu(), atol=1e-5, rtol=0)
        assert ours[: sender["layer"] + 1].abs().max() == 0


def test_exact_path_next_to_its_direct_edge(ctx):
    heads = {"L0H1": {"layer": 0, "head": 1}, "L3H2": {"layer": 3, "head": 2}}
    effects = PP.receiver_effects(ctx, heads)
    rows, note = PP.compare_with_direct_path(ctx, heads, effects)
    assert note is None and [(r["sender"], r["receiver"], r["input"]) for r in rows] == [("L0H1", "L3H2", c) for c in "qkv"]
    for r in rows:
        assert r["direct edge"] == pytest.approx(float(PP.direct_path_effects(ctx, heads["L0H1"], r["input"])[3, 2]), abs=1e-6)
        assert r["through other paths"] == pytest.approx(r["exact path"] - r["direct edge"], abs=1e-9)
