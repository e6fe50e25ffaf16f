"""Exact path patching (IOI paper, Appendix B): the effect of one sender head that travels only along a
path into chosen receivers.

Convention as in ``patching``: the base run is the corrupted one and the sender's *clean* output goes in,
so 1.0 = the whole clean logit difference restored, 0.0 = nothing.

* To the final residual stream (``path_patch_to_logits``): every head's output z is frozen to its corrupted
  value except the sender's, which is clean; the MLPs are recomputed. What reaches the logits is the
  sender's direct effect plus what the MLPs make of it.
* To receivers (``path_patch_to_receivers``): step 1 is the run above, in which the receivers' q, k or v
  inputs are recorded; step 2 is a normal corrupted run with only those receiver inputs replaced by the
  recorded ones. Senders at or after a receiver's layer cannot reach it: that receiver keeps its corrupted
  input.

All senders of a layer run as one batch, starting from the cached corrupted residual stream at their layer.

Under grouped-query attention several query heads share one key and value (their key/value group): a path
into a receiver's k or v is a path into that group's k or v, shared by every head of the group.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .hooks import resolve_hook_names
from .interventions import Intervention, run_interventions
from .metrics import normalised
from .patching import SWEEPS, PatchingContext, run_patched, tl_metric, variant_masks

QKV_HOOKS = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _sender_run(ctx: PatchingContext, layer: int, record: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 1 for every head of ``layer`` as a sender: final-position logit diffs [head, batch] and the activations
    of the hooks in ``record`` (per sender, variant-major)."""
    n_heads = ctx.model.cfg.n_heads
    senders = variant_masks(SWEEPS["head_out"], ctx.clean_cache[_z(layer)].shape, torch.arange(n_heads))
    frozen = [Intervention(_z(l), "corrupted") for l in range(layer + 1, ctx.model.cfg.n_layers)]
    return run_patched(ctx, [Intervention(_z(layer), "clean", senders), *frozen], n_heads, record)


def path_patch_to_logits(ctx: PatchingContext) -> Float[Tensor, "layer head"]:
    """Normalised effect of each sender head along its paths to the final residual stream (other heads frozen)."""
    resolve_hook_names(ctx.model, [_z(l) for l in range(ctx.model.cfg.n_layers)])
    rows = [_sender_run(ctx, layer, [])[0].mean(-1) for layer in range(ctx.model.cfg.n_layers)]
    return normalised(torch.stack(rows).cpu(), ctx.clean_logit_diff, ctx.corrupted_logit_diff)


def _receiver_hook_name(layer: int, component: str) -> str:
    if component not in QKV_HOOKS:
        raise ValueError(f"component must be one of {sorted(QKV_HOOKS)}, not {component!r}")
    return f"blocks.{layer}.{QKV_HOOKS[component]}"


def input_index(cfg, component: str, head: int) -> int:
    """Index of query head ``head``'s ``component`` input in the hooked activation: the head itself for q; its
    key/value group for k and v (grouped-query attention shares one k and v among ``n_heads / n_kv`` heads)."""
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return head if component == "q" else head // (cfg.n_heads // n_kv)


def _receiver_run(ctx: PatchingContext, sender_layer: int, recorded: dict[str, Tensor], receivers: list[dict], component: str) -> Tensor:
    """Step 2: mean logit diff per sender head of ``sender_layer`` when the reachable receivers' ``component``
    inputs take their step-1 values in an otherwise normal corrupted run."""
    reachable = [r for r in receivers if r["layer"] > sender_layer]
    cfg = ctx.model.cfg
    if not reachable:  # a sender at or after every receiver cannot reach them
        return torch.full((cfg.n_heads,), ctx.corrupted_logit_diff)
    interventions = []
    for layer in sorted({r["layer"] for r in reachable}):
        name = _receiver_hook_name(layer, component)
        shape = ctx.corrupted_cache[name].shape  # [batch, pos, head or kv group, d_head]
        mask = torch.zeros(1, 1, shape[2], 1, dtype=torch.bool)
        mask[0, 0, [input_index(cfg, component, r["head"]) for r in reachable if r["layer"] == layer]] = True
        interventions.append(Intervention(name, "recorded", mask))
    logit_diffs, _ = run_interventions(ctx.model, ctx.corrupted_tokens, ctx.answer_tokens, interventions, {"recorded": recorded},
                                       cfg.n_heads, base_cache=ctx.corrupted_cache.cache_dict)
    return logit_diffs.mean(-1).cpu()


