"""Logit difference, the metric every experiment here is scored with."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], answer_tokens: Int[Tensor, "batch 2"], pos: int = -1
) -> Float[Tensor, "batch"]:
    """Correct-answer logit minus incorrect-answer logit at ``pos`` (the final token by default), per prompt."""
    final = logits[:, pos]
    return (final.gather(-1, answer_tokens[:, :1]) - final.gather(-1, answer_tokens[:, 1:]))[:, 0]


def normalised(value: Tensor | float, clean: float, corrupted: float) -> Tensor | float:
    """Rescale a logit difference so that the corrupted run is 0 and the clean run is 1."""
    return (value - corrupted) / (clean - corrupted)
