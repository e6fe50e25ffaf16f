"""Section computations of the templates on a ``Session``: DLA and the logit lens, per-template breakdowns, layer
bands, backup heads, and the heads to analyse.

Templates hold the narrative and the plots; the quantities are computed here so that every template, and
the tests, use one implementation. The session itself (params, model, prompts, results hand-off) is
``helpers.notebook.session``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from helpers.analyses.dla import (
    dla_hook_names,
    full_dla,
    head_dla,
    layer_dla,
    logit_diff_direction,
    logit_lens,
    measured_caveats,
    unembed_bias_diff,
)
from helpers.engine.hooks import run_with_checked_cache
from helpers.engine.interventions import Intervention, hooks_for
from helpers.engine.metrics import group_mean, logit_diff
from helpers.engine.norms import frozen_scales
from helpers.notebook.session import LogitDiffs, Session
from helpers.schema.heads import Head, rank_heads
from helpers.schema.results import BackupRiser, CircuitExpmsResults


@dataclass
class DLAResult:
    """Direct logit attribution of the clean run, averaged over prompts."""

    cache: ActivationCache
    lens: Float[Tensor, " component"]
    lens_labels: list[str]
    layers: Float[Tensor, " component"]
    layer_labels: list[str]
    heads: Float[Tensor, "layer head"]
    identity_error: float  # max over prompts |sum of all components + bias diff - logit diff|
    logit_diff: float  # mean clean logit difference of the same forward pass
    layer_identity_error: float = 0.0  # the same for the per-layer decomposition (embeddings, attention, MLP outputs)
    caveats: dict[str, str] = field(default_factory=dict)  # why the decomposition is not exact here (empty: exact)
    heads_per_prompt: Float[Tensor, "layer head batch"] | None = None  # per-head DLA of each prompt (``heads`` is its mean)
    frozen_scales: list[str] = field(default_factory=list)  # norm scales held at their values in the run (``norms.frozen_scales``)

    @property
    def exact(self) -> bool:
        return not self.caveats

    def summary(self) -> str:
        """One honest line: the identity errors, and the architecture's caveats if any."""
        line = (
            f"DLA identity: max |sum of components + bias diff - logit diff| = {self.identity_error:.2e} (per head), "
            f"{self.layer_identity_error:.2e} (per layer), against a mean logit diff of {self.logit_diff:.3f}"
        )
        if self.frozen_scales:
            line += f"\nNorm scales frozen at their values in this run (what makes each share linear): {', '.join(self.frozen_scales)}"
        if self.caveats:
            line += "\nNOT an exact decomposition on this architecture:\n" + "\n".join(f"  - {k}: {v}" for k, v in self.caveats.items())
        return line


@torch.no_grad()  # weights require grad; these numbers are read, never differentiated
def direct_logit_attribution(s: Session) -> DLAResult:
    """Logit lens, per-layer and per-head DLA of the clean prompts, and the DLA identity error."""
    logits, cache = run_with_checked_cache(s.model, s.prompts.clean_tokens, dla_hook_names(s.model))
    direction = logit_diff_direction(s.model, s.prompts.answer_tokens)
    lens, lens_labels = logit_lens(cache, direction)
    layers, layer_labels = layer_dla(cache, direction)
    heads = head_dla(s.model, cache, direction)
    full, _ = full_dla(s.model, cache, direction)
    bias = unembed_bias_diff(s.model, s.prompts.answer_tokens)
    ld = logit_diff(logits, s.prompts.answer_tokens)
    error = (full.sum(0) + bias - ld).abs().max().item()
    layer_error = (layers.sum(0) + bias - ld).abs().max().item()
    caveats = measured_caveats(s.model, max(error, layer_error), ld)
    if "identity" in caveats:
        warnings.warn(f"DLA: {caveats['identity']}", stacklevel=2)
    return DLAResult(
        cache,
        lens.mean(-1).cpu(),
        lens_labels,
        layers.mean(-1).cpu(),
        layer_labels,
        heads.mean(-1).cpu(),
        error,
        ld.mean().item(),
        layer_error,
        caveats,
        heads.detach().cpu(),
        frozen_scales(s.model),
    )