def receiver_sweeps(ctx: PatchingContext, targets: dict) -> dict:
    """For each ``key: (receivers, component)`` of ``targets``, the normalised effect [layer, head] of every sender
    along its paths into those receivers' q, k or v input. Step 1 runs once per sender layer for all targets."""
    model = ctx.model
    needed = {(r["layer"], c) for receivers, c in targets.values() for r in receivers}
    if not targets:
        return {}
    resolve_hook_names(model, sorted({_receiver_hook_name(l, c) for l, c in needed}))
    rows: dict = {key: [] for key in targets}
    for layer in range(model.cfg.n_layers):
        record = sorted({_receiver_hook_name(l, c) for l, c in needed if l > layer})
        recorded = _sender_run(ctx, layer, record)[1] if record else {}
        for key, (receivers, component) in targets.items():
            rows[key].append(_receiver_run(ctx, layer, recorded, receivers, component))
    return {key: normalised(torch.stack(r), ctx.clean_logit_diff, ctx.corrupted_logit_diff) for key, r in rows.items()}


def path_patch_to_receivers(ctx: PatchingContext, receivers: list[dict], component: str = "v") -> Float[Tensor, "layer head"]:
    """Normalised effect of each sender head along its paths into the ``component`` input of ``receivers``.

    ``receivers``: ``{layer, head}`` dicts; their q/k/v inputs are replaced together (as in the IOI paper).
    """
    _receiver_hook_name(0, component)  # validate before any forward pass
    return receiver_sweeps(ctx, {"receivers": (receivers, component)})["receivers"]


def receiver_effects(ctx: PatchingContext, receivers: dict[str, dict]) -> dict[tuple[str, str], Float[Tensor, "layer head"]]:
    """Path effect of every sender into each receiver's q, k and v input alone, keyed (receiver, input)."""
    return receiver_sweeps(ctx, {(label, c): ([r], c) for label, r in receivers.items() if r["layer"] > 0 for c in QKV_HOOKS})


def compare_with_direct_path(ctx: PatchingContext, heads: dict[str, dict], effects: dict[tuple[str, str], Tensor],
                             max_senders: int | None = None) -> tuple[list[dict], str | None]:
    """For each pair of ``heads`` (sender earlier than receiver) and each of q/k/v: our exact path effect (from
    ``receiver_effects``) next to TransformerLens's ``get_act_patch_direct_path`` (the direct edge only, same
    normalised metric). Returns (rows, None), or ([], why) where TransformerLens cannot do it on this
    architecture (it needs split q/k/v input hooks, which e.g. OPT's attention bridge lacks).

    TransformerLens runs one forward pass per receiver head of the model for each sender and input, so
    ``max_senders`` limits the comparison to the senders with the strongest exact effect on a later head."""
    try:
        return _direct_path_rows(ctx, strongest_senders(heads, effects, max_senders), heads, effects), None
    except Exception as err:  # noqa: BLE001 - any failure inside TL's reference means "not available here"
        return [], f"TransformerLens get_act_patch_direct_path is not available for this architecture: {type(err).__name__}: {err}"


def strongest_senders(heads: dict[str, dict], effects: dict[tuple[str, str], Tensor], n: int | None) -> dict[str, dict]:
    """The ``n`` heads (all if None) with the largest |exact path effect| into a later head of ``heads``."""
    def strength(label: str) -> float:
        s = heads[label]
        return max((abs(float(e[s["layer"], s["head"]])) for (r, _), e in effects.items() if heads[r]["layer"] > s["layer"]), default=-1.0)

    senders = [label for label in heads if any(r["layer"] > heads[label]["layer"] for r in heads.values())]
    ranked = sorted(senders, key=strength, reverse=True)
    return {label: heads[label] for label in (ranked if n is None else ranked[:n])}


def _direct_path_rows(ctx: PatchingContext, senders: dict[str, dict], heads: dict[str, dict], effects: dict[tuple[str, str], Tensor]) -> list[dict]:
    from transformer_lens.patching import get_act_patch_direct_path

    rows = []
    for s_label, s in senders.items():
        receivers = {label: r for label, r in heads.items() if r["layer"] > s["layer"]}
        for component in ("q", "k", "v"):
            direct = get_act_patch_direct_path(ctx.model, ctx.corrupted_tokens, ctx.clean_cache, ctx.corrupted_cache, tl_metric(ctx),
                                               s["layer"], s["head"], component, verbose=False)
            for r_label, r in receivers.items():
                exact = float(effects[(r_label, component)][s["layer"], s["head"]])
                tl = float(direct[r["layer"], r["head"]])
                rows.append({"sender": s_label, "receiver": r_label, "input": component, "exact path": exact,
                             "TL direct path": tl, "difference": exact - tl})
    return rows
