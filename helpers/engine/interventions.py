"""Interventions as values: what activation is set, where, from which source, and the hooks that do it.

An ``Intervention`` says *what* activation is set (a hook name), *where* (a boolean mask over the
activation's non-batch axes, one row per variant), and *from which source*: the clean or corrupted run, a
mean, zero, or activations recorded in an earlier run. Every experiment in this package (activation and
path patching, knockout of everything outside a circuit, attention shift, backup-head ablation) is a list of
these values, so what was patched can be printed and stored with the results (``to_json``). ``hooks_for``
turns a list into forward hooks over many variants at once; ``engine.forward.run_interventions`` runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

SOURCES = ("source", "base", "clean", "corrupted", "mean", "zero", "recorded")


@dataclass(eq=False)
class Intervention:
    """Set activation ``hook`` to ``source`` values where ``mask`` is True.

    ``mask``: [variant, *activation axes without batch] (axes of size 1 broadcast), True where variant i takes
    the source value; ``None`` = everywhere, in every variant. ``source`` is one of ``SOURCES``; its values
    for ``hook`` come from the ``sources`` mapping given to the runner: [1, ...] (a mean or zero, the same for
    every prompt), [batch, ...] (per prompt) or [variant * batch, ...] (recorded per variant).
    """

    hook: str
    source: str
    mask: Bool[Tensor, "variant ..."] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"intervention source must be one of {SOURCES}, not {self.source!r}")

    @property
    def layer(self) -> int | None:
        """The block the hooked activation belongs to (None for embeddings)."""
        parts = self.hook.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    @property
    def n_variants(self) -> int | None:
        return None if self.mask is None else self.mask.shape[0]

    def __repr__(self) -> str:
        where = "everywhere" if self.mask is None else f"{self.mask.shape[0]} variants x {list(self.mask.shape[1:])} mask"
        return f"Intervention({self.hook} <- {self.source}, {where})"

    def to_json(self) -> dict:
        """What was patched, for result files: hook, source, and per variant the number of entries set."""
        out: dict = {"hook": self.hook, "source": self.source}
        if self.mask is not None:
            out["mask_shape"] = list(self.mask.shape)
            out["entries_set_per_variant"] = self.mask.flatten(1).sum(1).tolist()
        return out

    def first_position(self, n_pos: int, changes: Bool[Tensor, "*axes"] | None = None) -> int:
        """The earliest position this intervention changes in any variant (``n_pos`` if none): nothing it does can
        change an activation at an earlier position. ``changes`` (activation axes without batch): where its source
        differs from the activation it replaces in some prompt; setting an entry to the value it already has changes
        nothing. Without it, every entry the mask selects counts as changed."""
        sets = torch.ones(1, dtype=torch.bool) if self.mask is None else self.mask
        if changes is not None:
            sets = sets & changes[None].to(sets.device)
        axis = position_axis(self.hook)
        if sets.dim() <= axis or sets.shape[axis] == 1:  # broadcast over positions: every position
            return 0 if bool(sets.any()) else n_pos
        hit = sets.movedim(axis, 0).flatten(1).any(1).nonzero()
        return int(hit[0]) if len(hit) else n_pos

    def from_position(self, start: int) -> Intervention:
        """This intervention on a run that computes positions ``>= start`` only (its mask cut to those positions)."""
        if start == 0 or self.mask is None:
            return self
        return Intervention(self.hook, self.source, from_position(self.mask, self.hook, start))

    def apply(self, act: Tensor, value: Tensor, n_var: int) -> Tensor:
        """``act`` ([n_var * batch, ...], variant-major) with this intervention's entries taken from ``value``."""
        batch = act.shape[0] // n_var
        act = act.reshape(n_var, batch, *act.shape[1:])
        value = value.to(act.dtype)
        value = value.reshape(n_var, batch, *value.shape[1:]) if value.shape[0] == n_var * batch and n_var > 1 else value[None]
        if self.mask is None:
            out = value.expand_as(act)
        else:
            mask = self.mask.to(act.device)
            mask = mask.reshape(mask.shape[0], 1, *mask.shape[1:])
            out = torch.where(mask, value, act)
        return out.reshape(n_var * batch, *act.shape[2:])


