"""Weight-based head circuits: the known heads of toy-induction show up from the weights alone; every family runs or
refuses honestly."""

from __future__ import annotations

import pytest
import torch

from helpers.analyses import weights as W
from helpers.analyses.pattern_scores import random_word_ids
from helpers.methods.patching import NotSupported
from helpers.toys.families import FAMILIES


def test_toy_induction_previous_token_heads_peak_at_offset_one(toy_induction):
    offsets = W.previous_token_offsets(toy_induction, n_pos=32, max_offset=4)
    assert offsets.shape == (2, 4, 5)
    for head in (0, 3):  # the model card's previous-token heads (prompt-based scores 0.77 and 0.66)
        assert int(offsets[0, head].argmax()) == 1 and float(offsets[0, head, 1]) > 0.8
    assert float(offsets[1, :, 1].max()) < 0.5  # the induction heads do not attend by position alone
    pattern = W.positional_qk(toy_induction, 0, 0, 8)
    assert torch.allclose(pattern.sum(-1), torch.ones(8)) and float(pattern.triu(1).abs().max()) == 0.0  # causal rows


def test_toy_induction_induction_heads_copy_above_the_baseline(toy_induction):
    words = torch.tensor(random_word_ids(toy_induction.tokenizer))  # the words its repeated sequences were made of
    for extended in (False, True):
        ov = W.ov_copying(toy_induction, words, effective_embedding=extended)
        assert ov.n_tokens == len(words)
        assert float(ov.top1[1].min()) > float(ov.top1.mean()) and float(ov.mean_rank[1].max()) < 0.5
    full = W.ov_circuit(toy_induction, 1, 0, words[:10])
    assert full.shape == (10, 10) and bool((full.argmax(-1) == torch.arange(10)).all())  # copying: the own logit first


@pytest.mark.parametrize("family", FAMILIES + ("olmo2",))  # OLMo-2: no pre-attention norm (norms.attention_norm)
def test_every_family_reads_its_ov_and_qk_circuits_or_refuses_positions(family, family_models):
    model, prompts = family_models(family)
    tokens = prompts.clean_tokens[0].unique()
    ov = W.ov_copying(model, tokens, effective_embedding=True)
    assert ov.top1.shape == (model.cfg.n_layers, model.cfg.n_heads) and bool(((ov.top1 >= 0) & (ov.top1 <= 1)).all())
    assert W.qk_tokens(model, 0, model.cfg.n_heads - 1, tokens).shape == (len(tokens), len(tokens))
    if model.cfg.positional_embedding_type == "standard":
        assert W.previous_token_offsets(model, 8, 2).shape == (model.cfg.n_layers, model.cfg.n_heads, 3)
    else:
        with pytest.raises(NotSupported, match="positions"):
            W.positional_qk(model, 0, 0, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_singular_directions_equal_a_dense_svd(family, family_models):
    """The OV directions (SVDInterpreter) and QK directions (FactoredMatrix) against torch.linalg.svd of the dense matrices."""
    model, _ = family_models(family)
    layer, head, n = model.cfg.n_layers - 1, model.cfg.n_heads - 1, 2
    ov = W.ov_singular_tokens(model, layer, head, n=n, k=3)
    with torch.no_grad():
        _, s, vh = torch.linalg.svd(model.OV[layer, head].AB)
        assert torch.allclose(ov.singular_values, s[:n], rtol=1e-4)
        assert 0 < ov.share <= 1 and ov.share == pytest.approx(float((s[:n] ** 2).sum() / (s**2).sum()), rel=1e-4)
        logits = model.W_U.T @ vh[0]  # the first output direction read as tokens (sign arbitrary)
        ends = {model.tokenizer.decode([int(logits.argmax())]), model.tokenizer.decode([int(logits.argmin())])}
        assert ends == {ov.directions[0]["one end"][0], ov.directions[0]["other end"][0]}
        u, s_qk, vh_qk = torch.linalg.svd(model.QK[layer, head].AB)
    qk = W.qk_singular_tokens(model, layer, head, n=n, k=3)
    assert torch.allclose(qk.singular_values, s_qk[:n], rtol=1e-4)
    query = model.W_E @ u[:, 0]
    dest_ends = {model.tokenizer.decode([int(query.argmax())]), model.tokenizer.decode([int(query.argmin())])}
    assert dest_ends == {qk.directions[0]["destination, one end"][0], qk.directions[0]["destination, other end"][0]}
