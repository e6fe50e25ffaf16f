"""Proposed head roles from evidence already computed, each with the numbers that justify it.

Rules (every threshold is a parameter; a head gets every role whose rule it meets, the first in
``ROLE_ORDER`` is its proposed role, and a head that meets none is "unclassified"):

* mover: DLA >= ``dla_fraction`` of the clean logit diff and positive copy score >= ``copy_score``;
* negative mover: DLA <= -``dla_fraction`` of the logit diff and negative copy score >= ``copy_score``;
* inhibition-like: patching its output (corrupted into clean) shifts a later mover's attention to a named
  word by >= ``attention_shift``;
* induction / duplicate-token / previous-token: that score on repeated random tokens >= its threshold.
"""

from __future__ import annotations

import math

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from helpers.schema.heads import Head
from helpers.schema.results import CircuitExpmsResults

ROLE_ORDER = ["mover", "negative mover", "inhibition-like", "induction", "duplicate-token", "previous-token"]


class RoleThresholds(BaseModel):
    """Thresholds of the role rules (see module docstring)."""

    model_config = ConfigDict(extra="forbid")

    dla_fraction: float = Field(0.1, ge=0, description="|DLA| as a fraction of the clean logit diff")
    copy_score: float = Field(50.0, ge=0, le=100, description="copy score, percent of words in the top k")
    attention_shift: float = Field(0.1, ge=0, le=1, description="change of a later mover's attention to a word")
    induction: float = Field(0.4, ge=0, le=1, description="induction score on repeated random tokens")
    duplicate_token: float = Field(0.4, ge=0, le=1, description="duplicate-token score on repeated random tokens")
    previous_token: float = Field(0.4, ge=0, le=1, description="previous-token score on repeated random tokens")

    def for_score(self, kind: str) -> float:
        """The threshold of a repeated-token pattern score (``pattern_scores.pattern_scores``' keys: ``prev_token``,
        ``duplicate_token``, ``induction``): the one place every template and report reads it from."""
        if kind not in PATTERN_SCORE_ROLES:
            raise ValueError(f"no threshold for score {kind!r}; pattern scores are {sorted(PATTERN_SCORE_ROLES)}")
        return getattr(self, PATTERN_SCORE_ROLES[kind])


# pattern score (``pattern_scores.pattern_scores``) -> its field in RoleThresholds (the role is the field with '-' for '_')
PATTERN_SCORE_ROLES = {"induction": "induction", "duplicate_token": "duplicate_token", "prev_token": "previous_token"}


def _met(row: dict, t: RoleThresholds, logit_diff: float) -> dict[str, str]:
    """Each role whose rule ``row`` meets, with the evidence as text."""
    roles: dict[str, str] = {}
    dla, limit = row.get("dla", math.nan), t.dla_fraction * abs(logit_diff)
    if dla >= limit and row.get("copy_positive", 0) >= t.copy_score:
        roles["mover"] = f"DLA {dla:+.2f} (>= {limit:.2f}); copy score {row['copy_positive']:.0f}% (>= {t.copy_score:.0f}%)"
    if dla <= -limit and row.get("copy_negative", 0) >= t.copy_score:
        roles["negative mover"] = f"DLA {dla:+.2f} (<= -{limit:.2f}); negative copy score {row['copy_negative']:.0f}%"
    shift = row.get("attention_shift", 0.0)
    if abs(shift) >= t.attention_shift:
        roles["inhibition-like"] = (
            f"moves {row['shifted_reader']}'s attention to {row['shifted_word']} by {shift:+.2f} (|.| >= {t.attention_shift:.2f})"
        )
    for key, field in PATTERN_SCORE_ROLES.items():
        role, score, thr = field.replace("_", "-"), row.get(key, math.nan), t.for_score(key)
        if score >= thr:
            roles[role] = f"{role} score {score:.2f} (>= {thr:.2f})"
    return roles


def _nearest_miss(row: dict, t: RoleThresholds, logit_diff: float) -> str:
    """Why no rule was met, naming the strongest evidence the head has."""
    dla, limit = row.get("dla", math.nan), t.dla_fraction * abs(logit_diff)
    if abs(dla) >= limit:
        copy = row.get("copy_positive" if dla > 0 else "copy_negative", math.nan)
        return (
            f"writes {'for' if dla > 0 else 'against'} the answer (DLA {dla:+.2f}) but its {'' if dla > 0 else 'negative '}"
            f"copy score is {copy:.0f}% (< {t.copy_score:.0f}%): it does not copy the word it attends to"
        )
    scores = {k: row.get(k, math.nan) for k in ("prev_token", "duplicate_token", "induction")}
    best = max(scores, key=lambda k: -math.inf if math.isnan(scores[k]) else scores[k])
    return f"no rule met: |DLA| {abs(dla):.2f} < {limit:.2f}, highest pattern score {best} {scores[best]:.2f}"


