"""Circuits as data, and knocking out everything outside them (IOI paper §4).

A circuit is a set of heads grouped by role, each kept at some named positions (or all). Knocking out
replaces the output z of every head *outside* the circuit — and of circuit heads at positions where they
are not kept — by a reference value: its mean over reference prompts at that position (default; the
corrupted prompts, as the IOI paper's ABC distribution), zero, or its value on the corresponding corrupted
prompt (resample). Many circuits are evaluated as one batch: one boolean keep-mask per circuit.

Faithfulness has two normalisations (``NORMALISATIONS``), named wherever a number is shown:

* ``ratio``: logit diff with the circuit only / logit diff of the full model (IOI paper: F(C) / F(M)); the natural
  zero is a logit difference of 0. Used with mean or zero ablation.
* ``gap``: (LD(C) - LD(corrupted run)) / (LD(M) - LD(corrupted run)), as every patching number here and as
  ``circuit_discovery`` and MIB: with everything outside the circuit patched from the corrupted prompts (``resample``
  over the corrupted prompts), the empty circuit is the corrupted run, 0. A head-level circuit knocked out this way is
  exactly ``circuit_discovery``'s closure of those heads (every edge among them, the MLPs, input and logits; heads
  outside send their corrupted output to every reader), so the two templates give the same number (tested).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.chunks import variants_per_chunk
from helpers.engine.forward import run_interventions
from helpers.engine.hooks import resolve_hook_names
from helpers.engine.interventions import Intervention, hooks_for
from helpers.engine.metrics import check_normalisation, faithfulness, group_mean, logit_diff
from helpers.engine.shortcuts import start_exact
from helpers.schema.heads import Head
from helpers.schema.results import SmallestResult

# Where a head of each role is kept (IOI paper's circuit): named positions, or None for every position.
ROLE_POSITIONS: dict[str, list[str] | None] = {
    "mover": ["end"],
    "negative mover": ["end"],
    "inhibition-like": ["end"],
    "induction": ["S2"],
    "duplicate-token": ["S2"],
    "previous-token": ["S1+1"],
    "unclassified": None,
}
ABLATIONS = ("mean", "zero", "resample")
NORMALISATIONS = ("ratio", "gap")
NORMALISATION_TEXT = {
    "ratio": "F(C) / F(M): the circuit's logit diff over the full model's",
    "gap": "(LD(C) - LD(corrupted)) / (LD(M) - LD(corrupted)): the share of the clean - corrupted gap, as circuit_discovery",
}


def normalisation_for(ablation: str, reference: str) -> str:
    """Patching from the corrupted prompts has the corrupted run as its natural zero ("gap"); mean and zero ablation,
    or resampling clean prompts, the IOI paper's ratio F(C) / F(M)."""
    return "gap" if ablation == "resample" and reference == "corrupted" else "ratio"


@dataclass
class Circuit:
    """Heads grouped by role; ``positions[label]`` = named positions where the head is kept (None: all)."""

    groups: dict[str, list[str]]
    positions: dict[str, list[str] | None] = field(default_factory=dict)

    @property
    def heads(self) -> list[str]:
        return [h for hs in self.groups.values() for h in hs]

    def without(self, removed: list[str]) -> Circuit:
        """The circuit minus the heads ``removed``."""
        gone = set(removed)
        return Circuit(
            {g: [h for h in hs if h not in gone] for g, hs in self.groups.items()},
            {h: p for h, p in self.positions.items() if h not in gone},
        )

    def to_json(self) -> dict:
        return {"groups": self.groups, "positions": self.positions}

    @classmethod
    def from_json(cls, data: dict) -> Circuit:
        return cls({g: list(hs) for g, hs in data["groups"].items()}, dict(data.get("positions", {})))


def circuit_from_roles(role_rows: list[dict], available_positions: dict[str, int]) -> Circuit:
    """Group the ``head_functions`` role table by role; keep each head where its role acts (if the task names
    that position, else everywhere)."""
    groups: dict[str, list[str]] = {}
    positions: dict[str, list[str] | None] = {}
    for row in role_rows:
        groups.setdefault(row["role"], []).append(row["head"])
        wanted = ROLE_POSITIONS.get(row["role"])
        positions[row["head"]] = wanted if wanted and all(p in available_positions for p in wanted) else None
    return Circuit(groups, positions)


