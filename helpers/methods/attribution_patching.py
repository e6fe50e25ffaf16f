"""Attribution patching: a first-order estimate of every activation-patching effect from one backward pass.

For an activation ``a`` the patching effect of putting its clean value into the corrupted run is
approximated by the gradient of the metric at the corrupted run, dotted with the change:
``(a_clean - a_corrupted) · ∂metric/∂a`` (Nanda 2023; edge form in Syed et al. 2023, EAP). Summing that
product over the entries a sweep patches together gives an estimate in the same units and layout as the
exact sweep (``patching.SWEEPS``), so the two can be compared cell by cell.

With ``ig_steps > 0`` the gradient is averaged along the straight path from corrupted to clean input
embeddings (integrated gradients, as in EAP-IG, Hanna et al. 2024). At the embeddings this satisfies
completeness: the estimates over all positions of ``resid_pre`` at layer 0 sum to the exact total effect (1.0).

Cost: one clean forward (caching only the hooks needed), one corrupted forward with gradients and one
backward pass taken only with respect to activations (``torch.autograd.grad``; no weight gradients),
for every sweep at once. IG runs its ``ig_steps`` path points as batches within a memory budget, plus one corrupted forward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.engine.chunks import rows_per_chunk
from helpers.engine.hooks import UNEMBED_LAST, HookNameError, recording_hook, resolve_hook_names
from helpers.engine.kv_cache import KVPrefix, run_with_kv
from helpers.engine.memory import release_freed_memory
from helpers.engine.metrics import logit_diff, rank_correlation
from helpers.engine.shortcuts import answer_columns, quiet_cache_rename, verified
from helpers.methods.patching import SWEEPS, Sweep
from helpers.task.prompts import PromptPair, PromptSet, as_pair

EMBED_HOOK = "hook_embed"
SUFFIX_GRADIENTS = True  # ``metric_gradients`` from the caller's start position, with a prefix (tests turn it off)
DEFAULT_GRADIENT_MEMORY_MB = 2048  # saved activations of one forward with gradients


@dataclass
class Attribution:
    """Attribution estimates per sweep (layouts as ``patching.SWEEPS``) and the two logit-diff baselines."""

    values: dict[str, Float[Tensor, "layer ..."]]
    clean_logit_diff: float
    corrupted_logit_diff: float


def metric_gradients(
    model,
    tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"],
    hook_names: list[str],
    embed_path: tuple[Tensor, int] | None = None,
    memory_mb: float = DEFAULT_GRADIENT_MEMORY_MB,
    keep_activations: bool = True,
    consume: Callable[[dict[str, Tensor], Int[Tensor, " prompts"], dict[str, Tensor]], None] | None = None,
    per_row: bool = False,
    prefix: KVPrefix | None = None,
    start: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Float[Tensor, " batch"]]:
    """Forwards of ``tokens`` with gradients and backwards: (d mean logit diff / d activation, activations,
    logit diffs). Attribution patching calls it on the corrupted run; edge attribution on the clean run.

    Gradients are taken only with respect to the hooked activations (no weight gradients). ``embed_path``
    = (clean token embeddings, steps) replaces the token embeddings by ``steps`` points on the straight
    path from corrupted to clean (midpoint rule) and averages the gradients. The steps × batch rows run in
    chunks whose saved activations fit ``memory_mb`` (``rows_per_chunk``), gradients summed per prompt: exact
    (the metric is a sum over rows), with memory bounded whatever the number of prompts and steps (64 prompts
    × 8 steps on SmolLM2-135M in one batch took 17.5 GB).

    Rows are prompt-major (row = prompt × steps + step), so a chunk holds every step of most of its prompts and its
    gradients are summed per prompt before they leave the chunk.

    Memory beyond the chunk: ``keep_activations=False`` returns no activations (callers that only need gradients);
    ``consume(grads, prompts, acts)`` takes each chunk's gradients, summed per prompt over the chunk's rows and divided by
    ``steps``, with those prompts' indices, instead of summing them over all prompts here; the returned gradients are
    then empty. Edge scores use both: on SmolLM2 at 64 prompts the summed gradients and the activations of every
    q/k/v fork were 1.3 GB each. ``per_row``: ``consume`` gets each row's gradients (divided by ``steps``, not summed),
    each row's prompt index, and the rows' activations as a third argument (``{}`` otherwise), for estimates that
    are not linear in the gradient (edge scores through a post-attention norm's Jacobian at each IG point).

    ``prefix`` and ``start``, for callers that read the gradients from position ``start`` on only (e.g. dotted with a
    change that is 0 before it): every row is the same before ``start`` (the same tokens, and on the path the same
    embeddings), with keys and values ``prefix``; each forward then computes positions ``>= start`` only, the way
    ``run_interventions`` does (exact by causality; verified once per model and hooks, ``gradient_suffix_ok``, else
    every position), and the gradients and activations cover those positions (their length tells).
    """
    batch = tokens.shape[0]
    steps = embed_path[1] if embed_path else 1
    rows = steps * batch  # prompt-major: row = prompt * steps + step
    suffix = (
        start
        if SUFFIX_GRADIENTS and prefix is not None and start and gradient_suffix_ok(model, tokens, answer_tokens, hook_names, prefix, start)
        else 0
    )
    n_pos = tokens.shape[1] - suffix
    per_row_bytes = recorded_bytes_per_row(model, tokens[:1], hook_names) * n_pos // tokens.shape[1]
    chunk = rows_per_chunk(model, n_pos, memory_mb, per_row_bytes)
    all_tokens, all_answers = tokens.repeat_interleave(steps, 0), answer_tokens.repeat_interleave(steps, 0)
    if embed_path:
        clean_embed = embed_path[0].repeat_interleave(steps, 0)
        alpha = ((torch.arange(steps, dtype=torch.float) + 0.5) / steps).repeat(batch).to(clean_embed.device)[:, None, None]
    grads_out: dict[str, Tensor] = {}
    acts_out: dict[str, list[Tensor]] = {n: [] for n in hook_names}
    lds: list[Tensor] = []
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        before = []
        if embed_path:

            def interpolate(act: Tensor, hook, lo=lo, hi=hi) -> Tensor:  # act: the token embeddings of ``tokens`` (the path's start)
                return act + alpha[lo:hi] * (clean_embed[lo:hi, suffix:] - act)

            before = [(EMBED_HOOK, interpolate)]
        past = prefix.cache(suffix, rows=torch.arange(lo, hi) // steps) if suffix else None
        ld, acts, grads = _forward_gradients(model, all_tokens[lo:hi, suffix:], all_answers[lo:hi], hook_names, past, before, batch)
        unused = [n for n, g in zip(hook_names, grads) if g is None]
        if unused:
            raise HookNameError(f"the metric does not depend on hooks {unused}; their attribution would be a silent zero")
        row = torch.arange(lo, hi, device=ld.device)
        prompts, within = (row // steps).unique_consecutive(return_inverse=True)  # the chunk's prompts, each row's among them
        if steps == 1 or per_row:  # one row per prompt, or the rows wanted: nothing to sum (and no copy of the gradients)
            summed = dict(zip(hook_names, grads))
        else:
            summed = {n: g.new_zeros((len(prompts), *g.shape[1:])).index_add_(0, within, g) for n, g in zip(hook_names, grads)}
        if consume is not None and per_row:
            consume({n: g / steps for n, g in summed.items()}, row // steps, {n: acts[n].detach() for n in hook_names})
        elif consume is not None:
            consume({n: g / steps for n, g in summed.items()}, prompts, {})
        else:
            for n, g in summed.items():
                if n not in grads_out:
                    grads_out[n] = torch.zeros((batch, *g.shape[1:]), dtype=g.dtype, device=g.device)
                grads_out[n].index_add_(0, prompts, g)
        first = row % steps == 0  # rows of the first step (the activations and logit diffs returned), in prompt order
        lds.append(ld.detach()[first])
        for n in hook_names if keep_activations else ():
            acts_out[n].append(acts[n].detach()[first])
        del acts, grads, summed, ld
        release_freed_memory()  # the chunk's autograd buffers, back to the system before the next (helpers.engine.memory)
    return {n: g / steps for n, g in grads_out.items()}, {n: torch.cat(a) for n, a in acts_out.items() if a}, torch.cat(lds)


def _forward_gradients(
    model,
    tokens: Int[Tensor, "row pos"],
    answers: Int[Tensor, "row 2"],
    hook_names: list[str],
    past=None,
    before: list | tuple = (),
    divide: int = 1,
) -> tuple[Float[Tensor, " row"], dict[str, Tensor], tuple[Tensor | None, ...]]:
    """One forward of ``tokens`` with gradients (``past``: a cache of the positions before them; ``before``: hooks that
    run first, e.g. the IG path's embeddings) and the gradients of the summed logit difference over ``divide`` with respect
    to ``hook_names``' activations: (logit differences, activations, gradients, None where the metric does not depend
    on one). The metric reads the final position and the answers' vocabulary columns only."""
    acts: dict[str, Tensor] = {}
    hooks = [*before, *[(name, recording_hook(acts, name, fresh=True)) for name in hook_names], UNEMBED_LAST]
    with torch.enable_grad(), answer_columns(model, answers) as columns, model.hooks(fwd_hooks=hooks):
        with quiet_cache_rename():
            ld = logit_diff(model(tokens, **({} if past is None else {"past_key_values": past})), columns)
        missing = [n for n in hook_names if n not in acts]
        if missing:
            raise HookNameError(f"hooks {missing} did not fire in the forward pass")
        grads = torch.autograd.grad(ld.sum() / divide, [acts[n] for n in hook_names], allow_unused=True)
    return ld, acts, grads


def gradient_suffix_ok(
    model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"], hook_names: list[str], prefix: KVPrefix, start: int
) -> bool:
    """Whether ``metric_gradients`` from position ``start`` (earlier keys and values from ``prefix``) gives the
    gradients of every position from the full forward (checked once per model and hooks, on two prompts, in the
    caller's setting: e.g. its receiver forks)."""

    def gradients(suffix: int) -> Tensor:
        _, _, grads = _forward_gradients(
            model, tokens[:2, suffix:], answers[:2], hook_names, prefix.cache(suffix, 1, 2) if suffix else None
        )
        return torch.cat([torch.zeros(1) if g is None else g[:, g.shape[1] - (tokens.shape[1] - start) :].flatten() for g in grads])

    return verified(
        model,
        ("gradient_suffix", start, hashlib.sha256(" ".join(hook_names).encode()).hexdigest()[:12]),  # per hooks, compactly
        lambda: gradients(start),
        lambda: gradients(0),
        f"gradients from position {start} on (earlier keys and values cached) differ from the full forward's",
    )


def recorded_bytes_per_row(model, tokens: Int[Tensor, "1 pos"], hook_names: list[str]) -> int:
    """Bytes the activations of ``hook_names`` take for one row of ``tokens``, measured by one forward of that row."""
    sizes: dict[str, int] = {}

    def size(act: Tensor, hook) -> None:
        sizes[hook.name] = act.numel() * act.element_size()

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, size) for name in hook_names] + [UNEMBED_LAST]):
        model(tokens)
    return sum(sizes.values())


