"""Head scores: our pattern scores agree with TransformerLens head_detector; the bundled models' heads."""

from __future__ import annotations

import pytest
import torch

from helpers.analyses.pattern_scores import head_detector_agreement, pattern_scores
from helpers.schema.heads import Head, HeadScore, heads_above, rank_heads


def test_rank_heads_orders_by_sign():
    values = torch.tensor([[0.1, -0.9], [0.5, 0.0]])
    assert [h.index for h in rank_heads(values, 2, "pos")] == [(1, 0), (0, 0)]
    assert rank_heads(values, 1, "neg")[0].value == pytest.approx(-0.9)
    assert rank_heads(values, 1, "abs")[0].head == 1
    assert [h.label for h in rank_heads(values.tolist(), None, "abs")] == ["L0H1", "L1H0", "L0H0", "L1H1"]  # lists too, all heads
    nan = torch.tensor([[float("nan"), 0.2]])
    assert rank_heads(nan, None, "abs") == [HeadScore(0, 1, pytest.approx(0.2))]  # an undefined value ranks nowhere
    with pytest.raises(ValueError, match="sign"):
        rank_heads(values, 1, "max")


def test_heads_above_keeps_the_heads_at_or_over_the_threshold_highest_first():
    values = [[0.4, 0.39], [0.9, -1.0]]
    assert [h.label for h in heads_above(values, 0.4)] == ["L1H0", "L0H0"]
    assert heads_above(values, 2.0) == []


def test_a_head_reads_back_from_every_form_it_is_written_in():
    h = Head(3, 2)
    assert str(h) == h.label == "L3H2" and h.index == (3, 2)
    assert Head.of("L3H2") == Head.of({"layer": 3, "head": 2, "value": 0.1}) == Head.of((3, 2)) == Head.of(h) == h
    assert Head.of(HeadScore(3, 2, 0.5)) == h and HeadScore(3, 2, 0.5).unit == h and HeadScore(3, 2, 0.5) != h
    assert HeadScore(3, 2, 0.1234567).to_json() == {"layer": 3, "head": 2, "value": 0.123457}
    assert [x.label for x in Head.all(2, 2)] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert sorted([Head(1, 0), Head(0, 3)]) == [Head(0, 3), Head(1, 0)]


def test_pattern_scores_on_synthetic_patterns():
    """Hand-built patterns: a perfect previous-token head and a perfect induction head score 1."""
    seq_len, n = 5, 2 * 5 + 1
    prev = torch.zeros(n, n)
    prev[0, 0] = 1
    prev[torch.arange(1, n), torch.arange(0, n - 1)] = 1
    ind = torch.eye(n)
    q = torch.arange(seq_len + 1, n)
    ind[q] = 0
    ind[q, q - seq_len + 1] = 1
    patterns = torch.stack([prev, ind])[None, None].expand(1, 3, 2, n, n)  # [layer, batch, head, q, k]
    scores = pattern_scores(patterns, seq_len)
    assert scores["prev_token"][0].tolist() == pytest.approx([1.0, 0.0])
    assert scores["induction"][0].tolist() == pytest.approx([0.0, 1.0])
    assert scores["duplicate_token"][0].tolist() == pytest.approx([0.0, 0.0])


@pytest.mark.parametrize("model_name", ["toy_induction", "toy_ioi"])
def test_agrees_with_head_detector(request, model_name):
    """Exact identity with head_detector ("mul"): its score is ours x (scored queries) / (sequence length)."""
    diffs = head_detector_agreement(request.getfixturevalue(model_name), seq_len=12, n_texts=3)
    assert set(diffs) == {"prev_token", "duplicate_token", "induction"}
    assert max(diffs.values()) <= 1e-5


def test_repeated_tokens_repeat_exactly(toy_ioi):
    from helpers.analyses.pattern_scores import repeated_tokens

    text = "When Mary and John went to the store, John gave a drink to"
    tokens = repeated_tokens(toy_ioi, text)
    once = toy_ioi.to_tokens(text, prepend_bos=False)[0]
    n = once.shape[0]
    assert tokens[0, -2 * n : -n].tolist() == tokens[0, -n:].tolist() == once.tolist()
    assert tokens.shape[1] - 2 * n == int(toy_ioi.cfg.default_prepend_bos)