@dataclass
class CircuitChoice:
    """The default circuit, from one of two sources.

    * ``discovery``: the core heads ``circuit_discovery`` found (the fewest heads whose edges, all others patched
      from the corrupted run, reach its target faithfulness), grouped by their ``head_functions`` roles, kept at
      every position; ``left_out`` lists the heads with a role that discovery did not keep.
    * ``roles``: every head ``head_functions`` gave a role, plus the unclassified heads whose output patching effect
      (the share of the clean−corrupted logit difference restored by patching that head's output alone, from
      ``circuit_expms``) is at least ``min_patch_effect`` in size; if no head passes, the one with the largest effect.
      ``left_out``: the unclassified heads below the threshold.
    """

    circuit: Circuit
    left_out: dict[str, float]  # label -> its output patching effect
    min_patch_effect: float
    source: str = "roles"
    discovery: dict | None = None  # circuit_discovery's core: heads, faithfulness, target

    def message(self) -> str:
        dropped = ", ".join(f"{h} ({v:+.2f})" for h, v in self.left_out.items())
        if self.source == "discovery":
            d = self.discovery or {}
            kept = (
                f"{len(self.circuit.heads)} heads: the fewest heads circuit_discovery found whose edges reach faithfulness "
                f"{d.get('target')} ({d.get('core_faithfulness', float('nan')):.3f}, everything else patched from the corrupted run), "
                "grouped by head_functions' roles"
            )
            return f"{kept}; heads with a role left out: {dropped}" if dropped else kept
        kept = f"{len(self.circuit.heads)} heads: every head with a role, and unclassified heads with |output patching| ≥ {self.min_patch_effect:g}"
        return f"{kept}; left out (unclassified, patching below the threshold): {dropped}" if dropped else kept

    def to_json(self) -> dict:
        return {
            "circuit": self.circuit.to_json(),
            "left_out": self.left_out,
            "min_patch_effect": self.min_patch_effect,
            "source": self.source,
            "discovery": self.discovery,
        }


def default_circuit(
    role_rows: list[dict],
    available_positions: dict[str, int],
    min_patch_effect: float = 0.1,
    discovered: SmallestResult | None = None,
) -> CircuitChoice:
    """The circuit ``minimal_circuit`` tests when none is given (see ``CircuitChoice``): from ``discovered``
    (``circuit_discovery.json``'s ``smallest``) when it has core heads, else from the roles (``role_rows``: the
    records of ``head_functions``' role table)."""
    if discovered and discovered.core_heads:
        core = discovered.core_heads
        by_head = {row["head"]: row for row in role_rows}
        rows = [
            {**by_head.get(h, {"head": h, "patch_head_out": 0.0}), "role": by_head.get(h, {}).get("role", "unclassified")} for h in core
        ]
        groups: dict[str, list[str]] = {}
        for row in rows:
            groups.setdefault(row["role"], []).append(row["head"])
        left_out = {
            row["head"]: float(row["patch_head_out"]) for row in role_rows if row["role"] != "unclassified" and row["head"] not in core
        }
        summary = {"core_heads": core, "core_faithfulness": discovered.core_faithfulness, "target": discovered.target}
        return CircuitChoice(Circuit(groups), left_out, min_patch_effect, "discovery", summary)

    def matters(row: dict) -> bool:
        return row["role"] != "unclassified" or abs(row["patch_head_out"]) >= min_patch_effect

    kept = [row for row in role_rows if matters(row)]
    if not kept and role_rows:  # nothing passes: the strongest head alone (an empty circuit tests nothing)
        kept = [max(role_rows, key=lambda row: abs(row["patch_head_out"]))]
    left_out = {row["head"]: float(row["patch_head_out"]) for row in role_rows if row not in kept}
    return CircuitChoice(circuit_from_roles(kept, available_positions), left_out, min_patch_effect)


def keep_mask(circuit: Circuit, n_layers: int, n_heads: int, named: dict[str, int], n_pos: int) -> Bool[Tensor, "layer pos head"]:
    """True where a head's output is kept (in the circuit, at one of its positions)."""
    mask = torch.zeros(n_layers, n_pos, n_heads, dtype=torch.bool)
    for label in circuit.heads:
        h = Head.parse(label, n_layers, n_heads)
        where = circuit.positions.get(label)
        if where is None:
            mask[h.layer, :, h.head] = True
        else:
            unknown = [p for p in where if p not in named]
            if unknown:
                raise ValueError(
                    f"circuit head {label}: position(s) {unknown} are not named by this task, or differ between its "
                    f"templates (usable: {sorted(named)}); keep such a head at all positions"
                )
            mask[h.layer, [named[p] for p in where], h.head] = True
    return mask