def reduce_to_layout(spec: Sweep, product: Float[Tensor, "batch ..."]) -> Tensor:
    """Sum ``product`` over the activation axes a variant patches whole, sum over prompts, order as ``spec.axes``."""
    kept = [axis for _, axis in spec.axes]
    summed = [axis + 1 for axis in range(product.dim() - 1) if axis not in kept]
    reduced = product.sum(dim=[0, *summed]) if summed else product.sum(0)
    order = sorted(kept)
    return reduced.permute(*[order.index(axis) for axis in kept])


def attribution_patch(
    model,
    prompts: PromptPair | PromptSet,
    names: Iterable[str | Sweep],
    ig_steps: int = 0,
    memory_mb: float = DEFAULT_GRADIENT_MEMORY_MB,
) -> Attribution:
    """Attribution estimate of each named sweep (a name in ``SWEEPS`` or a ``Sweep``, e.g. ``neurons.NEURONS``),
    normalised like ``patching.sweep`` (base 0, source 1); keyed by sweep name. ``prompts``: a ``PromptPair`` or a
    ``PromptSet`` (its denoising pair: the corrupted run is the base, the clean run the source; ``clean`` and
    ``corrupted`` below).

    Plain: a clean forward (caching only the hooks needed), then one corrupted forward and backward for all
    sweeps at once. ``ig_steps > 0``: integrated gradients along the embedding path (EAP-IG), which needs one
    more corrupted forward for the corrupted activations. ``memory_mb`` bounds the activations one forward with
    gradients keeps (``metric_gradients``).
    """
    pair = as_pair(prompts)
    clean_tokens, corrupted_tokens, answer_tokens = pair.source, pair.base, pair.answers
    unknown = [n for n in names if isinstance(n, str) and n not in SWEEPS]
    if unknown:
        raise KeyError(f"unknown sweep(s) {unknown}; choose from {sorted(SWEEPS)}")
    specs = {spec.name: spec for spec in (SWEEPS[n] if isinstance(n, str) else n for n in names)}  # also sweeps outside SWEEPS
    per_sweep = {n: [spec.hook_name(layer) for layer in range(model.cfg.n_layers)] for n, spec in specs.items()}
    hook_names = resolve_hook_names(model, sorted({h for hs in per_sweep.values() for h in hs}))
    cache_names = hook_names + ([EMBED_HOOK] if ig_steps else [])
    with torch.no_grad(), model.hooks(fwd_hooks=[UNEMBED_LAST]):  # the logit difference reads the final position only
        clean_logits, clean_cache, clean_kv = run_with_kv(model, clean_tokens, names_filter=cache_names)
        clean_ld = logit_diff(clean_logits, answer_tokens).mean().item()
    # before the first token where the prompts differ, both runs are the same (every change is 0): the gradients are
    # taken from there on (``metric_gradients``), where each hook's axis 1 is the position (not so for patterns)
    differs = (clean_tokens != corrupted_tokens).any(0).nonzero().flatten()
    positional = not any(part in h for h in hook_names for part in ("pattern", "attn_scores"))
    start = int(differs[0]) if len(differs) and positional and clean_kv is not None else 0
    suffix = {"prefix": clean_kv, "start": start}
    if ig_steps:
        embed_path = (clean_cache[EMBED_HOOK], ig_steps)
        grads, _, _ = metric_gradients(
            model, corrupted_tokens, answer_tokens, hook_names, embed_path, memory_mb, keep_activations=False, **suffix
        )
        with torch.no_grad(), model.hooks(fwd_hooks=[UNEMBED_LAST]):
            corr_logits, corr_acts = model.run_with_cache(corrupted_tokens, names_filter=hook_names)
        corr_ld = logit_diff(corr_logits, answer_tokens).mean().item()
    else:
        grads, corr_acts, lds = metric_gradients(model, corrupted_tokens, answer_tokens, hook_names, memory_mb=memory_mb, **suffix)
        corr_ld = lds.mean().item()
    n_pos = clean_tokens.shape[1]
    for h, g in grads.items() if start else ():  # positions before the gradients': gradient 0, corrupted = clean run
        if g.shape[1] < n_pos:  # (axis 1: the position, as ``positional`` requires)
            grads[h] = torch.cat([g.new_zeros(g.shape[0], n_pos - g.shape[1], *g.shape[2:]), g], 1)
            if corr_acts[h].shape[1] < n_pos:
                corr_acts[h] = torch.cat([clean_cache[h][:, : n_pos - g.shape[1]], corr_acts[h]], 1)
    scale = 1.0 / (clean_ld - corr_ld)  # d normalised / d logit diff
    values = {
        name: torch.stack([reduce_to_layout(specs[name], (clean_cache[h] - corr_acts[h]) * grads[h]) * scale for h in hooks]).cpu()
        for name, hooks in per_sweep.items()
    }
    return Attribution(values, clean_ld, corr_ld)


