"""Head scores: our pattern scores agree with TransformerLens head_detector; the bundled models' heads."""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens.head_detector import detect_head

from helpers import MODELS_DIR
from helpers.heads import pattern_scores, repeated_random_tokens, repeated_token_scores, top_heads


def test_top_heads_orders_by_sign():
    values = torch.tensor([[0.1, -0.9], [0.5, 0.0]])
    assert [(h["layer"], h["head"]) for h in top_heads(values, 2, "pos")] == [(1, 0), (0, 0)]
    assert top_heads(values, 1, "neg")[0]["value"] == pytest.approx(-0.9)
    assert top_heads(values, 1, "abs")[0]["head"] == 1


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


def test_agrees_with_head_detector(toy_induction):
    """Previous-token scores from our batched computation vs head_detector on the same sequences."""
    tokens = repeated_random_tokens(toy_induction, 20, 4, seed=0)
    prompts = [toy_induction.to_string(t[1:]) for t in tokens]
    ours, _ = repeated_token_scores(toy_induction, 20, 4, seed=0)
    ref = detect_head(toy_induction, prompts, "previous_token_head", exclude_bos=False, exclude_current_token=False)
    l, h = divmod(int(ours["prev_token"].argmax()), toy_induction.cfg.n_heads)
    assert ref[l, h] > 0.5 and ours["prev_token"][l, h] > 0.5
    assert abs(float(ref[l, h]) - float(ours["prev_token"][l, h])) < 0.1
