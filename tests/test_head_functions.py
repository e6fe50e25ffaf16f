"""Head-function quantities on toy-ioi, head roles from evidence, and the toy-induction circuit vs its model card."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from helpers import PROJECT_ROOT
from helpers.analyses import head_functions as HF
from helpers.analyses import pattern_scores, roles
from helpers.schema.heads import Head
from helpers.toys.families import FAMILIES


@pytest.fixture(scope="module")
def cache(toy_ioi, ioi_prompts):
    return HF.clean_cache(toy_ioi, ioi_prompts)


def test_word_positions_default_and_errors(ioi_prompts):
    assert set(HF.word_positions(ioi_prompts)) == {"IO", "S1", "S2"}
    with pytest.raises(ValueError, match="not found; this task has"):
        HF.word_positions(ioi_prompts, ["IO", "nobody"])


def test_copy_scores_are_percentages_and_reproducible(toy_ioi, ioi_prompts, cache):
    pos = HF.word_positions(ioi_prompts)
    first = HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=5)
    again = HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=5)
    assert torch.equal(first.positive, again.positive) and torch.equal(first.negative, again.negative)
    assert first.positive.min() >= 0 and first.positive.max() <= 100
    narrow = HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=1)
    assert torch.all(narrow.positive <= first.positive)  # top 1 is within top 5
    wide = HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=toy_ioi.cfg.d_vocab)
    assert torch.all(wide.positive == 100)  # every word is in the top "all" logits


def test_attention_vs_contribution(toy_ioi, ioi_prompts, cache):
    pos = HF.word_positions(ioi_prompts)
    ac = HF.attention_vs_contribution(toy_ioi, cache, ioi_prompts, pos)
    expected = cache["blocks.3.attn.hook_pattern"][:, 2, -1, [ioi_prompts.positions[n] for n in pos]]
    torch.testing.assert_close(ac.attention[3, 2], expected)
    corr = ac.correlation()
    assert corr.shape == (4, 4) and corr.abs().max() <= 1 + 1e-6


def test_attention_shift_is_zero_for_non_earlier_heads(toy_ioi, ioi_prompts, cache):
    """By causality alone: a head of the reader's own layer cannot move its pattern (nothing in the code zeroes it)."""
    pos = HF.word_positions(ioi_prompts)
    readers = [Head(3, 2)]
    candidates = [Head(0, 1), Head(3, 0)]
    shift = HF.attention_shift(toy_ioi, cache, ioi_prompts, candidates, readers, pos)
    assert shift.shape == (2, 1, 3)
    assert shift[1].abs().max() < 1e-6 and shift[0].abs().max() > 1e-4


def test_head_labels():
    assert Head.parse("L3H2", 4, 4) == Head(3, 2)
    with pytest.raises(ValueError, match="form"):
        Head.parse("3.2", 4, 4)
    with pytest.raises(ValueError, match="does not exist"):
        Head.parse("L9H0", 4, 4)


def test_roles_follow_the_rules_and_allow_unclassified():
    evidence = pd.DataFrame(
        [
            {
                "head": "L3H2",
                "layer": 3,
                "head_index": 2,
                "dla": 5.0,
                "copy_positive": 95.0,
                "copy_negative": 0.0,
                "prev_token": 0.0,
                "duplicate_token": 0.0,
                "induction": 0.1,
            },
            {
                "head": "L2H0",
                "layer": 2,
                "head_index": 0,
                "dla": -2.0,
                "copy_positive": 0.0,
                "copy_negative": 80.0,
                "prev_token": 0.0,
                "duplicate_token": 0.0,
                "induction": 0.0,
            },
            {
                "head": "L1H1",
                "layer": 1,
                "head_index": 1,
                "dla": 0.0,
                "copy_positive": 0.0,
                "copy_negative": 0.0,
                "prev_token": 0.1,
                "duplicate_token": 0.0,
                "induction": 0.7,
            },
            {
                "head": "L0H0",
                "layer": 0,
                "head_index": 0,
                "dla": 0.3,
                "copy_positive": 10.0,
                "copy_negative": 0.0,
                "prev_token": 0.2,
                "duplicate_token": 0.1,
                "induction": 0.0,
            },
        ]
    ).set_index("head")
    table = roles.assign_roles(evidence, logit_diff=6.0)
    assert table["role"].to_dict() == {"L3H2": "mover", "L2H0": "negative mover", "L1H1": "induction", "L0H0": "unclassified"}
    assert "no rule met" in table.loc["L0H0", "evidence"]
    assert "copy score 95%" in table.loc["L3H2", "evidence"]
    looser = roles.assign_roles(evidence, logit_diff=6.0, thresholds=roles.RoleThresholds(previous_token=0.15))
    assert looser.loc["L0H0", "role"] == "previous-token"
    assert roles.heads_meeting(evidence, "mover", 6.0) == [Head(3, 2)]
    with pytest.raises(ValueError):
        roles.RoleThresholds(copy_score=150)