def position_axis(hook: str) -> int:
    """The axis of ``hook``'s activation (batch first) indexed by the position it is computed at: the destination
    (query) axis of attention patterns and scores ``[batch, head, dest, src]``, axis 1 of everything else."""
    return 2 if hook.endswith(("hook_pattern", "hook_attn_scores")) else 1


def from_position(values: Tensor, hook: str, start: int) -> Tensor:
    """``values`` of activation ``hook`` (or a mask over it, variant-first) at positions ``>= start`` only; an axis of
    size 1 broadcasts over positions and is kept."""
    axis = position_axis(hook)
    if start == 0 or values.dim() <= axis or values.shape[axis] == 1:
        return values
    return values.narrow(axis, start, values.shape[axis] - start)


def suffix_start(
    interventions: Sequence[Intervention],
    n_pos: int,
    sources: Mapping[str, Mapping[str, Tensor]] | None = None,
    base_cache: Mapping[str, Tensor] | None = None,
) -> int:
    """The earliest position any of ``interventions`` changes (at most ``n_pos - 1``): positions before it are unchanged.

    With ``sources`` and ``base_cache`` (the unintervened run), an entry set to the value it has in the base run does
    not count: e.g. a head's clean output patched at every position changes nothing before the first corrupted token.
    (Exact: positions before the earliest change keep their base values in every activation, so there each
    intervention sets an entry to the value it already has.)"""
    return min([iv.first_position(n_pos, _changes(iv, sources, base_cache)) for iv in interventions] + [n_pos - 1])


def _changes(iv: Intervention, sources, base_cache) -> Tensor | None:
    """Where ``iv``'s source differs from the base run's activation in some prompt (None where that is not known: the
    hook is not cached, or the source is recorded per variant)."""
    if sources is None or base_cache is None or iv.hook not in base_cache:
        return None
    base = base_cache[iv.hook]
    value = source_value(sources, iv, like=base)
    if value.shape[0] not in (1, base.shape[0]) or value.shape[1:] != base.shape[1:]:
        return None
    return (value != base).any(0)


class _Apply:
    """Forward hook applying one intervention with its resolved value (a small object, not a closure)."""

    def __init__(self, intervention: Intervention, value: Tensor, n_var: int):
        self.intervention, self.value, self.n_var = intervention, value, n_var

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        return self.intervention.apply(act, self.value, self.n_var)


def source_value(sources: Mapping[str, Mapping[str, Tensor]], intervention: Intervention, like: Tensor | None = None) -> Tensor:
    """The tensor ``intervention`` draws from; ``zero`` needs ``like`` (an activation of that hook) for its shape."""
    if intervention.source == "zero":
        if intervention.hook in sources.get("zero", {}):
            return sources["zero"][intervention.hook]
        if like is None:
            like = next(
                (
                    sources[s][intervention.hook]
                    for s in ("base", "source", "corrupted", "clean")
                    if s in sources and intervention.hook in sources[s]
                ),
                None,
            )
        if like is None:
            raise KeyError(f"zero source for {intervention.hook}: no cached activation of that hook to take the shape from")
        return torch.zeros_like(like[:1])
    try:
        return sources[intervention.source][intervention.hook]
    except KeyError:
        raise KeyError(f"no {intervention.source!r} values for hook {intervention.hook}") from None


def hooks_for(
    interventions: Sequence[Intervention], sources: Mapping[str, Mapping[str, Tensor]], n_var: int, start: int = 0
) -> list[tuple[str, _Apply]]:
    """(hook name, hook) pairs applying ``interventions`` to ``n_var`` variants (for ``model.hooks`` or ``run_with_hooks``);
    ``start``: the run computes positions ``>= start`` only (masks and source values are cut to match)."""
    return [
        (iv.hook, _Apply(iv.from_position(start), from_position(source_value(sources, iv), iv.hook, start), n_var)) for iv in interventions
    ]


def start_layer(interventions: Sequence[Intervention], record: Sequence[str] = ()) -> int | None:
    """The earliest block any intervention or recorded hook touches; None if one acts before the first block."""
    layers = [iv.layer for iv in interventions] + [Intervention(name, "clean").layer for name in record]
    if any(layer is None for layer in layers):
        return None
    return min(layers) if layers else None
