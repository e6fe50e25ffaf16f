"""Logit difference, the metric every experiment here is scored with, and its normalisation.

Patching results are normalised so that the corrupted run is 0 and the clean run is 1. That divides by the
clean - corrupted gap: when the model does not do the task (a random-weight model, a task it never learned)
the gap is near zero and every normalised number is noise blown up, or undefined. ``check_normalisation``
says so (a warning, and a record for the result JSON); a zero gap gives NaN, written as null, never inf.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from jaxtyping import Float, Int
from torch import Tensor


def logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], answer_tokens: Int[Tensor, "batch 2"], pos: int = -1
) -> Float[Tensor, "batch"]:
    """Correct-answer logit minus incorrect-answer logit at ``pos`` (the final token by default), per prompt."""
    final = logits[:, pos].float()  # half-precision models: score in float32
    return (final.gather(-1, answer_tokens[:, :1]) - final.gather(-1, answer_tokens[:, 1:]))[:, 0]


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
        status, message = "zero", (f"clean and corrupted logit differences are equal ({clean:.4g} vs {corrupted:.4g}): normalised "
                                   "effects are undefined (null); the model does not distinguish the prompts")
    elif abs(gap) < SMALL_GAP_FRACTION * scale:
        status, message = "small", (f"clean - corrupted logit-difference gap is only {gap:.4g} ({clean:.4g} vs {corrupted:.4g}): "
                                    f"normalised effects divide by it and amplify noise {1 / abs(gap):.0f}x; "
                                    "the model barely does this task, so read them with care")
    else:
        status, message = "ok", ""
    if warn and status != "ok":
        warnings.warn(message, NormalisationWarning, stacklevel=2)
    return NormalisationCheck(clean, corrupted, status, message)


def normalised(value: Tensor | float, clean: float, corrupted: float) -> Tensor | float:
    """Rescale a logit difference so that the corrupted run is 0 and the clean run is 1 (NaN, not inf, if they are equal)."""
    gap = clean - corrupted
    if not math.isfinite(gap) or abs(gap) <= ZERO_GAP:
        return value * math.nan
    return (value - corrupted) / gap
