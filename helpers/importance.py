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
(nothing before it changes) through the bridge's own ``forward(start_at_layer=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.std import tqdm
from transformer_lens.utilities import get_act_name

from .hooks import resolve_hook_names
from .interventions import Intervention, hook_takes_effect, hooks_for
from .metrics import group_mean, logit_diff
from .patching import NotSupported, bytes_per_variant


@dataclass
class LossMetrics:
    """Per-variant task metrics of full-sequence logits (means over prompts)."""

    answer_loss: Float[Tensor, variant]  # -log p(correct) at the final prompt position, nats
    sequence_loss: Float[Tensor, variant]  # mean next-token cross-entropy over prompt + answer, nats
    logit_diff: Float[Tensor, variant]  # correct - incorrect logit at the final prompt position


def loss_metrics(
    logits: Float[Tensor, "variant_batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"], n_var: int
) -> LossMetrics:
    """The three metrics of ``logits`` of ``tokens`` = prompt followed by its correct answer (variant-major)."""
    reps = tokens.repeat(n_var, 1)
    logprobs = logits[:, :-1].float().log_softmax(-1)
    token_loss = -logprobs.gather(-1, reps[:, 1:, None])[..., 0]  # [variant*batch, pos-1]
    ld = logit_diff(logits[:, -2:-1], answers.repeat(n_var, 1))
    return LossMetrics(
        token_loss[:, -1].reshape(n_var, -1).mean(-1).cpu(),
        token_loss.mean(-1).reshape(n_var, -1).mean(-1).cpu(),
        ld.reshape(n_var, -1).mean(-1).cpu(),
    )


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
    """Mean-ablation importance of every head (see module docstring); ``memory_mb`` bounds one batched forward;
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
            _, reference = model.run_with_cache(with_answers(reference_tokens, answers), names_filter=z_names)
    with torch.no_grad():
        logits, cache = model.run_with_cache(full, names_filter=z_names + resid_names)
    base = loss_metrics(logits, full, answers, 1)
    batch, n_pos = full.shape
    per_variant = bytes_per_variant(model, batch, n_pos) + 4 * batch * n_pos * cfg.d_vocab  # + logits at every position
    chunk = max(1, int(memory_mb * 2**20) // per_variant)
    rows: dict[str, list[Tensor]] = {"answer_loss": [], "sequence_loss": [], "logit_diff": []}
    for layer in tqdm(range(cfg.n_layers), desc="mean-ablate heads", disable=not progress, leave=False):
        z = (reference or cache)[z_names[layer]]
        mean = {"mean": {z_names[layer]: group_mean(z, groups)}}
        resid = cache[resid_names[layer]]
        out: dict[str, list[Tensor]] = {k: [] for k in rows}
        for heads in torch.arange(cfg.n_heads).split(chunk):
            mask = torch.zeros(len(heads), 1, cfg.n_heads, 1, dtype=torch.bool)
            mask[torch.arange(len(heads)), 0, heads] = True
            iv = Intervention(z_names[layer], "mean", mask)
            with torch.no_grad(), model.hooks(fwd_hooks=hooks_for([iv], mean, len(heads))):
                ablated = model(resid.repeat(len(heads), 1, 1), start_at_layer=layer) if layer else model(full.repeat(len(heads), 1))
            m = loss_metrics(ablated, full, answers, len(heads))
            for k in out:
                out[k].append(getattr(m, k) - getattr(base, k))
        for k in rows:
            rows[k].append(torch.cat(out[k]))
    return HeadImportance(
        *(torch.stack(rows[k]) for k in ("answer_loss", "sequence_loss", "logit_diff")),
        baseline={k: float(getattr(base, k)[0]) for k in rows},
        n_prompts=batch,
        reference="the same prompts" if reference_tokens is None else f"the {reference_name} prompts",
    )
