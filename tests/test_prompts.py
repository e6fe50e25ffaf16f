"""Prompt generation: deterministic, unique, equal lengths, correct positions and answers."""

from __future__ import annotations

import pytest
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


def test_a_prompt_pair_names_its_base_and_source_runs(ioi_prompts):
    """``denoising()``: the corrupted run is patched with the clean run's values; ``noising()`` the other way; one value
    carries the answers, the template of each prompt and the named positions; a mismatched pair is refused."""
    from helpers.task.prompts import PromptPair, as_pair

    p = ioi_prompts
    d, n = p.denoising(), p.noising()
    assert d.base is p.corrupted_tokens and d.source is p.clean_tokens and d.answers is p.answer_tokens
    assert (d.base_name, d.source_name) == ("corrupted", "clean") and (n.base_name, n.source_name) == ("clean", "corrupted")
    assert n.base is p.clean_tokens and n.source is p.corrupted_tokens
    back = n.swapped()
    assert back.base is d.base and back.source is d.source and back.base_name == d.base_name
    assert d.groups is p.template_index and set(d.positions) == set(p.position_index) and len(d) == len(p.clean_tokens)
    assert as_pair(p).base is d.base and as_pair(n) is n
    with pytest.raises(ValueError, match="same shape"):
        PromptPair.denoising(p.clean_tokens[:, :-1], p.corrupted_tokens, p.answer_tokens)
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        PromptPair.denoising(p.clean_tokens, p.corrupted_tokens, p.answer_tokens[:, :1])
    with pytest.raises(TypeError, match="PromptPair or a PromptSet"):
        as_pair((p.clean_tokens, p.corrupted_tokens, p.answer_tokens))
