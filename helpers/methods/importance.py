"""Loss-based head importance: what mean-ablating each head costs on the task prompts.

Patching asks how much of the clean-vs-corrupted *difference* a head carries; this asks how much the model
needs the head at all. Each head's output ``z`` is replaced, at every position, by its mean over the task's
clean prompts at that position (mean ablation keeps the head's average contribution and removes only what
depends on the prompt), and three quantities are measured against the unablated run:

* **answer loss**: ``-log p(correct answer)`` at the final position, the task's own next-token loss;
* **sequence loss**: the mean next-token cross-entropy over every token of the prompt followed by its correct
  answer (what the model's training loss would say);
* **logit difference**: correct minus incorrect answer logit at the final position.

All heads of a layer run as one batch of variants through the shared runner (``forward.run_interventions`` with
the metric ``metrics.LOSSES``, sized by ``chunks.plan_chunks``), starting from the clean residual stream at that
layer (nothing before it changes) through the bridge's own ``forward(start_at_layer=...)``, the blocks before it
not computed.

Each exact ablation is a forward from its layer at every position with full-vocabulary logits at every position
(the sequence loss reads them all): about 270 × 64 prompts of such runs on SmolLM2-135M (5.6 minutes on two cores).
A first-order estimate of every head's three changes (``estimated_importance``: one forward and three backward
passes, ``(mean - z) · ∂metric/∂z`` summed over positions, as attribution patching estimates patching) ranks the
heads; on a model with more heads than ``max_heads``, only the heads the estimate ranks highest (and any the caller
adds, e.g. the top heads of output patching) are ablated exactly, the others are NaN and say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.std import tqdm
from transformer_lens.utilities import get_act_name

from helpers.engine.capabilities import NotSupported, hook_takes_effect
from helpers.engine.chunks import logits_bytes, plan_chunks, rows_per_chunk
from helpers.engine.forward import run_interventions
from helpers.engine.hooks import recording_hook, resolve_hook_names
from helpers.engine.interventions import Intervention
from helpers.engine.memory import release_freed_memory
from helpers.engine.metrics import LOSSES, group_mean
from helpers.methods.attribution_patching import rank_agreement

METRICS = LOSSES.outputs  # answer_loss, sequence_loss, logit_diff


@dataclass
class LossMetrics:
    """Per-row task metrics of full-sequence logits (one row per variant x prompt, variant-major)."""

    answer_loss: Float[Tensor, " rows"]  # -log p(correct) at the final prompt position, nats
    sequence_loss: Float[Tensor, " rows"]  # mean next-token cross-entropy over prompt + answer, nats
    logit_diff: Float[Tensor, " rows"]  # correct - incorrect logit at the final prompt position

    @classmethod
    def of(cls, values: Float[Tensor, "*rows 3"]) -> LossMetrics:
        """The metrics of ``LOSSES``' output (its last axis in ``METRICS`` order)."""
        return cls(*(v.contiguous() for v in values.cpu().unbind(-1)))  # contiguous: reductions sum in the same order


def loss_metrics(logits: Float[Tensor, "rows pos d_vocab"], tokens: Int[Tensor, "rows pos"], answers: Int[Tensor, "rows 2"]) -> LossMetrics:
    """The three metrics of each row of ``logits`` of ``tokens`` = prompt followed by its correct answer
    (``metrics.LOSSES``)."""
    return LossMetrics.of(LOSSES(logits, tokens, answers))


@dataclass
class HeadImportance:
    """The change in each metric when one head is mean-ablated (ablated minus unablated; [layer, head])."""

    answer_loss: Float[Tensor, "layer head"]  # > 0: the head helps predict the answer
    sequence_loss: Float[Tensor, "layer head"]  # > 0: the head helps predict the prompt's tokens
    logit_diff: Float[Tensor, "layer head"]  # < 0: the head helps the correct answer over the incorrect one
    baseline: dict[str, float]  # the unablated run's answer_loss, sequence_loss, logit_diff
    n_prompts: int
    reference: str = "the same prompts"  # where the means come from
    heads: list[tuple[int, int]] | None = None  # the (layer, head) pairs ablated exactly (the others NaN); None: every head
    estimated: dict[str, Float[Tensor, "layer head"]] | None = None  # first-order estimate of each metric, every head

    def to_json(self) -> dict:
        return {
            "answer_loss": self.answer_loss,
            "sequence_loss": self.sequence_loss,
            "logit_diff": self.logit_diff,
            "baseline": self.baseline,
            "n_prompts": self.n_prompts,
            "ablation": f"each head's z replaced at every position by its mean over {self.reference} at that position",
            "sign": "ablated minus unablated",
            "heads": self.heads,
            "estimated": self.estimated,
        }

    def agreement(self) -> dict[str, float]:
        """Spearman rank correlation of the estimate with the exact change, per metric, over the heads ablated exactly."""
        if self.estimated is None:
            return {}
        return rank_agreement({k: getattr(self, k) for k in METRICS}, self.estimated)


