"""Edge scoring methods as registered values: one signature, one kind of result.

Every method maps an edge context (``edges.EdgeContext``: the graph, the clean and corrupted runs) and the options
to a ``[sender, receiver]`` tensor: each edge's effect on the logit difference, gap-normalised (the share of the
clean - corrupted gap the edge carries; ``engine.metrics.normalised``), 0 where the graph has no edge. The curve
code (``analyses.discovery.faithfulness_curves``, ``smallest_circuit``) ranks any of them alike, and a template's
``methods`` list names them.

=========  =====================================================================  ==================================
method     score of an edge                                                       cost
=========  =====================================================================  ==================================
eap        gradient at the clean run × (clean - corrupted sender output)           one forward and backward
eap-ig     the same with the gradient averaged over ``ig_steps`` points from the   ``ig_steps`` forwards and backwards
           corrupted to the clean embeddings (integrated gradients)
exact      1 - faithfulness of the full graph without that edge: what the two      one circuit evaluation per edge
           above estimate, measured (``single_edge_effects``)                      (batched)
acdc       the rise in distance to the full model, |1 - faithfulness|, that        one evaluation per edge, in
           removing it caused when ACDC's greedy pass visited it (edges cut off    sequence: small models
           before their turn: 0; ``acdc``, at ``acdc_threshold``)
=========  =====================================================================  ==================================

A new method is one ``register(Scorer(...))`` call; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.std import tqdm  # noqa: I001 - text bars, as in patching

from helpers.methods.attribution_patching import DEFAULT_GRADIENT_MEMORY_MB
from helpers.methods.edges import EdgeCircuit, EdgeContext, circuit_of, edge_scores, evaluate_masks, prune


@dataclass(frozen=True)
class ScoringOptions:
    """What a scoring method may read besides the edge context; each method reads its own fields."""

    ig_steps: int = 5  # eap-ig: points from the corrupted to the clean embeddings
    gradient_memory_mb: float = DEFAULT_GRADIENT_MEMORY_MB  # eap, eap-ig: activations one forward with gradients may hold
    memory_mb: float = 1024  # exact, acdc: memory for one batched circuit evaluation
    acdc_threshold: float = 0.01  # acdc: an edge goes when removing it moves |1 - faithfulness| up by less
    progress: bool = True


@dataclass(frozen=True)
class Scorer:
    """A registered edge scoring method: ``score(ectx, options)`` -> ``[sender, receiver]`` gap-normalised effects."""

    name: str
    score: Callable[[EdgeContext, ScoringOptions], Float[Tensor, "sender receiver"]]
    exact: bool  # measured by circuit evaluations (True) or estimated from gradients (False)
    about: str  # one line: what the score is and what it costs


SCORERS: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
    """Add ``scorer`` under its name (a name is registered once)."""
    if scorer.name in SCORERS:
        raise ValueError(f"an edge scoring method named {scorer.name!r} is already registered")
    SCORERS[scorer.name] = scorer
    return scorer


def score_edges(ectx: EdgeContext, method: str, options: ScoringOptions | None = None) -> Float[Tensor, "sender receiver"]:
    """Every edge's score by the registered ``method`` (``SCORERS``)."""
    if method not in SCORERS:
        raise ValueError(f"unknown edge scoring method {method!r}; registered: {list(SCORERS)}")
    return SCORERS[method].score(ectx, options or ScoringOptions())


EDGES_PER_STEP = 64
"""Edges ``single_edge_effects`` hands to ``evaluate_masks`` at a time. Not a memory chunk (``evaluate_masks`` cuts
its circuits into forwards with ``engine.chunks.plan_chunks``), but the set it orders by first changed block before
cutting, and what the progress bar counts: the masks it holds are 64 x senders x receivers booleans (20 MB on
SmolLM2). Changing it regroups the forwards, which moves exact effects by float rounding (1e-7) and so the rank
agreement of near-tied edges."""