def test_toy_induction_heads_match_the_model_card(toy_induction):
    """The scores the induction_checks template computes (its defaults) are the ones the model card reports."""
    card = json.loads((PROJECT_ROOT / "models" / "toy-induction" / "training_metrics.json").read_text())["final"]["head_scores"]
    scores, loss = pattern_scores.repeated_token_scores(toy_induction, card["seq_len"], card["batch"], card["seed"])
    for kind in ("prev_token", "induction"):
        torch.testing.assert_close(scores[kind], torch.tensor(card[kind]), atol=1e-4, rtol=0)
    assert scores["prev_token"][0].max() > 0.5 and scores["induction"][1].min() > 0.5 and scores["induction"][0].max() < 0.2
    # K-composition: for every induction head, the layer-0 head that composes most with its keys is a
    # previous-token head (measured: L0H0 0.166-0.167 into each L1 head, L0H1/L0H2 0.12-0.13)
    comp = HF.composition_scores(toy_induction, "K")
    prev_heads = {h for h in range(toy_induction.cfg.n_heads) if scores["prev_token"][0, h] >= 0.4}
    for j in range(toy_induction.cfg.n_heads):
        assert int(comp[0, :, 1, j].argmax()) in prev_heads
    assert comp[0, sorted(prev_heads), 1].mean() > comp[0, :, 1].mean()


def test_attention_shift_batched_equals_one_candidate_at_a_time(toy_ioi, ioi_prompts, cache):
    """All candidates in one batch give the same shifts as separate runs (no cross-talk between variants)."""
    pos = HF.word_positions(ioi_prompts)
    readers = [Head(3, 2)]
    candidates = [Head(0, 1), Head(1, 2), Head(2, 2)]
    together = HF.attention_shift(toy_ioi, cache, ioi_prompts, candidates, readers, pos)
    for i, c in enumerate(candidates):
        alone = HF.attention_shift(toy_ioi, cache, ioi_prompts, [c], readers, pos)
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)
    assert together.abs().max() > 1e-4  # earlier heads do move L3H2's attention (a little: it reads S2 regardless)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_transformer_lens(toy_induction, mode):
    """Chunked per earlier layer (bounded memory), the same numbers as TL's all-pairs computation."""
    ours = HF.composition_scores(toy_induction, mode)
    theirs = toy_induction.all_composition_scores(mode).scores.detach().cpu()
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES + ("olmo2",))  # OLMo-2: no pre-attention norm (norms.attention_norm)
def test_ov_outputs_equal_a_head_attending_to_one_position(family, family_models):
    """On a one-token prompt every head attends fully to that token: its output z W_O (+ b_O) is what ov_outputs says,
    value bias included (TransformerLens folds it into b_O)."""
    model, prompts = family_models(family)
    tokens = prompts.clean_tokens[:, -1:]
    names = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
        z = cache["blocks.0.attn.hook_z"][:, 0]  # [batch, head, d_head]
        expected = torch.einsum("bhe,hed->bhd", z, model.W_O[0])
        got = HF.ov_outputs(model, cache["blocks.0.hook_resid_pre"], 0)[:, 0]
        assert torch.allclose(got, expected, atol=1e-4)
        with_bias = HF.ov_outputs(model, cache["blocks.0.hook_resid_pre"], 0, bias=True)[:, 0]
        b_O = HF.bias_or_none(model, "b_O")
        assert torch.allclose(with_bias, expected + (0 if b_O is None else b_O[0]), atol=1e-4)


