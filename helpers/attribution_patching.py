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
for every sweep at once. IG runs its ``ig_steps`` path points as one batch, plus one corrupted forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .hooks import HookNameError, recording_hook, resolve_hook_names
from .interventions import UNEMBED_LAST
from .metrics import logit_diff
from .patching import SWEEPS, Sweep

EMBED_HOOK = "hook_embed"


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
) -> tuple[dict[str, Tensor], dict[str, Tensor], Float[Tensor, batch]]:
    """One forward of ``tokens`` with gradients and one backward: (d mean logit diff / d activation, activations,
    logit diffs). Attribution patching calls it on the corrupted run; edge attribution on the clean run.

    Gradients are taken only with respect to the hooked activations (no weight gradients). ``embed_path``
    = (clean token embeddings, steps) replaces the token embeddings by ``steps`` points on the straight
    path from corrupted to clean (midpoint rule, one batch of steps × batch) and averages the gradients.
    """
    batch = tokens.shape[0]
    steps = embed_path[1] if embed_path else 1
    acts: dict[str, Tensor] = {}

    hooks = [(name, recording_hook(acts, name, fresh=True)) for name in hook_names]
    if embed_path:
        clean_embed = embed_path[0].repeat(steps, 1, 1)
        alpha = ((torch.arange(steps, dtype=torch.float) + 0.5) / steps).repeat_interleave(batch)
        alpha = alpha.to(clean_embed.device)[:, None, None]

        def interpolate(act: Tensor, hook) -> Tensor:  # act: the token embeddings of ``tokens`` (the path's start)
            return act + alpha * (clean_embed - act)

        hooks = [(EMBED_HOOK, interpolate)] + hooks
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks + [UNEMBED_LAST]):  # the metric reads the final position only
        ld = logit_diff(model(tokens.repeat(steps, 1)), answer_tokens.repeat(steps, 1))
        missing = [n for n in hook_names if n not in acts]
        if missing:
            raise HookNameError(f"hooks {missing} did not fire in the forward pass")
        grads = torch.autograd.grad(ld.sum() / batch, [acts[n] for n in hook_names], allow_unused=True)
    unused = [n for n, g in zip(hook_names, grads) if g is None]
    if unused:
        raise HookNameError(f"the metric does not depend on hooks {unused}; their attribution would be a silent zero")
    grads_out = {n: g.reshape(steps, batch, *g.shape[1:]).mean(0) for n, g in zip(hook_names, grads)}
    return grads_out, {n: a.detach()[:batch] for n, a in acts.items()}, ld.detach()[:batch]


def reduce_to_layout(spec: Sweep, product: Float[Tensor, "batch ..."]) -> Tensor:
    """Sum ``product`` over the activation axes a variant patches whole, sum over prompts, order as ``spec.axes``."""
    kept = [axis for _, axis in spec.axes]
    summed = [axis + 1 for axis in range(product.dim() - 1) if axis not in kept]
    reduced = product.sum(dim=[0, *summed]) if summed else product.sum(0)
    order = sorted(kept)
    return reduced.permute(*[order.index(axis) for axis in kept])


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    answer_tokens: Int[Tensor, "batch 2"],
    names: Iterable[str | Sweep],
    ig_steps: int = 0,
) -> Attribution:
    """Attribution estimate of each named sweep (a name in ``SWEEPS`` or a ``Sweep``, e.g. ``neurons.NEURONS``),
    normalised like ``patching.sweep`` (corrupted 0, clean 1); keyed by sweep name.

    Plain: a clean forward (caching only the hooks needed), then one corrupted forward and backward for all
    sweeps at once. ``ig_steps > 0``: integrated gradients along the embedding path (EAP-IG), which needs one
    more corrupted forward for the corrupted activations.
    """
    unknown = [n for n in names if isinstance(n, str) and n not in SWEEPS]
    if unknown:
        raise KeyError(f"unknown sweep(s) {unknown}; choose from {sorted(SWEEPS)}")
    specs = {spec.name: spec for spec in (SWEEPS[n] if isinstance(n, str) else n for n in names)}  # also sweeps outside SWEEPS
    per_sweep = {n: [spec.hook_name(layer) for layer in range(model.cfg.n_layers)] for n, spec in specs.items()}
    hook_names = resolve_hook_names(model, sorted({h for hs in per_sweep.values() for h in hs}))
    cache_names = hook_names + ([EMBED_HOOK] if ig_steps else [])
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=cache_names)
        clean_ld = logit_diff(clean_logits, answer_tokens).mean().item()
    if ig_steps:
        grads, _, _ = metric_gradients(model, corrupted_tokens, answer_tokens, hook_names, (clean_cache[EMBED_HOOK], ig_steps))
        with torch.no_grad():
            corr_logits, corr_acts = model.run_with_cache(corrupted_tokens, names_filter=hook_names)
        corr_ld = logit_diff(corr_logits, answer_tokens).mean().item()
    else:
        grads, corr_acts, lds = metric_gradients(model, corrupted_tokens, answer_tokens, hook_names)
        corr_ld = lds.mean().item()
    scale = 1.0 / (clean_ld - corr_ld)  # d normalised / d logit diff
    values = {
        name: torch.stack([reduce_to_layout(specs[name], (clean_cache[h] - corr_acts[h]) * grads[h]) * scale for h in hooks]).cpu()
        for name, hooks in per_sweep.items()
    }
    return Attribution(values, clean_ld, corr_ld)


def rank_agreement(exact: dict[str, Tensor], estimates: dict[str, Tensor]) -> dict[str, float]:
    """Spearman rank correlation, over all cells, of each estimated sweep with the exact sweep of that name."""
    from scipy.stats import spearmanr

    return {name: float(spearmanr(exact[name].flatten(), est.flatten())[0]) for name, est in estimates.items()}