def single_edge_effects(
    ectx: EdgeContext, memory_mb: float = 1024, progress: bool = True, edges: Int[Tensor, "edge 2"] | None = None
) -> Float[Tensor, "sender receiver"]:
    """Exact effect of each edge alone, as EAP estimates it: 1 - faithfulness of the full graph minus that edge
    (the share of the clean - corrupted gap lost when only this edge is corrupted). One batched evaluation per
    chunk of edges; 0 where no edge exists. ``edges`` ([n, 2] sender, receiver indices, e.g. ``check_sample``):
    only those (NaN elsewhere), for graphs too large to patch every edge."""
    graph = ectx.graph
    index = graph.edge_index if edges is None else edges
    out = torch.zeros(graph.allowed.shape) if edges is None else torch.full(graph.allowed.shape, float("nan"))
    for start in tqdm(range(0, len(index), EDGES_PER_STEP), desc="single edges", disable=not progress):
        part = index[start : start + EDGES_PER_STEP]
        masks = graph.allowed.repeat(len(part), 1, 1)
        masks[torch.arange(len(part)), part[:, 0], part[:, 1]] = False
        out[part[:, 0], part[:, 1]] = 1 - evaluate_masks(ectx, masks, memory_mb)
    return out


def acdc_pass(
    ectx: EdgeContext, threshold: float, memory_mb: float = 1024, progress: bool = True
) -> tuple[EdgeCircuit, Float[Tensor, "sender receiver"]]:
    """ACDC's greedy exact pass (Conmy et al. 2023), with faithfulness as its metric: starting from the full graph,
    visit receivers from the logits backwards and each receiver's senders from the latest; remove an edge for good
    when removing it moves the circuit's distance to the full model, |1 - faithfulness|, up by less than
    ``threshold``. One exact evaluation per edge still reachable, in sequence: for small models.

    Returns the circuit and each edge's measured effect: the rise in distance its removal caused when it was
    visited (0 for edges never visited: cut off from the input or the logits before their turn)."""
    graph = ectx.graph
    mask = graph.allowed.clone()
    effects = torch.zeros(graph.allowed.shape)
    distance = 0.0  # the full graph is the clean run
    live = prune(graph, mask)
    with tqdm(total=int(live.sum()), desc=f"ACDC tau={threshold:g}", disable=not progress) as bar:
        for r in reversed(range(len(graph.receivers))):
            for s in reversed(mask[:, r].nonzero().flatten().tolist()):
                if not live[s, r]:  # already cut off from the input or the logits: nothing to decide
                    continue
                trial = mask.clone()
                trial[s, r] = False
                f = float(evaluate_masks(ectx, trial[None], memory_mb)[0])
                bar.update(1)
                effects[s, r] = abs(1 - f) - distance
                if abs(1 - f) - distance < threshold:
                    mask, distance = trial, abs(1 - f)
                    live = prune(graph, mask)
    circuit = circuit_of(graph, live, None, f"acdc (tau={threshold:g})")
    circuit.faithfulness = float(evaluate_masks(ectx, live[None], memory_mb)[0]) if live.any() else 0.0
    return circuit, effects


def acdc(ectx: EdgeContext, threshold: float, memory_mb: float = 1024, progress: bool = True) -> EdgeCircuit:
    """The circuit of ACDC's greedy pass at ``threshold`` (``acdc_pass``), its exact faithfulness stored on it."""
    return acdc_pass(ectx, threshold, memory_mb, progress)[0]


def _eap(ectx: EdgeContext, options: ScoringOptions) -> Float[Tensor, "sender receiver"]:
    return edge_scores(ectx, "eap", options.ig_steps, options.gradient_memory_mb)


def _eap_ig(ectx: EdgeContext, options: ScoringOptions) -> Float[Tensor, "sender receiver"]:
    return edge_scores(ectx, "eap-ig", options.ig_steps, options.gradient_memory_mb)


def _exact(ectx: EdgeContext, options: ScoringOptions) -> Float[Tensor, "sender receiver"]:
    return single_edge_effects(ectx, options.memory_mb, options.progress)


def _acdc(ectx: EdgeContext, options: ScoringOptions) -> Float[Tensor, "sender receiver"]:
    return acdc_pass(ectx, options.acdc_threshold, options.memory_mb, options.progress)[1]


register(Scorer("eap", _eap, False, "gradient at the clean run times the sender's clean - corrupted output: one forward and backward"))
register(
    Scorer("eap-ig", _eap_ig, False, "integrated gradients from the corrupted to the clean embeddings: ig_steps forwards and backwards")
)
register(Scorer("exact", _exact, True, "1 - faithfulness of the graph without the edge: one batched circuit evaluation per edge"))
register(
    Scorer(
        "acdc", _acdc, True, "the rise in |1 - faithfulness| its removal caused in ACDC's greedy pass: one evaluation per edge, in sequence"
    )
)
