"""Model components as small values: ``Head`` (a layer and a head index) and ``HeadScore`` (a head with a value).

Every module and template names heads through these: in code a ``Head``, in text and JSON keys its label
``"L3H2"``, in result files ``{"layer": 3, "head": 2}`` (plus ``"value"`` for a score). ``Head.of`` reads any of
those forms back. Ranking heads by a ``[layer, head]`` tensor is ``rank_heads``; keeping those above a
threshold is ``heads_above``: one implementation each. Nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LABEL_RE = re.compile(r"L(\d+)H(\d+)")


@dataclass(frozen=True, order=True)
class Head:
    """Attention head ``head`` of layer ``layer`` (both from 0); ``str(Head(3, 2)) == "L3H2"``."""

    layer: int
    head: int

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, label: str, n_layers: int | None = None, n_heads: int | None = None) -> Head:
        """The head of a label such as ``"L3H2"``; ValueError if malformed or (given the shape) not in the model."""
        match = LABEL_RE.fullmatch(str(label).strip())
        if not match:
            raise ValueError(f"head label {label!r} is not of the form 'L<layer>H<head>', e.g. 'L3H2'")
        head = cls(int(match[1]), int(match[2]))
        return head.check(n_layers, n_heads) if n_layers is not None and n_heads is not None else head

    @classmethod
    def of(cls, value: Any) -> Head:
        """A ``Head`` from a Head, a label ``"L3H2"``, a ``{"layer", "head"}`` mapping or a ``(layer, head)`` pair."""
        if isinstance(value, Head):
            return cls(value.layer, value.head)
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(int(value["layer"]), int(value["head"]))
        layer, head = value
        return cls(int(layer), int(head))

    def check(self, n_layers: int, n_heads: int) -> Head:
        """This head, after checking that a model of ``n_layers`` x ``n_heads`` has it (ValueError if not)."""
        if not (0 <= self.layer < n_layers and 0 <= self.head < n_heads):
            raise ValueError(f"head {self} does not exist: the model has {n_layers} layers x {n_heads} heads")
        return self

    @property
    def index(self) -> tuple[int, int]:
        """``(layer, head)``: index a ``[layer, head, ...]`` tensor with ``values[h.index]``."""
        return self.layer, self.head

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head}

    @staticmethod
    def all(n_layers: int, n_heads: int) -> list[Head]:
        """Every head, in flattened ``(layer, head)`` order, as ``values.flatten()`` lists them."""
        return [Head(layer, head) for layer in range(n_layers) for head in range(n_heads)]


@dataclass(frozen=True, order=True)
class HeadScore(Head):
    """A head with a value of some ``[layer, head]`` quantity (a DLA, a patching effect, a pattern score). It is a
    ``Head`` (label, index, check); ``unit`` is the bare head, for sets and comparisons with other heads."""

    value: float = float("nan")

    @property
    def unit(self) -> Head:
        return Head(self.layer, self.head)

    def __str__(self) -> str:
        return f"{self.label} ({self.value:+.3f})"

    def to_json(self) -> dict:
        return {"layer": self.layer, "head": self.head, "value": round(float(self.value), 6)}


SIGNS = ("pos", "neg", "abs")


def rank_heads(values, k: int | None = None, sign: str = "abs") -> list[HeadScore]:
    """The ``k`` heads (all when None) with the largest ``values`` [layer, head] (a tensor, array or nested list):
    ``sign`` 'pos' ranks by the value, 'neg' by its negative, 'abs' by its size. Ties keep (layer, head) order."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, not {sign!r}")
    if hasattr(values, "detach"):
        values = values.detach().cpu().tolist()  # attribution estimates can carry autograd history
    elif hasattr(values, "tolist"):
        values = values.tolist()
    key = {"pos": lambda v: v, "neg": lambda v: -v, "abs": abs}[sign]
    flat = [HeadScore(layer, head, float(v)) for layer, row in enumerate(values) for head, v in enumerate(row)]
    flat = [s for s in flat if s.value == s.value]  # NaN (an undefined effect) ranks nowhere
    ranked = sorted(flat, key=lambda s: -key(s.value))
    return ranked if k is None else ranked[:k]


def heads_above(values, threshold: float) -> list[HeadScore]:
    """Heads whose value is at least ``threshold``, highest first (e.g. induction scores >= the induction threshold)."""
    return [s for s in rank_heads(values, None, "pos") if s.value >= threshold]
