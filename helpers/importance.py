"""Loss-based head importance: what mean-ablating each head costs on the task prompts.

Patching asks how much of the clean-vs-corrupted *difference* a head carries; this asks how much the model
needs the head at all. Each head's output ``z`` is replaced, at every position, by its mean over the task's
clean prompts at that position (mean ablation keeps the head's average contribution and removes only what
depends on the prompt), and three quantities are measured against the unablated run:

* **answer loss**: ``-log p(correct answer)`` at the final position, the task's own next-token loss;
* **sequence loss**: the mean next-token cross-entropy over every token of the prompt followed by its correct
  answer (what the model's training loss would say);
* **logit difference**: correct minus incorrect answer logit at the final position.

All heads of a layer run as one batch of variants, starting from the clean residual stream at that layer
(nothing before it changes) through the bridge's own ``forward(start_at_layer=...)``, the blocks before it not
computed (``interventions.logits_from_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.std import tqdm
from transformer_lens.utilities import get_act_name

from .hooks import resolve_hook_names
from .interventions import Intervention, hook_takes_effect, hooks_for, logits_from_layer
from .memory import release_freed_memory
from .metrics import group_mean, logit_diff
from .patching import NotSupported, bytes_per_variant

LOSS_ROWS = 8  # rows of full-sequence logits turned into losses at a time: bounds the softmax's temporary copy
METRICS = ("answer_loss", "sequence_loss", "logit_diff")


@dataclass
class LossMetrics:
    """Per-row task metrics of full-sequence logits (one row per variant x prompt, variant-major)."""

    answer_loss: Float[Tensor, rows]  # -log p(correct) at the final prompt position, nats
    sequence_loss: Float[Tensor, rows]  # mean next-token cross-entropy over prompt + answer, nats
    logit_diff: Float[Tensor, rows]  # correct - incorrect logit at the final prompt position

    def by_variant(self, n_var: int) -> LossMetrics:
        """Each metric as [variant, prompt]."""
        return LossMetrics(*(getattr(self, k).reshape(n_var, -1) for k in METRICS))


def loss_metrics(logits: Float[Tensor, "rows pos d_vocab"], tokens: Int[Tensor, "rows pos"], answers: Int[Tensor, "rows 2"]) -> LossMetrics:
    """The three metrics of each row of ``logits`` of ``tokens`` = prompt followed by its correct answer. The
    cross-entropy is ``logsumexp - target logit``, taken ``LOSS_ROWS`` rows at a time, so that the temporary it needs
    is a few rows of vocabulary-sized logits, not another copy of all of them (a 262k vocabulary: 1 GB per 64 rows)."""
    token_loss = torch.cat(
        [
            torch.logsumexp(chunk[:, :-1].float(), -1) - chunk[:, :-1].float().gather(-1, toks[:, 1:, None])[..., 0]
            for chunk, toks in zip(logits.split(LOSS_ROWS), tokens.split(LOSS_ROWS))
        ]
    )  # [rows, pos-1]
    return LossMetrics(token_loss[:, -1].cpu(), token_loss.mean(-1).cpu(), logit_diff(logits[:, -2:-1], answers).cpu())


@dataclass
class HeadImportance:
    """The change in each metric when one head is mean-ablated (ablated minus unablated; [layer, head])."""

    answer_loss: Float[Tensor, "layer head"]  # > 0: the head helps predict the answer
    sequence_loss: Float[Tensor, "layer head"]  # > 0: the head helps predict the prompt's tokens
    logit_diff: Float[Tensor, "layer head"]  # < 0: the head helps the correct answer over the incorrect one
    baseline: dict[str, float]  # the unablated run's answer_loss, sequence_loss, logit_diff
    n_prompts: int
    reference: str = "the same prompts"  # where the means come from

    def to_json(self) -> dict:
        return {
            "answer_loss": self.answer_loss,
            "sequence_loss": self.sequence_loss,
            "logit_diff": self.logit_diff,
            "baseline": self.baseline,
            "n_prompts": self.n_prompts,
            "ablation": f"each head's z replaced at every position by its mean over {self.reference} at that position",
            "sign": "ablated minus unablated",
        }


def with_answers(tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"]) -> Int[Tensor, "batch pos+1"]:
    """The prompts followed by their correct answer token."""
    return torch.cat([tokens, answers[:, :1].to(tokens.device)], dim=1)


def head_importance(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    memory_mb: float = 1024,
    progress: bool = True,
    groups: Int[Tensor, batch] | None = None,
    reference_tokens: Int[Tensor, "batch pos"] | None = None,
    reference_name: str = "reference",
) -> HeadImportance:
    """Mean-ablation importance of every head (see module docstring); ``memory_mb`` bounds one batched forward (its
    activations and full-sequence logits; a variant whose prompts do not fit at once runs in prompt slices);
    ``groups``: the prompts' sentence templates, each averaged on its own (``metrics.group_mean``);
    ``reference_tokens``: prompts the means come from (default ``tokens`` themselves; the corrupted prompts remove
    what distinguishes the task's answer, as the IOI paper's mean over its ABC prompts does; a task whose answer is
    the same in every prompt needs them, since a mean over its own prompts still carries that answer), called
    ``reference_name`` in the result (e.g. "corrupted")."""
    cfg = model.cfg
    full = with_answers(tokens, answers)
    z_names = resolve_hook_names(model, [get_act_name("z", l) for l in range(cfg.n_layers)])
    resid_names = resolve_hook_names(model, [get_act_name("resid_pre", l) for l in range(cfg.n_layers)])
    if not hook_takes_effect(model, z_names[-1]):
        raise NotSupported(
            f"head importance is not supported for this architecture ({type(model.original_model).__name__}): "
            "the bridge discards edits of attn.hook_z, so every ablation would be a silent zero"
        )
    reference = {}
    if reference_tokens is not None:
        with torch.no_grad():
            reference = model.run_with_cache(with_answers(reference_tokens, answers), names_filter=z_names)[1]  # logits dropped
    with torch.no_grad():
        logits, cache = model.run_with_cache(full, names_filter=z_names + resid_names)
    base = loss_metrics(logits, full, answers)
    del logits  # [batch, pos, d_vocab]: a gigabyte at 64 prompts of a 262k vocabulary
    batch, n_pos = full.shape
    # One prompt of one variant: its activations through a block and its logits at every position (the losses need
    # them all). Variants of a layer share a forward while whole batches fit; else one variant runs in prompt slices.
    per_row = bytes_per_variant(model, 1, n_pos) + 4 * n_pos * cfg.d_vocab
    rows_fit = max(1, int(memory_mb * 2**20) // per_row)
    heads_per_run, prompts_per_run = max(1, rows_fit // batch), min(batch, rows_fit)
    rows: dict[str, list[Tensor]] = {k: [] for k in METRICS}
    for layer in tqdm(range(cfg.n_layers), desc="mean-ablate heads", disable=not progress, leave=False):
        means = group_mean((reference or cache)[z_names[layer]], groups)  # [1 or batch, pos, head, d_head]
        resid = cache[resid_names[layer]]
        out: dict[str, list[Tensor]] = {k: [] for k in METRICS}
        for heads in torch.arange(cfg.n_heads).split(heads_per_run):
            n = len(heads)
            mask = torch.zeros(n, 1, cfg.n_heads, 1, dtype=torch.bool)
            mask[torch.arange(n), 0, heads] = True
            iv = Intervention(z_names[layer], "mean", mask)
            parts: dict[str, list[Tensor]] = {k: [] for k in METRICS}
            for rows_of in torch.arange(batch).split(prompts_per_run):
                mean = {"mean": {z_names[layer]: means if means.shape[0] == 1 else means[rows_of]}}
                with torch.no_grad():
                    if layer:  # the blocks before it are not computed (interventions.logits_from_layer)
                        ablated = logits_from_layer(model, resid[rows_of].repeat(n, 1, 1), layer, hooks_for([iv], mean, n))
                    else:
                        with model.hooks(fwd_hooks=hooks_for([iv], mean, n)):
                            ablated = model(full[rows_of].repeat(n, 1))
                m = loss_metrics(ablated, full[rows_of].repeat(n, 1), answers[rows_of].repeat(n, 1)).by_variant(n)
                del ablated
                for k in METRICS:
                    parts[k].append(getattr(m, k))
            for k in METRICS:
                out[k].append(torch.cat(parts[k], dim=1).mean(-1) - getattr(base, k).mean())
        for k in METRICS:
            rows[k].append(torch.cat(out[k]))
        release_freed_memory()  # this layer's ablated runs, back to the system (helpers.memory)
    return HeadImportance(
        *(torch.stack(rows[k]) for k in METRICS),
        baseline={k: float(getattr(base, k).mean()) for k in METRICS},
        n_prompts=batch,
        reference="the same prompts" if reference_tokens is None else f"the {reference_name} prompts",
    )
