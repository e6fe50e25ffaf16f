"""Prompt generation: deterministic, unique, equal lengths, correct positions and answers."""

from __future__ import annotations

import torch

from helpers.task.params import load_params
from helpers.task.prompts import make_prompts


def test_same_seed_same_prompts(toy_ioi):
    a = make_prompts(load_params("ioi"), toy_ioi.tokenizer, verbose=False)
    b = make_prompts(load_params("ioi"), toy_ioi.tokenizer, verbose=False)
    c = make_prompts(load_params("ioi", seed=1), toy_ioi.tokenizer, verbose=False)
    assert a.clean_prompts == b.clean_prompts and torch.equal(a.corrupted_tokens, b.corrupted_tokens)
    assert a.clean_prompts != c.clean_prompts


def test_unique_and_tokenised_like_the_model(toy_ioi):
    ps = make_prompts(load_params("ioi", n_prompts=200), toy_ioi.tokenizer, verbose=False)
    assert len(set(ps.clean_prompts)) == 200
    assert torch.equal(toy_ioi.to_tokens(ps.clean_prompts), ps.clean_tokens)
    assert torch.equal(toy_ioi.to_tokens(ps.corrupted_prompts), ps.corrupted_tokens)
    assert ps.clean_tokens.shape == ps.corrupted_tokens.shape


def test_ioi_positions_and_answers(ioi_prompts, toy_ioi):
    ps = ioi_prompts
    for i, words in enumerate(ps.slot_words):
        toks = toy_ioi.to_str_tokens(ps.clean_tokens[i])
        assert toks[ps.positions["IO"]] == " " + words["S1"]
        assert toks[ps.positions["S1"]] == " " + words["S2"]
        assert toks[ps.positions["S2"]] == " " + words["S2"]
        assert ps.positions["S1+1"] == ps.positions["S1"] + 1
        assert ps.positions["end"] == ps.n_pos - 1
        assert toy_ioi.to_string(ps.answer_tokens[i, :1]) == " " + words["S1"]
        assert toy_ioi.to_string(ps.answer_tokens[i, 1:]) == " " + words["S2"]
    # ABC corruption: only the second subject mention differs
    diff = (ps.clean_tokens != ps.corrupted_tokens).any(0).nonzero().flatten().tolist()
    assert diff == [ps.positions["S2"]]


def test_sentence_initial_slots_use_bare_words(toy_ioi):
    ps = make_prompts(load_params("numseq", n_prompts=8), toy_ioi.tokenizer, verbose=False)
    first = [toy_ioi.to_str_tokens(t)[1] for t in ps.clean_tokens]
    assert first == [w["S1"] for w in ps.slot_words]
