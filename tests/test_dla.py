"""DLA identity: every component's contribution plus the unembedding-bias difference sums to the logit diff."""

from __future__ import annotations

import pytest

from helpers.analyses import dla as A
from helpers.engine.hooks import run_with_checked_cache
from helpers.engine.metrics import logit_diff

TOL = 1e-4  # measured: 2.4e-7 on toy-ioi (logit diffs of order 10)


def _setup(model, prompts):
    logits, cache = run_with_checked_cache(model, prompts.clean_tokens, A.dla_hook_names(model))
    direction = A.logit_diff_direction(model, prompts.answer_tokens)
    target = logit_diff(logits, prompts.answer_tokens) - A.unembed_bias_diff(model, prompts.answer_tokens)
    return cache, direction, target


def test_full_decomposition_sums_to_logit_diff(toy_ioi, ioi_prompts):
    cache, direction, target = _setup(toy_ioi, ioi_prompts)
    full, labels = A.full_dla(toy_ioi, cache, direction)
    assert len(labels) == toy_ioi.cfg.n_layers * (toy_ioi.cfg.n_heads + 1) + 3  # heads, MLPs, embed, pos_embed, bias
    assert (full.sum(0) - target).abs().max() < TOL


def test_layer_decomposition_and_logit_lens(toy_ioi, ioi_prompts):
    cache, direction, target = _setup(toy_ioi, ioi_prompts)
    layers, _ = A.layer_dla(cache, direction)
    assert (layers.sum(0) - target).abs().max() < TOL
    lens, labels = A.logit_lens(cache, direction)
    assert labels[-1] == "final_post" and (lens[-1] - target).abs().max() < TOL


def test_heads_plus_rest_equal_attention_output(toy_ioi, ioi_prompts):
    """Per-head DLA of a layer plus its b_O term equals that layer's attention-output DLA."""
    cache, direction, _ = _setup(toy_ioi, ioi_prompts)
    heads = A.head_dla(toy_ioi, cache, direction)
    layers, labels = A.layer_dla(cache, direction)
    full, full_labels = A.full_dla(toy_ioi, cache, direction)
    for layer in range(toy_ioi.cfg.n_layers):
        attn = layers[labels.index(f"{layer}_attn_out")]
        assert (heads[layer].sum(0) - (attn - _bias_part(toy_ioi, cache, direction, layer))).abs().max() < TOL


def _bias_part(model, cache, direction, layer):
    b_O = model.b_O[layer]
    stack = b_O.expand(1, direction.shape[0], -1)
    return A.project_stack(cache, stack, direction)[0]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_logit_lens_over_the_vocabulary_ends_with_the_models_own_ranking(family, family_models):
    model, prompts = family_models(family)
    logits, cache = run_with_checked_cache(model, prompts.clean_tokens, A.dla_hook_names(model))
    rows = A.logit_lens_vocabulary(model, cache, prompts.answer_tokens, k=3)
    final = logits[:, -1]
    answer = final.gather(-1, prompts.answer_tokens)
    ranks = (final[:, None, :] > answer[..., None]).sum(-1).float()
    assert rows[-1]["rank correct"] == pytest.approx(float(ranks[:, 0].mean()))  # soft-capping keeps the ranking
    assert rows[-1]["rank incorrect"] == pytest.approx(float(ranks[:, 1].mean()))
    assert rows[-1]["correct is top"] == pytest.approx(float((final.argmax(-1) == prompts.answer_tokens[:, 0]).float().mean()))
    assert len(rows) > model.cfg.n_layers and all(len(r["most frequent top tokens"]) <= 3 for r in rows)