def template_breakdown(
    s: Session, ld: LogitDiffs, dla: DLAResult | None = None, head_out: Float[Tensor, "template layer head"] | None = None
) -> pd.DataFrame:
    """One row per sentence template of the task: its prompts' clean and corrupted logit differences and accuracy,
    and (when given) its top DLA head and its top output-patching head (``patching.run_sweep(groups=...)``, each
    normalised by that template's own baselines). A template that behaves unlike the others shows here."""
    rows = []
    for i, (name, mask) in enumerate(s.prompts.template_masks().items()):
        row = {
            "template": name,
            "prompts": int(mask.sum()),
            "clean logit diff": float(ld.clean[mask].mean()),
            "corrupted logit diff": float(ld.corrupted[mask].mean()),
            "accuracy (logit diff > 0)": float((ld.clean[mask] > 0).float().mean()),
        }
        if dla is not None and dla.heads_per_prompt is not None:
            row["top DLA head"] = str(rank_heads(dla.heads_per_prompt[..., mask].mean(-1), 1, "abs")[0])
        if head_out is not None:
            row["top output-patching head"] = str(rank_heads(head_out[i], 1, "abs")[0])
        rows.append(row)
    return pd.DataFrame(rows).set_index("template")


def layer_bands(s: Session) -> dict[str, list[int]]:
    """The params' layer groups, or early/middle/late thirds of the layers."""
    if s.params.analysis.layer_groups:
        return s.params.analysis.layer_groups
    n = s.model.cfg.n_layers
    cuts = [0, -(-n // 3), -(-2 * n // 3), n]
    names = ["early", "middle", "late"]
    return {names[i]: list(range(cuts[i], cuts[i + 1])) for i in range(3) if cuts[i] < cuts[i + 1]}


@dataclass
class BackupResult:
    """Per-head DLA before and after mean-ablating one head at the final position."""

    ablated: Head
    dla_before: Float[Tensor, "layer head"]
    dla_after: Float[Tensor, "layer head"]
    logit_diff_before: float
    logit_diff_after: float
    ln_scale_ratio: float  # mean final-LN scale after / before at the final position
    risers: list[BackupRiser] = field(default_factory=list)


@torch.no_grad()  # weights require grad; these numbers are read, never differentiated
def backup_heads(s: Session, dla: DLAResult, head: Head, k: int) -> BackupResult:
    """Mean-ablate ``head`` at the final position (mean over the prompts of each template) and recompute every head's DLA.

    Heads whose DLA rises when the top head is gone are candidate backup heads (IOI paper §3.4). The final
    LN scale ratio shows how much of a change is only the LayerNorm re-normalising the residual stream.
    """
    end = s.prompts.n_pos - 1
    head = Head.of(head)
    name = get_act_name("z", head.layer)
    z = dla.cache[name]
    where = torch.zeros(1, *z.shape[1:3], 1, dtype=torch.bool)  # [variant, pos, head, d_head]
    where[0, end, head.head] = True
    ablation = Intervention(name, "mean", where)
    with s.model.hooks(fwd_hooks=hooks_for([ablation], {"mean": {name: group_mean(z, s.prompts.templates)}}, 1)):
        logits, cache = run_with_checked_cache(s.model, s.prompts.clean_tokens, dla_hook_names(s.model))
    direction = logit_diff_direction(s.model, s.prompts.answer_tokens)
    after = head_dla(s.model, cache, direction).mean(-1).cpu()
    delta = after - dla.heads
    delta[head.index] = float("-inf")  # the ablated head is not its own backup
    risers = [
        BackupRiser(layer=h.layer, head=h.head, dla_before=float(dla.heads[h.index]), dla_after=float(after[h.index]))
        for h in rank_heads(delta, k, "pos")
    ]
    scale_before = dla.cache["ln_final.hook_scale"][:, end].mean().item()
    scale_after = cache["ln_final.hook_scale"][:, end].mean().item()
    return BackupResult(
        head,
        dla.heads,
        after,
        dla.logit_diff,
        logit_diff(logits, s.prompts.answer_tokens).mean().item(),
        scale_after / scale_before,
        risers,
    )


def important_heads(s: Session, circuit: CircuitExpmsResults, override: list[str] | None = None) -> list[Head]:
    """Heads to analyse: ``override`` labels, else the union of the top DLA (both signs) and output-patching heads."""
    if override:
        return [Head.parse(h, s.model.cfg.n_layers, s.model.cfg.n_heads) for h in override]
    return circuit.important_heads()


__all__ = [
    "direct_logit_attribution",
    "template_breakdown",
    "layer_bands",
    "backup_heads",
    "important_heads",
]
