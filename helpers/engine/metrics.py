"""Logit difference, the metric every experiment here is scored with, and its normalisation; ``Metric``, what a
batched run measures from its logits (``forward.run_interventions`` takes one: logit difference by default; answer
probability, losses and KL divergence from a reference run are the others here); ``rank_correlation``, how well an
estimate ranks what exact patching measures.

Patching results are normalised so that the corrupted run is 0 and the clean run is 1. That divides by the
clean - corrupted gap: when the model does not do the task (a random-weight model, a task it never learned)
the gap is near zero and every normalised number is noise blown up, or undefined. ``check_normalisation``
says so (a warning, and a record for the result JSON); a zero gap gives NaN, written as null, never inf.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.schema.artifacts import DIGITS, as_numpy


def logit_diff(logits: Float[Tensor, "batch pos d_vocab"], answer_tokens: Int[Tensor, "batch 2"], pos: int = -1) -> Float[Tensor, " batch"]:
    """Correct-answer logit minus incorrect-answer logit at ``pos`` (the final token by default), per prompt."""
    final = logits[:, pos].float()  # half-precision models: score in float32
    return (final.gather(-1, answer_tokens[:, :1]) - final.gather(-1, answer_tokens[:, 1:]))[:, 0]


@dataclass(frozen=True)
class Metric:
    """What a batched run measures from its logits: ``fn(logits, tokens, answers)`` gives one value per row
    (``[rows]``) or several (``[rows, len(outputs)]``), rows being variants x prompts, variant-major.

    It says what it reads, so that the runner computes nothing else:

    * ``positions``: ``"last"``, the final position's logits only (``logits`` is ``[rows, 1, vocab]``), or ``"all"``
      (every position's; the run then recomputes every position, not only those after the first patched one);
    * ``vocabulary``: ``"answers"``, the two answer columns only (``logits``' last axis may then be just those two,
      and ``answers`` their column indices in it: ``shortcuts.answer_columns``), or ``"all"`` (the full vocabulary;
      ``answers`` are token ids).

    ``tokens`` are each row's input tokens; ``reference`` a tensor ``fn`` compares against, one row per prompt (e.g.
    the clean run's log-probabilities for a KL divergence), repeated over variants by ``__call__``."""

    name: str
    fn: Callable[..., Tensor]
    positions: Literal["last", "all"] = "last"
    vocabulary: Literal["answers", "all"] = "answers"
    outputs: tuple[str, ...] = ()
    about: str = ""
    reference: Tensor | None = field(default=None, repr=False, compare=False)

    def __call__(
        self, logits: Float[Tensor, "rows pos vocab"], tokens: Int[Tensor, "rows pos"], answers: Int[Tensor, "rows 2"]
    ) -> Float[Tensor, " rows *outputs"]:
        if self.reference is None:
            return self.fn(logits, tokens, answers)
        reference = self.reference.to(logits.device)
        return self.fn(logits, tokens, answers, reference.repeat(len(logits) // len(reference), *[1] * (reference.dim() - 1)))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "positions": self.positions,
            "vocabulary": self.vocabulary,
            "outputs": list(self.outputs),
            "about": self.about,
        }


def _logit_diff_last(logits: Tensor, tokens: Tensor, answers: Tensor) -> Tensor:
    return logit_diff(logits, answers)


def _answer_probability(logits: Tensor, tokens: Tensor, answers: Tensor) -> Tensor:
    return logits[:, -1].float().softmax(-1).gather(-1, answers[:, :1])[:, 0]


LOSS_ROWS = 8  # rows of full-sequence logits turned into losses at a time: bounds the softmax's temporary copy


def token_losses(logits: Float[Tensor, "rows pos d_vocab"], tokens: Int[Tensor, "rows pos"]) -> Float[Tensor, "rows pos_1"]:
    """Next-token cross-entropy at every position but the last (nats): ``logsumexp - target logit``, ``LOSS_ROWS`` rows
    at a time, so that the temporary it needs is a few rows of vocabulary-sized logits, not another copy of all of them
    (a 262k vocabulary: 1 GB per 64 rows)."""
    return torch.cat(
        [
            torch.logsumexp(chunk[:, :-1].float(), -1) - chunk[:, :-1].float().gather(-1, toks[:, 1:, None])[..., 0]
            for chunk, toks in zip(logits.split(LOSS_ROWS), tokens.split(LOSS_ROWS))
        ]
    )


def _losses(logits: Tensor, tokens: Tensor, answers: Tensor) -> Tensor:
    token_loss = token_losses(logits, tokens)
    return torch.stack([token_loss[:, -1], token_loss.mean(-1), logit_diff(logits[:, -2:-1], answers)], dim=-1)


def _kl_divergence(logits: Tensor, tokens: Tensor, answers: Tensor, reference: Tensor) -> Tensor:
    logp = logits[:, -1].float().log_softmax(-1)
    return (reference.exp() * (reference - logp)).sum(-1)


LOGIT_DIFF = Metric("logit_diff", _logit_diff_last, about="correct minus incorrect answer logit at the final position (``logit_diff``)")
ANSWER_PROBABILITY = Metric(
    "answer_probability", _answer_probability, vocabulary="all", about="the correct answer's probability at the final position"
)
LOSSES = Metric(
    "losses",
    _losses,
    positions="all",
    vocabulary="all",
    outputs=("answer_loss", "sequence_loss", "logit_diff"),
    about=(
        "for tokens = prompt followed by its correct answer: -log p(correct) at the final prompt position; the mean "
        "next-token cross-entropy over prompt and answer; the logit difference at the final prompt position"
    ),
)


def kl_divergence(reference_logits: Float[Tensor, "batch d_vocab"]) -> Metric:
    """KL(reference || run) of the final position's next-token distribution, per prompt (nats): how far an intervention
    moves the whole prediction, not only the two answers. ``reference_logits``: each prompt's final-position logits in
    the reference run (e.g. the clean run)."""
    return Metric(
        "kl_divergence",
        _kl_divergence,
        vocabulary="all",
        about="KL(reference || run) of the final position's next-token distribution, nats",
        reference=reference_logits.float().log_softmax(-1),
    )


# The gap must be at least this fraction of the larger |logit diff| (and above ZERO_GAP) for normalised values to mean much.
SMALL_GAP_FRACTION = 0.1
ZERO_GAP = 1e-6


class NormalisationWarning(UserWarning):
    """The clean - corrupted logit-difference gap is too small for normalised effects to be meaningful."""


@dataclass(frozen=True)
class NormalisationCheck:
    """Whether normalising by the clean - corrupted gap is meaningful: status 'ok', 'small' or 'zero'."""

    clean: float
    corrupted: float
    status: str
    message: str

    @property
    def gap(self) -> float:
        return self.clean - self.corrupted

    def to_json(self) -> dict:
        return {**asdict(self), "gap": self.gap}


def check_normalisation(clean: float, corrupted: float, warn: bool = True) -> NormalisationCheck:
    """Classify the gap (see module docstring); warn (``NormalisationWarning``) unless it is 'ok'."""
    gap = clean - corrupted
    scale = max(abs(clean), abs(corrupted))
    if not math.isfinite(gap) or abs(gap) <= ZERO_GAP:
        status, message = (
            "zero",
            (
                f"clean and corrupted logit differences are equal ({clean:.4g} vs {corrupted:.4g}): normalised "
                "effects are undefined (null); the model does not distinguish the prompts"
            ),
        )
    elif abs(gap) < SMALL_GAP_FRACTION * scale:
        status, message = (
            "small",
            (
                f"clean - corrupted logit-difference gap is only {gap:.4g} ({clean:.4g} vs {corrupted:.4g}): "
                f"normalised effects divide by it and amplify noise {1 / abs(gap):.0f}x; "
                "the model barely does this task, so read them with care"
            ),
        )
    else:
        status, message = "ok", ""
    if warn and status != "ok":
        warnings.warn(message, NormalisationWarning, stacklevel=2)
    return NormalisationCheck(clean, corrupted, status, message)


def normalised(value: Tensor | float, clean: float | Tensor, corrupted: float | Tensor) -> Tensor | float:
    """Rescale a logit difference so that the corrupted run is 0 and the clean run is 1 (NaN, not inf, if they are equal).
    Baselines may be tensors (one per group, broadcasting against ``value``): each is checked on its own."""
    if isinstance(clean, Tensor) or isinstance(corrupted, Tensor):
        gap = torch.as_tensor(clean) - torch.as_tensor(corrupted)
        usable = torch.isfinite(gap) & (gap.abs() > ZERO_GAP)
        return torch.where(usable, (value - corrupted) / torch.where(usable, gap, 1.0), torch.nan)
    gap = clean - corrupted
    if not math.isfinite(gap) or abs(gap) <= ZERO_GAP:
        return value * math.nan
    return (value - corrupted) / gap


def faithfulness(circuit_logit_diff: Tensor | float, model_logit_diff: float | Tensor, baseline: float | Tensor) -> Tensor | float:
    """Faithfulness of a circuit, the one definition used everywhere: ``(LD(C) - baseline) / (LD(M) - baseline)``,
    ``normalised`` with the full model as 1 and ``baseline`` as 0. Its two normalisations name the baseline:

    * ``gap``: the corrupted run's logit difference (every edge-level number, ``circuit_discovery``, MIB; and
      ``circuits`` with ``normalisation="gap"``): the share of the clean - corrupted gap the circuit keeps;
    * ``ratio``: 0 (``circuits`` with ``normalisation="ratio"``, the IOI paper's F(C) / F(M)).

    NaN, not inf, when the model's logit difference equals the baseline."""
    return normalised(circuit_logit_diff, model_logit_diff, baseline)


@dataclass(frozen=True)
class TaskCheck:
    """Does the model do the task at all? Checked at the top of every template, before any analysis.

    ``accuracy``: fraction of clean prompts whose correct answer has a higher logit than the incorrect one (a
    logit difference > 0); ``top1``: fraction where the correct answer is the model's top prediction;
    ``gap``: mean clean minus mean corrupted logit difference, the divisor of every normalised effect. The task
    counts as performed when accuracy >= ``min_accuracy`` and gap >= ``min_gap`` (params ``analysis``). Below
    either, normalised effects (patching recovered, faithfulness, head importance) divide by a gap the model
    does not produce: they are not evidence of a mechanism, whatever their size.
    """

    accuracy: float
    top1: float
    clean_logit_diff: float
    corrupted_logit_diff: float
    min_accuracy: float
    min_gap: float

    @property
    def gap(self) -> float:
        return self.clean_logit_diff - self.corrupted_logit_diff

    @property
    def performed(self) -> bool:
        return self.accuracy >= self.min_accuracy and self.gap >= self.min_gap

    def reasons(self) -> list[str]:
        """Why the task does not count as performed (empty when it does)."""
        out = []
        if self.accuracy < self.min_accuracy:
            out.append(
                f"the correct answer beats the incorrect one on {self.accuracy:.0%} of clean prompts (threshold {self.min_accuracy:.0%})"
            )
        if self.gap < self.min_gap:
            out.append(
                f"the clean - corrupted logit-difference gap is {self.gap:.3f} "
                f"({self.clean_logit_diff:.3f} vs {self.corrupted_logit_diff:.3f}; threshold {self.min_gap})"
            )
        return out

    def summary(self) -> str:
        """One line for tables and logs."""
        verdict = "performed" if self.performed else "NOT performed: " + "; ".join(self.reasons())
        return (
            f"task {verdict} (accuracy {self.accuracy:.2f}, top-1 {self.top1:.2f}, logit diff clean "
            f"{self.clean_logit_diff:.3f} vs corrupted {self.corrupted_logit_diff:.3f})"
        )

    def to_json(self) -> dict:
        return {"task_performed": self.performed, **asdict(self), "gap": self.gap, "reasons": self.reasons()}


def check_task(
    clean_ld: Float[Tensor, " batch"], corrupted_ld: Float[Tensor, " batch"], top1: float, min_accuracy: float, min_gap: float
) -> TaskCheck:
    """The TaskCheck of per-prompt clean and corrupted logit differences."""
    return TaskCheck(
        float((clean_ld > 0).float().mean()),
        float(top1),
        float(clean_ld.mean()),
        float(corrupted_ld.mean()),
        float(min_accuracy),
        float(min_gap),
    )


def group_mean(x: Float[Tensor, "batch ..."], groups: Int[Tensor, " batch"] | None = None) -> Float[Tensor, "batch_or_1 ..."]:
    """The mean over the batch axis, for mean ablation: ``[1, ...]`` (the same for every prompt) when all prompts form
    one group, else one row per prompt holding the mean of its own group (e.g. the prompts of its sentence template:
    ABBA and BABA prompts have different words at the same index, so one mean over both would blend them)."""
    if groups is None or int(groups.max()) == int(groups.min()):
        return x.mean(0, keepdim=True)
    weights = group_weights(x.shape[0], groups).to(x.device, x.dtype)  # [batch, group]
    means = torch.einsum("bg,b...->g...", weights, x)
    return means[groups.to(x.device)]


def group_weights(batch: int, groups: Int[Tensor, " batch"] | None) -> Float[Tensor, "batch group"]:
    """Columns that average over the prompts of each group (one column, the plain mean, without ``groups``)."""
    if groups is None:
        return torch.full((batch, 1), 1.0 / batch)
    one_hot = torch.nn.functional.one_hot(groups.cpu().long(), int(groups.max()) + 1).float()
    return one_hot / one_hot.sum(0, keepdim=True).clamp_min(1)


def rank_correlation(exact, estimate) -> float:
    """Spearman's rank correlation of ``estimate`` (attribution scores, edge scores, ...) with the ``exact`` values it
    stands for, over the cells computed exactly (``exact`` not NaN), both rounded to the ``DIGITS`` decimals results are
    written at; NaN with fewer than two cells.

    Rounded, because at full precision the cells where a patch changes nothing (e.g. every position before the first
    one where clean and corrupted differ: float noise of 1e-9 instead of 0 in both, as their runs round differently)
    were ranked by their noise: Gemma-3's attribution against its exact head_out_by_pos sweep read 0.770 in one run and 0.944 in the next,
    on values equal to six decimals. Rounded, those cells tie at 0 in both, the figure is the same from run to run,
    and it is what a reader recomputes from the written values."""
    from scipy.stats import spearmanr

    exact, estimate = (np.round(np.asarray(as_numpy(x), dtype=float).ravel(), DIGITS) for x in (exact, estimate))
    done = ~np.isnan(exact)
    return float(spearmanr(exact[done], estimate[done])[0]) if done.sum() > 1 else math.nan
