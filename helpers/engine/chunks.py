"""Chunk planning: how many variants, and how many of their prompts, one batched forward takes within a memory budget.

Every batched computation here stacks variants (one copy of the prompts each) along the batch axis and runs as
many at once as ``memory_mb`` allows. One estimate of a row's working memory (``bytes_per_variant``: its
activations through one block, plus the logits its metric reads, ``logits_bytes``) and one rule
(``rows_within``) size them all: the sweeps, the circuit evaluations, head importance and the edge runs. Where
one variant's prompts do not fit, a variant runs in prompt slices (``ChunkPlan.prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor

from helpers.engine.metrics import LOGIT_DIFF, Metric


def rows_within(memory_mb: float, bytes_per_row: int) -> int:
    """How many rows of ``bytes_per_row`` fit in ``memory_mb`` (at least one: a budget too small still runs, a row at a
    time)."""
    return max(1, int(memory_mb * 2**20) // max(1, int(bytes_per_row)))


def logits_bytes(model, metric: Metric, batch: int, n_pos: int) -> int:
    """Float32 bytes of the logits ``metric`` reads for ``batch`` prompts of ``n_pos`` tokens: every position's or the
    final one's, the full vocabulary or (``vocabulary="answers"``) two columns, counted as none."""
    if metric.vocabulary == "answers":
        return 0
    return 4 * batch * (n_pos if metric.positions == "all" else 1) * model.cfg.d_vocab


def bytes_per_variant(model, batch: int, n_pos: int) -> int:
    """Rough float32 working memory of one patch variant: the batch's activations through one block (with the
    temporaries of its norms, rotary embeddings, gated MLP and the patch itself), plus final logits (a metric that
    reads more adds ``logits_bytes``). On SmolLM2-135M's neuron sweep at 64 prompts, counting
    6 x d_model + 2 x d_mlp per token let a 1,024 MB budget take 3.7 GiB; with this count it takes 2.4 GiB: still an
    underestimate there."""
    cfg = model.cfg
    per_token = 20 * cfg.d_model + 6 * (cfg.d_mlp or 4 * cfg.d_model) + 3 * cfg.n_heads * n_pos
    return 4 * batch * (n_pos * per_token + cfg.d_vocab)


def rows_per_chunk(model, n_pos: int, memory_mb: float, recorded_per_row: int = 0) -> int:
    """How many rows (prompts or IG steps x prompts) one forward *with gradients* may hold within ``memory_mb``:
    autograd keeps every layer's activations for the backward, about twice a forward's working memory per layer, and
    each recorded tensor is held three times (the fresh copy, what autograd saves of it, its gradient; for a loss,
    the logits, their softmax and its gradient). The recorded part matters for edge scores, whose per-head q/k/v input
    forks are n_heads copies of the residual stream per layer (on SmolLM2 they tripled the memory the layer estimate
    alone allowed for), and for losses over a large vocabulary."""
    return rows_within(memory_mb, 2 * model.cfg.n_layers * bytes_per_variant(model, 1, n_pos) + 3 * recorded_per_row)


@dataclass(frozen=True)
class ChunkPlan:
    """How a batched computation is cut: ``variants`` per forward, and ``prompts`` of each (all of them unless one
    variant's prompts do not fit, then slices of that many)."""

    variants: int
    prompts: int


def plan_chunks(
    model,
    batch: int,
    n_pos: int,
    memory_mb: float,
    metric: Metric = LOGIT_DIFF,
    max_variants: int | None = None,
    held_per_variant: int = 0,
) -> ChunkPlan:
    """The chunks of variants of ``batch`` prompts x ``n_pos`` positions measured by ``metric`` that one forward takes
    within ``memory_mb``: whole variants while one fits (at most ``max_variants``), else one variant in prompt slices.
    ``held_per_variant``: bytes each variant holds besides its forward (e.g. the edge runs' stored sender outputs),
    which bound the variants on their own."""
    per_prompt = bytes_per_variant(model, 1, n_pos) + logits_bytes(model, metric, 1, n_pos)
    rows = rows_within(memory_mb, per_prompt)
    variants = max(1, rows // batch)
    if held_per_variant:
        variants = min(variants, rows_within(memory_mb, held_per_variant))
    if max_variants:
        variants = min(variants, max_variants)
    return ChunkPlan(variants, min(batch, rows))


def variants_per_chunk(model, batch: int, n_pos: int, memory_mb: float, max_variants: int | None = None) -> int:
    """How many variants, each measured by a logit difference, one batched forward may hold within ``memory_mb`` (or
    ``max_variants`` if smaller): ``plan_chunks(...).variants``."""
    return plan_chunks(model, batch, n_pos, memory_mb, max_variants=max_variants).variants


FORWARD_OVERHEAD = 1.5
"""The fixed cost of one forward through a block, in variants, for ``by_start_layer``: Python and the bridge's
per-block work, which does not grow with the batch (on SmolLM2 a forward of 2 prompts costs a third of one 64-prompt
variant's suffix forward, 0.09 against 0.27 s); set above that, so that a forward is split only for a clear saving."""


def by_start_layer(starts: Int[Tensor, " variant"], n_layers: int, max_variants: int) -> list[Int[Tensor, " chunk"]]:
    """Variants grouped into forwards of at most ``max_variants``, each forward starting at its earliest variant's
    layer (``starts``: where each variant may start), at the least cost: a forward from layer ``l`` of ``n`` variants
    costs ``(n + FORWARD_OVERHEAD) x (n_layers - l)`` block passes. Sorting by start and cutting every
    ``max_variants`` runs late variants from block 0 whenever one of their chunk starts there (SmolLM2's 171 exact
    single-edge checks at 64 prompts: chunks of 27 from blocks 0, 10, 17 and 20, 67 s; cut this way, 38 s). The
    cheapest cut of the sorted order is found exactly (dynamic programming over where each forward begins). Returns
    each forward's variants (indices into ``starts``), in order of start."""
    order = starts.argsort(stable=True)
    layer = starts[order].tolist()
    n = len(layer)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest forwards for the first j variants in start order
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max(1, max_variants)), j):
            cost = best[i] + (j - i + FORWARD_OVERHEAD) * (n_layers - layer[i])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