def test_copy_scores_with_bias_and_attend_and_copy(toy_ioi, ioi_prompts, cache):
    pos = HF.word_positions(ioi_prompts)
    plain = HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=5)
    biased = HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=5, bias=True)
    assert float(toy_ioi.b_O.abs().max()) > 0 and not torch.equal(plain.positive, biased.positive)
    assert float(biased.positive.min()) >= 0 and float(biased.positive.max()) <= 100
    both = HF.attend_and_copy(toy_ioi, cache, ioi_prompts, pos, k=5)
    assert both.score.shape == (toy_ioi.cfg.n_layers, toy_ioi.cfg.n_heads)
    assert float(both.attention_to_words.max()) <= 1 + 1e-5
    between = HF.attention_between(cache, toy_ioi.cfg.n_layers, {"end": ioi_prompts.n_pos - 1}, pos)  # [layer, head, from, to]
    assert torch.allclose(both.attention_to_words, between[:, :, 0].sum(-1), atol=1e-5)
    narrow = HF.attend_and_copy(toy_ioi, cache, ioi_prompts, pos, k=1)
    assert bool((narrow.score <= both.score).all()) and float(both.score.max()) > float(both.score.min())
    assert float(HF.attend_and_copy(toy_ioi, cache, ioi_prompts, pos, k=toy_ioi.cfg.d_vocab).score.min()) == 100


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_hits_by_vocabulary_bands_equal_the_full_ranking(family_models, family, monkeypatch):
    """``top_k_hits`` unembeds a band of columns at a time and drops a row once k words beat its target: on every family
    (norms, soft-capping, tied embeddings), a target at rank r is a hit exactly when r < k, for ranks around k and for
    targets in every band, as ranking the full unembedding says."""
    model, _ = family_models(family)
    k, n = 3, 48
    out = torch.randn(n, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        order = model.unembed(model.ln_final(out)).argsort(-1, descending=True)
    rank = torch.tensor([0, 1, 2, 3, 4, 50] * (n // 6))
    rank[-6:] = model.cfg.d_vocab - 1 - torch.arange(6)  # the last words of the ranking, wherever their band
    targets = order[torch.arange(n), rank]
    monkeypatch.setattr(HF, "VOCAB_BAND", 7)  # many bands: rows leave at different ones
    with torch.no_grad():
        hits = HF.top_k_hits(model, out, targets, k)
    assert torch.equal(hits, (rank < k).float()), family
    # the bands' products may round a word's logit differently from the targets' own product: the target never beats itself
    exact = HF.column_logits
    monkeypatch.setattr(HF, "column_logits", lambda m, x, columns: exact(m, x, columns) + 1e-5 * (len(columns) == 7))
    with torch.no_grad():
        assert torch.equal(HF.top_k_hits(model, out, targets, k), (rank < k).float()), family
    monkeypatch.setattr(HF, "column_logits", exact)
    monkeypatch.setattr(HF, "VOCAB_BAND", model.cfg.d_vocab)  # one band
    with torch.no_grad():
        assert torch.equal(HF.top_k_hits(model, out.reshape(6, 8, -1), targets.reshape(6, 8), k), (rank < k).float().reshape(6, 8))


def test_top_k_hits_in_slices_equal_one_pass(toy_ioi, ioi_prompts, cache, monkeypatch):
    """``top_k_hits`` unembeds a slice of rows at a time (bounded memory on large vocabularies): same hits as one pass."""
    pos = HF.word_positions(ioi_prompts)
    whole = (HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=3), HF.attend_and_copy(toy_ioi, cache, ioi_prompts, pos, k=3))
    monkeypatch.setattr(HF, "TOP_K_LOGITS_MB", 4 * toy_ioi.cfg.d_vocab * 3 / 2**20)  # three rows a slice
    sliced = (HF.copy_scores(toy_ioi, cache, ioi_prompts, pos, k=3), HF.attend_and_copy(toy_ioi, cache, ioi_prompts, pos, k=3))
    assert torch.equal(whole[0].positive, sliced[0].positive) and torch.equal(whole[0].negative, sliced[0].negative)
    assert torch.equal(whole[1].score, sliced[1].score)
    assert float(whole[0].positive.max()) > 0