def with_answers(tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"]) -> Int[Tensor, "batch pos+1"]:
    """The prompts followed by their correct answer token."""
    return torch.cat([tokens, answers[:, :1].to(tokens.device)], dim=1)


def _means_and_cache(model, full, answers, z_names, resid_names, groups, reference_tokens):
    """The clean run's cache (z and residual inputs), its full logits, and each layer's mean z ([1 or batch, pos, head,
    d_head]) over the reference prompts (default the same prompts), per group."""
    reference = {}
    if reference_tokens is not None:
        with torch.no_grad():
            reference = model.run_with_cache(with_answers(reference_tokens, answers), names_filter=z_names)[1]  # logits dropped
    with torch.no_grad():
        logits, cache = model.run_with_cache(full, names_filter=z_names + resid_names)
    means = [group_mean((reference or cache)[name], groups) for name in z_names]
    return logits, cache, means


def _check_supported(model, z_names: list[str]) -> None:
    if not hook_takes_effect(model, z_names[-1]):
        raise NotSupported(
            f"head importance is not supported for this architecture ({type(model.original_model).__name__}): "
            "the bridge discards edits of attn.hook_z, so every ablation would be a silent zero"
        )


def _names(model) -> tuple[list[str], list[str]]:
    n = model.cfg.n_layers
    return (
        resolve_hook_names(model, [get_act_name("z", l) for l in range(n)]),
        resolve_hook_names(model, [get_act_name("resid_pre", l) for l in range(n)]),
    )


def estimated_importance(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    memory_mb: float = 1024,
    groups: Int[Tensor, " batch"] | None = None,
    reference_tokens: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Float[Tensor, "layer head"]]:
    """First-order estimate of each head's mean-ablation change in each metric (``METRICS``; ablated minus unablated,
    means as ``head_importance``): ``(mean z - z) · ∂metric/∂z`` summed over positions and the head's dimensions,
    averaged over prompts, with the gradient taken at the clean run (attribution patching's estimate, for mean
    ablation). One forward with gradients per chunk of prompts (within ``memory_mb``) and one backward per metric."""
    z_names, _ = _names(model)
    _check_supported(model, z_names)
    full = with_answers(tokens, answers)
    return _estimate(
        model, full, answers, z_names, _means_and_cache(model, full, answers, z_names, [], groups, reference_tokens)[2], memory_mb
    )


def _estimate(model, full, answers, z_names: list[str], means: list[Tensor], memory_mb: float) -> dict[str, Float[Tensor, "layer head"]]:
    cfg = model.cfg
    batch, n_pos = full.shape
    # autograd keeps about two forwards' activations per layer, and the logits three times (softmax and its gradient)
    rows = rows_per_chunk(model, n_pos, memory_mb, logits_bytes(model, LOSSES, 1, n_pos))  # the logits: held three times
    totals = {k: torch.zeros(cfg.n_layers, cfg.n_heads) for k in METRICS}
    for part in torch.arange(batch).split(rows):
        acts: dict[str, Tensor] = {}
        hooks = [(name, recording_hook(acts, name, fresh=True)) for name in z_names]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            m = loss_metrics(model(full[part]), full[part], answers[part])
            for i, k in enumerate(METRICS):
                grads = torch.autograd.grad(getattr(m, k).sum() / batch, [acts[n] for n in z_names], retain_graph=i < len(METRICS) - 1)
                for layer, (name, g) in enumerate(zip(z_names, grads)):
                    mean = means[layer] if means[layer].shape[0] == 1 else means[layer][part]
                    totals[k][layer] += ((mean - acts[name].detach()) * g).sum(dim=(0, 1, 3)).cpu()
        del acts, m
        release_freed_memory()
    return totals


def _ablate(
    model, full, answers, z_name: str, mean: Tensor, resid: Tensor | None, heads: Int[Tensor, " head"]
) -> Float[Tensor, "head row metric"]:
    """``LOSSES`` of the prompts ``full`` (with ``answers``) with each of ``heads`` mean-ablated (``z_name``'s heads set
    to ``mean``), one variant per head: from ``resid``, the clean residual stream entering the head's layer (from the
    tokens where None: layer 0)."""
    mask = torch.zeros(len(heads), 1, mean.shape[2], 1, dtype=torch.bool)
    mask[torch.arange(len(heads)), 0, heads] = True
    ablation = Intervention(z_name, "mean", mask)
    base = None if resid is None else {get_act_name("resid_pre", ablation.layer): resid}
    values, _ = run_interventions(model, full, answers, [ablation], {"mean": {z_name: mean}}, len(heads), base, metric=LOSSES)
    return values.cpu()


def heads_to_ablate(
    estimated: dict[str, Float[Tensor, "layer head"]], k: int | None, also: Sequence[tuple[int, int]] = ()
) -> list[tuple[int, int]] | None:
    """The heads to mean-ablate exactly: the ``k`` with the largest |estimated change| in answer loss, the ``k`` with the
    largest |estimated change| in logit difference, and ``also`` (e.g. the top heads of output patching), in
    (layer, head) order; None (every head) when ``k`` is None or these would be every head."""
    n_layers, n_heads = estimated["answer_loss"].shape
    if k is None or k >= n_layers * n_heads:
        return None
    chosen = {
        tuple(divmod(int(i), n_heads)) for key in ("answer_loss", "logit_diff") for i in estimated[key].flatten().abs().topk(k).indices
    }
    chosen |= {(int(layer), int(head)) for layer, head in also}
    return None if len(chosen) >= n_layers * n_heads else sorted(chosen)


def head_importance(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    memory_mb: float = 1024,
    progress: bool = True,
    groups: Int[Tensor, " batch"] | None = None,
    reference_tokens: Int[Tensor, "batch pos"] | None = None,
    reference_name: str = "reference",
    max_heads: int | None = None,
    also: Sequence[tuple[int, int]] = (),
) -> HeadImportance:
    """Mean-ablation importance of every head (see module docstring); ``memory_mb`` bounds one batched forward (its
    activations and full-sequence logits; a variant whose prompts do not fit at once runs in prompt slices);
    ``groups``: the prompts' sentence templates, each averaged on its own (``metrics.group_mean``);
    ``reference_tokens``: prompts the means come from (default ``tokens`` themselves; the corrupted prompts remove
    what distinguishes the task's answer, as the IOI paper's mean over its ABC prompts does; a task whose answer is
    the same in every prompt needs them, since a mean over its own prompts still carries that answer), called
    ``reference_name`` in the result (e.g. "corrupted").

    Every head's first-order estimate is returned too (``estimated``). ``max_heads``: on a model with more heads,
    only ``heads_to_ablate(estimated, max_heads, also)`` are ablated exactly, the other heads' changes are NaN
    (``heads`` lists the exact ones); None: every head."""
    cfg = model.cfg
    full = with_answers(tokens, answers)
    z_names, resid_names = _names(model)
    _check_supported(model, z_names)
    logits, cache, means = _means_and_cache(model, full, answers, z_names, resid_names, groups, reference_tokens)
    estimated = _estimate(model, full, answers, z_names, means, memory_mb)
    chosen = heads_to_ablate(estimated, max_heads, also)
    base = loss_metrics(logits, full, answers)
    del logits  # [batch, pos, d_vocab]: a gigabyte at 64 prompts of a 262k vocabulary
    batch, n_pos = full.shape
    # Variants of a layer share a forward while whole batches fit; else one variant runs in prompt slices.
    plan = plan_chunks(model, batch, n_pos, memory_mb, LOSSES)
    changes = {k: torch.full((cfg.n_layers, cfg.n_heads), float("nan")) for k in METRICS}
    for layer in tqdm(range(cfg.n_layers), desc="mean-ablate heads", disable=not progress, leave=False):
        layer_heads = torch.arange(cfg.n_heads) if chosen is None else torch.tensor([h for l, h in chosen if l == layer], dtype=torch.long)
        if not len(layer_heads):
            continue
        for heads in layer_heads.split(plan.variants):
            ablated = torch.cat(
                [
                    _ablate(
                        model,
                        full[rows],
                        answers[rows],
                        z_names[layer],
                        means[layer] if means[layer].shape[0] == 1 else means[layer][rows],
                        cache[resid_names[layer]][rows] if layer else None,  # layer 0: from the tokens
                        heads,
                    )
                    for rows in torch.arange(batch).split(plan.prompts)
                ],
                dim=1,
            )  # [head, prompt, metric]
            m = LossMetrics.of(ablated)
            for k in METRICS:
                changes[k][layer, heads] = getattr(m, k).mean(-1) - getattr(base, k).mean()
        release_freed_memory()  # this layer's ablated runs, back to the system (helpers.engine.memory)
    return HeadImportance(
        *(changes[k] for k in METRICS),
        baseline={k: float(getattr(base, k).mean()) for k in METRICS},
        n_prompts=batch,
        reference="the same prompts" if reference_tokens is None else f"the {reference_name} prompts",
        heads=chosen,
        estimated=estimated,
    )