def reference_z(
    model, tokens: Int[Tensor, "batch pos"], ablation: str, groups: Int[Tensor, " batch"] | None = None
) -> Float[Tensor, "layer batch pos head d_head"]:
    """Replacement values of every head's z for ``ablation``: the per-position mean over ``tokens`` (within each of
    ``groups``, e.g. the prompts' sentence templates: ``metrics.group_mean``) or zero (batch axis of size 1 when
    it is the same for every prompt), or the per-prompt values (resample: prompt i takes reference prompt i)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, not {ablation!r}")
    names = resolve_hook_names(model, [get_act_name("z", l) for l in range(model.cfg.n_layers)])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    z = cache.stack_activation("z")  # [layer, batch, pos, head, d_head]
    if ablation == "mean":
        return group_mean(z.transpose(0, 1), groups).transpose(0, 1)  # broadcasts over the evaluated prompts
    return torch.zeros_like(z[:, :1]) if ablation == "zero" else z


ABLATION_SOURCES = {"mean": "mean", "zero": "zero", "resample": "corrupted"}  # ablation -> intervention source


def knockout_interventions(keep: Bool[Tensor, "variant layer pos head"], ablation: str) -> list[Intervention]:
    """One intervention per layer: head outputs outside each variant's keep-mask take the ``ablation`` source."""
    return [Intervention(get_act_name("z", l), ABLATION_SOURCES[ablation], ~keep[:, l, :, :, None]) for l in range(keep.shape[1])]


def knockout_logit_diffs(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    keep: Bool[Tensor, "variant layer pos head"],
    replacement: Float[Tensor, "layer batch pos head d_head"],
    ablation: str = "mean",
    memory_mb: float = 1024,
) -> Float[Tensor, " variant"]:
    """Mean logit diff of ``tokens`` with every head output outside each keep-mask replaced; variants batched to ``memory_mb``.

    Exact saving: the layers before the first one where the variants' masks differ are run once (their
    knockout is the same in every variant) and the variants start from that run's residual stream.
    """
    values = {ABLATION_SOURCES[ablation]: {get_act_name("z", l): replacement[l] for l in range(replacement.shape[0])}}
    chunk = variants_per_chunk(model, *tokens.shape, memory_mb)
    out = []
    for part in keep.split(chunk):
        first = first_differing_layer(part)
        if first == part.shape[1]:  # every variant is the same circuit: one run
            out.append(
                run_interventions(model, tokens, answers, knockout_interventions(part[:1], ablation), values, 1)[0]
                .mean(-1)
                .cpu()
                .expand(part.shape[0])
            )
            continue
        base = None
        if first > 0 and not start_exact(model, first):
            first = 0  # the bridge's start from a block is not exact on this model: every variant runs from the tokens
        if first > 0:  # the shared layers once, stopping where the variants part (nothing after it is computed)
            with torch.no_grad(), model.hooks(fwd_hooks=hooks_for(knockout_interventions(part[:1, :first], ablation), values, 1)):
                base = {get_act_name("resid_pre", first): model(tokens, stop_at_layer=first)}
        later = knockout_interventions(part, ablation)[first:]
        out.append(run_interventions(model, tokens, answers, later, values, part.shape[0], base_cache=base)[0].mean(-1).cpu())
    return torch.cat(out)


def first_differing_layer(keep: Bool[Tensor, "variant layer pos head"]) -> int:
    """The first layer at which the variants' keep-masks are not all equal (``n_layers`` if they never differ)."""
    differs = (keep != keep[:1]).flatten(2).any(-1).any(0)  # [layer]
    return int(differs.float().argmax()) if bool(differs.any()) else keep.shape[1]


@dataclass(frozen=True)
class ControlDesign:
    """How a circuit's random controls are drawn. ``layer``: as many random heads per layer as the circuit has (the
    stricter null: it asks whether *these* heads of these layers matter); ``size``: as many heads, from any layers.
    Never the circuit's own head set. Layer-matched is the default; it is replaced by size-matched when the circuit's
    layers hold fewer other head sets than controls are drawn (e.g. a circuit with every head of a layer on a model
    with 4 heads per layer): drawing from a handful of sets, most of them one head away from the circuit, cannot
    separate the circuit from chance (its exact p-value is at least 1 / (sets + 1)), whatever the circuit's worth."""

    matched: str  # "layer" or "size"
    alternatives: int  # distinct head sets of this design other than the circuit's own
    reason: str

    def describe(self) -> str:
        return {"layer": "the same number of heads per layer", "size": "the same number of heads, any layers"}[self.matched]


