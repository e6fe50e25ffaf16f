"""Loss-based head importance on every family: one head's numbers equal a plain hook on the bridge's own forward
(loss from the bridge's ``return_type="loss"``), and mean ablation over one prompt (its own mean) changes nothing."""

from __future__ import annotations

import pytest
import torch

from helpers.engine.metrics import logit_diff
from helpers.methods import importance
from helpers.toys.families import FAMILIES


def _towards_mean(model, full, layer: int, head: int, eps: float = 1.0) -> tuple[str, object]:
    """Independent: a hook moving one head's z a fraction ``eps`` of the way to its per-position mean over the prompts
    (``eps`` 1: mean ablation)."""
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(full, names_filter=[name])
    mean = cache[name].mean(0)

    def move(z, hook):
        z = z.clone()
        z[:, :, head] = mean[:, head] if eps == 1.0 else z[:, :, head] + eps * (mean[:, head] - z[:, :, head])
        return z

    return name, move


def _plain_ablation(model, tokens, answers, layer: int, head: int) -> dict[str, float]:
    """Independent: run_with_hooks setting one head's z to its per-position mean over the prompts."""
    full = importance.with_answers(tokens, answers)
    name, ablate = _towards_mean(model, full, layer, head)
    with torch.no_grad():
        logits = model.run_with_hooks(full, fwd_hooks=[(name, ablate)])
        loss = model.run_with_hooks(full, fwd_hooks=[(name, ablate)], return_type="loss")
    answer_loss = -logits[:, -2].log_softmax(-1).gather(-1, answers[:, :1]).mean()
    return {
        "sequence_loss": float(loss),
        "answer_loss": float(answer_loss),
        "logit_diff": float(logit_diff(logits[:, -2:-1], answers).mean()),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_head_importance_equals_a_plain_hook(family, family_models):
    model, prompts = family_models(family)
    result = importance.head_importance(model, prompts.clean_tokens, prompts.answer_tokens, memory_mb=1, progress=False)
    assert result.answer_loss.shape == (model.cfg.n_layers, model.cfg.n_heads)
    with torch.no_grad():
        loss = model(importance.with_answers(prompts.clean_tokens, prompts.answer_tokens), return_type="loss")
    assert abs(result.baseline["sequence_loss"] - float(loss)) < 1e-4
    for layer, head in [(0, 1), (model.cfg.n_layers - 1, model.cfg.n_heads - 1)]:
        plain = _plain_ablation(model, prompts.clean_tokens, prompts.answer_tokens, layer, head)
        for key, value in plain.items():
            got = result.baseline[key] + float(getattr(result, key)[layer, head])
            assert abs(got - value) < 1e-4 * (1 + abs(value)), (key, layer, head, got, value)


def test_the_blocks_before_the_ablated_layer_are_not_computed(toy_ioi, ioi_prompts):
    """The saving is verified against the plain forward per start layer, and taken on the bundled model."""
    from helpers.engine.shortcuts import fast_paths

    importance.head_importance(toy_ioi, ioi_prompts.clean_tokens[:4], ioi_prompts.answer_tokens[:4], progress=False)
    verdicts = {k[1]: v for k, v in fast_paths(toy_ioi).items() if k[0] == "skip_blocks_all_positions"}
    assert verdicts == {layer: True for layer in range(1, toy_ioi.cfg.n_layers)}


def test_one_prompt_is_its_own_mean(toy_ioi, ioi_prompts):
    result = importance.head_importance(toy_ioi, ioi_prompts.clean_tokens[:1], ioi_prompts.answer_tokens[:1], progress=False)
    for key in ("answer_loss", "sequence_loss", "logit_diff"):
        assert getattr(result, key).abs().max() < 1e-5


def test_toy_ioi_heads_matter(toy_ioi, ioi_prompts):
    """On the trained model some head's ablation costs answer loss and logit difference, in the same direction."""
    result = importance.head_importance(toy_ioi, ioi_prompts.clean_tokens, ioi_prompts.answer_tokens, progress=False)
    top = result.answer_loss.flatten().argmax()
    assert result.answer_loss.flatten()[top] > 0.1
    assert result.logit_diff.flatten()[top] < 0


def test_reference_prompts_give_the_means(toy_ioi, ioi_prompts):
    """Means from the same prompts given as reference equal the default; from the corrupted prompts they differ and the
    name mover's ablation still costs answer loss."""
    tokens, answers = ioi_prompts.clean_tokens, ioi_prompts.answer_tokens
    default = importance.head_importance(toy_ioi, tokens, answers, progress=False)
    same = importance.head_importance(toy_ioi, tokens, answers, progress=False, reference_tokens=tokens)
    assert torch.allclose(default.answer_loss, same.answer_loss, atol=1e-5)
    corrupted = importance.head_importance(
        toy_ioi, tokens, answers, progress=False, reference_tokens=ioi_prompts.corrupted_tokens, reference_name="corrupted"
    )
    assert corrupted.reference == "the corrupted prompts" and not torch.allclose(default.answer_loss, corrupted.answer_loss)
    assert float(corrupted.answer_loss[3, 2]) > 0.5


def test_prompt_slices_give_the_same_numbers(toy_ioi, ioi_prompts):
    """A budget too small for one variant's prompts runs them in slices (each slice with its own rows of per-template
    means): the numbers equal one batched forward per layer, to float precision."""
    tokens, answers = ioi_prompts.clean_tokens, ioi_prompts.answer_tokens
    groups = (torch.arange(len(tokens)) >= 5).long()  # two groups: per-prompt means, sliced with the prompts
    whole = importance.head_importance(toy_ioi, tokens, answers, memory_mb=4096, progress=False, groups=groups)
    sliced = importance.head_importance(toy_ioi, tokens, answers, memory_mb=0.4, progress=False, groups=groups)  # 1 prompt a forward
    for key in importance.METRICS:
        assert torch.allclose(getattr(whole, key), getattr(sliced, key), atol=1e-5), key


def _scaled_ablation(model, tokens, answers, layer: int, head: int, eps: float) -> dict[str, float]:
    """Independent: the metrics with one head's z moved a fraction ``eps`` of the way to its per-position mean."""
    full = importance.with_answers(tokens, answers)
    with torch.no_grad():
        logits = model.run_with_hooks(full, fwd_hooks=[_towards_mean(model, full, layer, head, eps)])
    m = importance.loss_metrics(logits, full, answers)
    return {k: float(getattr(m, k).mean()) for k in importance.METRICS}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_estimate_is_the_derivative_along_the_ablation(family, family_models):
    """Each head's estimate equals the central difference of the metrics along the straight line from the clean z
    towards the mean, divided by the step (a first-order estimate of the ablation, with its sign)."""
    model, prompts = family_models(family)
    tokens, answers = prompts.clean_tokens, prompts.answer_tokens
    est = importance.estimated_importance(model, tokens, answers)
    eps = 1e-2
    for layer, head in [(0, 1), (model.cfg.n_layers - 1, model.cfg.n_heads - 1)]:
        up, down = (_scaled_ablation(model, tokens, answers, layer, head, e) for e in (eps, -eps))
        for key in importance.METRICS:
            slope = (up[key] - down[key]) / (2 * eps)
            assert abs(float(est[key][layer, head]) - slope) < 2e-3 + 2e-2 * abs(slope), (
                key,
                layer,
                head,
                float(est[key][layer, head]),
                slope,
            )


def test_only_the_chosen_heads_run_exactly(toy_ioi, ioi_prompts):
    """With ``max_heads`` below the model's head count, the heads the estimate ranks highest (and ``also``) are ablated,
    each with the number the full run gives it; every other head is NaN; the estimate covers every head; chunked
    estimates (a tiny memory budget) equal one batch."""
    tokens, answers = ioi_prompts.clean_tokens, ioi_prompts.answer_tokens
    full = importance.head_importance(toy_ioi, tokens, answers, progress=False)
    assert full.heads is None and not full.answer_loss.isnan().any()
    part = importance.head_importance(toy_ioi, tokens, answers, progress=False, max_heads=2, also=[(0, 0)])
    expected = importance.heads_to_ablate(full.estimated, 2, [(0, 0)])
    assert part.heads == expected and (0, 0) in expected and 3 <= len(expected) <= 5
    for key in importance.METRICS:
        est = full.estimated[key].flatten().abs()
        assert {divmod(int(i), toy_ioi.cfg.n_heads) for i in est.topk(2).indices} <= set(expected) or key == "sequence_loss"
        ran = torch.zeros_like(full.answer_loss, dtype=torch.bool)
        ran[tuple(zip(*expected))] = True
        values = getattr(part, key)
        assert values[~ran].isnan().all() and torch.allclose(values[ran], getattr(full, key)[ran], atol=1e-5)
        assert torch.allclose(part.estimated[key], full.estimated[key], atol=1e-6)
    tiny = importance.estimated_importance(toy_ioi, tokens, answers, memory_mb=0.05)
    for key in importance.METRICS:
        assert torch.allclose(tiny[key], full.estimated[key], atol=1e-5), key
    assert importance.heads_to_ablate(full.estimated, None) is None
    assert importance.heads_to_ablate(full.estimated, toy_ioi.cfg.n_layers * toy_ioi.cfg.n_heads) is None
    agreement = part.agreement()
    assert set(agreement) == set(importance.METRICS) and agreement["answer_loss"] > 0.3