def assign_roles(evidence: pd.DataFrame, logit_diff: float, thresholds: RoleThresholds | None = None) -> pd.DataFrame:
    """One row per head of ``evidence`` (indexed by head label): proposed role, why, and other roles it meets."""
    t = thresholds or RoleThresholds()
    rows = []
    for head, row in evidence.iterrows():
        met = _met(row.to_dict(), t, logit_diff)
        ordered = [r for r in ROLE_ORDER if r in met]
        if ordered:
            rows.append({"head": head, "role": ordered[0], "evidence": met[ordered[0]], "also": ", ".join(ordered[1:])})
        else:
            rows.append({"head": head, "role": "unclassified", "evidence": _nearest_miss(row.to_dict(), t, logit_diff), "also": ""})
    return pd.DataFrame(rows).set_index("head").join(evidence)


def head_evidence(circuit: CircuitExpmsResults, chosen: list[Head], copy, attention_corr) -> pd.DataFrame:
    """Evidence table, one row per chosen head: DLA and output patching (from ``circuit_expms.json``), copy
    scores, attention-contribution correlation, and the repeated-token scores."""
    dla, patch, scores = circuit.dla.heads, circuit.patching.head_out(), circuit.head_scores.values
    rows = []
    for h in chosen:
        l, i = h.index
        rows.append(
            {
                "head": h.label,
                "layer": l,
                "head_index": i,
                "dla": dla[l][i],
                "patch_head_out": patch[l][i],
                "copy_positive": float(copy.positive[l, i]),
                "copy_negative": float(copy.negative[l, i]),
                "attention_corr": float(attention_corr[l, i]),
                "prev_token": scores["prev_token"][l][i],
                "duplicate_token": scores["duplicate_token"][l][i],
                "induction": scores["induction"][l][i],
            }
        )
    return pd.DataFrame(rows).set_index("head")


def heads_meeting(evidence: pd.DataFrame, role: str, logit_diff: float, thresholds: RoleThresholds | None = None) -> list[Head]:
    """Every head in ``evidence`` whose rule for ``role`` is met."""
    t = thresholds or RoleThresholds()
    return [Head(int(row["layer"]), int(row["head_index"])) for _, row in evidence.iterrows() if role in _met(row.to_dict(), t, logit_diff)]


def add_attention_shift(evidence: pd.DataFrame, shift, candidates: list[Head], readers: list[Head], words: list[str]) -> pd.DataFrame:
    """Add, per candidate head, its largest |shift| of a reader's attention (``head_functions.attention_shift``)."""
    out = evidence.copy()
    for i, c in enumerate(candidates):
        flat = shift[i].abs().flatten()
        j, w = divmod(int(flat.argmax()), len(words))
        out.loc[c.label, ["attention_shift", "shifted_reader", "shifted_word"]] = [
            float(shift[i, j, w]),
            readers[j].label,
            words[w],
        ]
    out["attention_shift"] = out["attention_shift"].astype(float)
    return out


def roles_summary(role_table: pd.DataFrame, thresholds: RoleThresholds | None = None) -> str:
    """One honest paragraph: how many heads got each role, and when none did, why (the thresholds)."""
    t = thresholds or RoleThresholds()
    counts = role_table["role"].value_counts()
    classified = {r: int(n) for r, n in counts.items() if r != "unclassified"}
    if classified:
        return (
            f"Roles proposed: {', '.join(f'{n} {r}' for r, n in classified.items())}; "
            f"{int(counts.get('unclassified', 0))} of {len(role_table)} heads unclassified."
        )
    return (
        f"No head met any role rule: all {len(role_table)} heads are 'unclassified' (thresholds: "
        f"{', '.join(f'{k} {v}' for k, v in t.model_dump().items())}). The evidence column shows each head's nearest "
        "miss. A circuit built from these heads is a list of heads that DLA or patching ranked highly, not a "
        "mechanism; check the plots above, or adjust role_thresholds if the rules do not fit this task."
    )