def control_design(circuit: Circuit, n_layers: int, n_heads: int, n: int) -> ControlDesign:
    """The ``ControlDesign`` for ``n`` random controls of ``circuit`` (see its docstring)."""
    per_layer: dict[int, int] = {}
    for label in circuit.heads:
        layer = Head.parse(label, n_layers, n_heads).layer
        per_layer[layer] = per_layer.get(layer, 0) + 1
    layer_sets = math.prod(math.comb(n_heads, k) for k in per_layer.values()) - 1
    if layer_sets >= n:
        return ControlDesign("layer", layer_sets, f"{layer_sets:,} other head sets with as many heads per layer")
    size_sets = math.comb(n_layers * n_heads, len(circuit.heads)) - 1
    return ControlDesign(
        "size",
        size_sets,
        f"the circuit's layers hold only {layer_sets:,} other head sets with as many heads per layer, fewer than the {n} "
        f"controls: random circuits of {len(circuit.heads)} heads from any layers instead ({size_sets:,} sets)",
    )


def random_circuits(circuit: Circuit, n_layers: int, n_heads: int, n: int, seed: int) -> list[Circuit]:
    """``n`` control circuits drawn as ``control_design`` says (never the circuit's own head set, unless no other set
    of its size exists), each head kept at the positions of the circuit head it stands in for."""
    design = control_design(circuit, n_layers, n_heads, n)
    rng = random.Random(seed)
    labels = list(circuit.heads)
    parsed = [Head.parse(label, n_layers, n_heads) for label in labels]
    own = {(h.layer, h.head) for h in parsed}
    layers = list(dict.fromkeys(h.layer for h in parsed))  # in the circuit's order
    order = [i for layer in layers for i, h in enumerate(parsed) if h.layer == layer]  # its heads, layer by layer
    controls = []
    for _ in range(n):
        while True:
            if design.matched == "layer":  # each circuit head stood in for by a random head of its layer
                picks: list[tuple[int, int]] = []
                for layer in layers:
                    picks += [(layer, h) for h in rng.sample(range(n_heads), sum(h.layer == layer for h in parsed))]
            else:
                picks = [divmod(i, n_heads) for i in rng.sample(range(n_layers * n_heads), len(parsed))]
            if set(picks) != own or design.alternatives == 0:
                break
        groups, positions = {"random": []}, {}
        for i, (layer, head) in zip(order if design.matched == "layer" else range(len(parsed)), picks):
            new = Head(layer, head).label
            groups["random"].append(new)
            positions[new] = circuit.positions.get(labels[i])
        controls.append(Circuit(groups, positions))
    return controls


@dataclass
class Evaluator:
    """Evaluates circuits on fixed prompts against a fixed reference: faithfulness of each, as one batch.

    Each distinct keep-mask is run once: values are remembered, so the overlapping circuits of a greedy search
    (minimality) or of repeated calls cost nothing the second time.
    """

    model: object
    tokens: Int[Tensor, "batch pos"]
    answers: Int[Tensor, "batch 2"]
    named: dict[str, int]
    replacement: Tensor
    full_logit_diff: float
    ablation: str = "mean"
    memory_mb: float = 1024
    baseline: float = 0.0  # the logit diff that counts as faithfulness 0: 0 (ratio) or the corrupted run's (gap)
    _known: dict[bytes, float] = field(default_factory=dict, repr=False)

    def keep(self, circuits: list[Circuit]) -> Bool[Tensor, "variant layer pos head"]:
        cfg = self.model.cfg
        return torch.stack([keep_mask(c, cfg.n_layers, cfg.n_heads, self.named, self.tokens.shape[1]) for c in circuits])

    def logit_diffs(self, circuits: list[Circuit]) -> Float[Tensor, " variant"]:
        """Mean logit diff with only each circuit kept (distinct keep-masks run once, in one batch)."""
        if not circuits:
            return torch.zeros(0)
        keep = self.keep(circuits)
        keys = [k.numpy().tobytes() for k in keep]
        new = {key: i for i, key in enumerate(keys) if key not in self._known}
        if new:
            fresh = knockout_logit_diffs(
                self.model, self.tokens, self.answers, keep[list(new.values())], self.replacement, self.ablation, self.memory_mb
            )
            self._known.update(zip(new, fresh.tolist()))
        return torch.tensor([self._known[key] for key in keys])

    def faithfulness(self, circuits: list[Circuit]) -> Float[Tensor, " variant"]:
        """Each circuit's logit diff with everything else knocked out, normalised: (LD(C) - baseline) / (LD(M) - baseline),
        F(C) / F(M) with the ratio normalisation (baseline 0), the share of the clean - corrupted gap with ``gap``."""
        return faithfulness(self.logit_diffs(circuits), self.full_logit_diff, self.baseline)

    @property
    def normalisation(self) -> str:
        return "ratio" if self.baseline == 0.0 else "gap"

    def remove_from_full_model(self, removed: list[list[str]]) -> Float[Tensor, " variant"]:
        """F(M \\ K) / F(M) for each set K: only the heads of K are knocked out (at every position)."""
        everything = Circuit({"all": [h.label for h in Head.all(self.model.cfg.n_layers, self.model.cfg.n_heads)]})
        return self.faithfulness([everything.without(k) for k in removed])