def rank_agreement(exact: dict[str, Tensor], estimates: dict[str, Tensor]) -> dict[str, float]:
    """Spearman rank correlation of each estimated sweep with the exact sweep of that name (``metrics.rank_correlation``),
    over the cells computed exactly (all of them, unless the exact sweep ran over some heads only: its other cells are NaN)."""
    return {name: rank_correlation(exact[name], est) for name, est in estimates.items()}


DIRECTIONS = ("denoising", "noising", "mean of both")


def agreement_by_direction(
    estimates: dict[str, Float[Tensor, "layer ..."]], denoising: Float[Tensor, "layer ..."], noising: Float[Tensor, "layer ..."]
) -> dict[str, dict[str, float]]:
    """Spearman of each estimate with exact patching in each direction: ``denoising`` (one component's clean value into
    the corrupted run, ``patching.sweep``), ``noising`` (its corrupted value into the clean run, as a share of the gap
    lost) and their mean. Plain attribution is the first-order estimate of denoising at the corrupted run; integrated
    gradients share the total effect among components that all move together along the path, which lies between the
    two directions (exactly the mean for a metric quadratic in the components)."""
    references = dict(zip(DIRECTIONS, (denoising, noising, (denoising + noising) / 2)))
    return {label: {ref: rank_correlation(values, est) for ref, values in references.items()} for label, est in estimates.items()}


def direction_reading(by_direction: dict[str, dict[str, float]]) -> str:
    """One sentence per estimate: which exact quantity it ranks like best, and by how much."""
    lines = []
    for label, row in by_direction.items():
        best = max(row, key=row.get)
        lines.append(
            f"{label}: closest to exact {best} patching (Spearman {row[best]:.3f}; "
            + ", ".join(f"{ref} {v:.3f}" for ref, v in row.items() if ref != best)
            + ")"
        )
    return "\n".join(lines)