def make_evaluator(
    model,
    tokens,
    answers,
    named: dict[str, int],
    reference_tokens,
    ablation: str = "mean",
    groups: Int[Tensor, " batch"] | None = None,
    normalisation: str = "ratio",
) -> Evaluator:
    """An ``Evaluator`` whose knocked-out heads take their ``ablation`` value on ``reference_tokens`` (a mean within
    each of ``groups``, the prompts' templates); ``normalisation`` (module docstring): "ratio" or "gap" (the baseline is
    the run on ``reference_tokens``)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
    with torch.no_grad():
        full = logit_diff(model(tokens), answers).mean().item()
        baseline = logit_diff(model(reference_tokens), answers).mean().item() if normalisation == "gap" else 0.0
    check_normalisation(full, baseline)  # faithfulness divides by LD(M) - baseline: warn if it is near zero
    return Evaluator(
        model, tokens, answers, named, reference_z(model, reference_tokens, ablation, groups), full, ablation, baseline=baseline
    )


def minimality(ev: Evaluator, circuit: Circuit, max_k: int = 3) -> dict[str, dict]:
    """Per head v: max over a greedy K ⊆ (v's group \\ {v}) of |F(C \\ (K ∪ {v})) - F(C \\ K)| (IOI paper §4.2).

    K grows greedily (up to ``max_k`` heads), each step adding the head that makes v's removal matter most.
    Each step is one batch for every v at once; circuits met before (e.g. C \\ {a, b} from v = a and v = b) are
    not run again.
    """
    full = float(ev.faithfulness([circuit])[0])
    alone = dict(zip(circuit.heads, ev.faithfulness([circuit.without([v]) for v in circuit.heads]).tolist()))
    group_of = {v: g for g, members in circuit.groups.items() for v in members}
    best = {v: {"score": abs(alone[v] - full), "K": []} for v in group_of}
    k: dict[str, list[str]] = {v: [] for v in group_of}
    for _ in range(max_k):
        options = {v: [h for h in circuit.groups[group_of[v]] if h != v and h not in k[v]] for v in group_of}
        options = {v: hs for v, hs in options.items() if hs}
        if not options:
            break
        asked = [(v, h) for v, hs in options.items() for h in hs]
        with_v = ev.faithfulness([circuit.without(k[v] + [h, v]) for v, h in asked])
        without_v = ev.faithfulness([circuit.without(k[v] + [h]) for v, h in asked])
        scores = (with_v - without_v).abs()
        start = 0
        for v, hs in options.items():
            i = int(scores[start : start + len(hs)].argmax())
            k[v] = k[v] + [hs[i]]
            if float(scores[start + i]) > best[v]["score"]:
                best[v] = {"score": float(scores[start + i]), "K": list(k[v])}
            start += len(hs)
    return {v: {"group": group_of[v], **best[v]} for g, members in circuit.groups.items() for v in members}


def completeness(ev: Evaluator, circuit: Circuit, n_subsets: int, seed: int) -> list[dict]:
    """For random subsets K of the circuit: F(C \\ K) and F(M \\ K); a complete circuit has them equal."""
    rng = random.Random(seed)
    heads = circuit.heads
    subsets = [rng.sample(heads, rng.randint(1, len(heads))) for _ in range(n_subsets)] if heads else []
    if not subsets:
        return []
    in_circuit = ev.faithfulness([circuit.without(k) for k in subsets])
    in_model = ev.remove_from_full_model(subsets)
    return [{"K": k, "circuit": float(a), "model": float(b)} for k, a, b in zip(subsets, in_circuit, in_model)]


def circuit_heads(circuit: Circuit, n_layers: int, n_heads: int) -> dict[str, Head]:
    """``{label: Head}`` of the circuit's heads (checked against the model's shape)."""
    return {label: Head.parse(label, n_layers, n_heads) for label in circuit.heads}


def circuit_edges(heads: dict[str, Head], to_logits: Tensor, effects: dict[tuple[str, str], Tensor]) -> list[dict]:
    """Diagram edges ``{source, target, weight, via}``: each head's path effect on the logits, and on every later
    head (the strongest of its q, k or v input; ``effects`` from ``path_patching.receiver_effects``)."""
    edges = [{"source": label, "target": "logits", "weight": float(to_logits[h.index]), "via": "resid"} for label, h in heads.items()]
    for r_label, r in heads.items():
        for s_label, s in ((label, h) for label, h in heads.items() if h.layer < r.layer):
            via, value = max(((c, float(effects[(r_label, c)][s.index])) for c in ("q", "k", "v")), key=lambda cv: abs(cv[1]))
            edges.append({"source": s_label, "target": r_label, "weight": value, "via": via})
    return edges


def circuit_nodes(circuit: Circuit, n_layers: int, n_heads: int) -> list[dict]:
    """Diagram nodes: each head at (the positions where it is kept, its layer), coloured by group; the logits on top."""
    nodes = []
    for group, labels in circuit.groups.items():
        for label in labels:
            where = circuit.positions.get(label)
            nodes.append(
                {
                    "label": label,
                    "layer": Head.parse(label, n_layers, n_heads).layer,
                    "x": "all positions" if where is None else "+".join(where),
                    "role": group,
                }
            )
    nodes.append({"label": "logits", "layer": n_layers, "x": "end", "role": "logits"})
    return nodes


@dataclass(frozen=True)
class ControlComparison:
    """Is the circuit more faithful than random circuits of its shape?

    Closeness to the full model is ``|1 - F|``; ``p_value`` is the share of random controls at least as close
    as the circuit, counting the circuit itself ((1 + #closer-or-equal) / (1 + n)), so 20 controls can at best
    give 1/21 = 0.048. The circuit ``beats_random`` when ``p_value <= alpha``.
    """

    circuit: float
    random_mean: float
    random_std: float
    random_max: float
    n_random: int
    p_value: float
    alpha: float = 0.05
    design: ControlDesign | None = None  # how the controls were drawn (None: not recorded)

    @property
    def beats_random(self) -> bool:
        return self.p_value <= self.alpha

    def message(self) -> str:
        shape = "of its shape" if self.design is None else f"with {self.design.describe()}"
        head = (
            f"The circuit (faithfulness {self.circuit:.3f}) is closer to the full model than random circuits {shape} "
            f"(mean {self.random_mean:.3f} ± {self.random_std:.3f}, max {self.random_max:.3f}; p = {self.p_value:.3f})"
        )
        why = f" Controls: {self.design.reason}." if self.design is not None and self.design.matched != "layer" else ""
        if self.beats_random:
            return head + "." + why
        return (
            f"The circuit is NOT better than random circuits {shape}: faithfulness {self.circuit:.3f} against "
            f"{self.random_mean:.3f} ± {self.random_std:.3f} (max {self.random_max:.3f}) for {self.n_random} random "
            f"circuits; p = {self.p_value:.3f} > {self.alpha}. Its faithfulness is no evidence that these heads carry "
            "the behaviour: the circuit is probably too large (most of the model) or built from the wrong heads." + why
        )

    def to_json(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("circuit", "random_mean", "random_std", "random_max", "n_random", "p_value", "alpha")},
            "controls": None if self.design is None else dataclasses.asdict(self.design),
            "beats_random": self.beats_random,
            "message": self.message(),
        }


def compare_with_controls(
    circuit: float, controls: Float[Tensor, " n"], alpha: float = 0.05, design: ControlDesign | None = None
) -> ControlComparison:
    """The ControlComparison of a circuit's faithfulness against random controls' (drawn as ``design``; see its
    docstring)."""
    controls = torch.as_tensor(controls, dtype=torch.float64)
    closer = int(((1 - controls).abs() <= abs(1 - circuit)).sum())
    std = float(controls.std()) if len(controls) > 1 else 0.0
    return ControlComparison(
        float(circuit), float(controls.mean()), std, float(controls.max()), len(controls), (1 + closer) / (1 + len(controls)), alpha, design
    )
