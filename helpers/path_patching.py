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
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .hooks import recording_hook, resolve_hook_names
from .metrics import logit_diff, normalised
from .patching import PatchingContext

QKV_HOOKS = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _batched(cache_value: Tensor, n_var: int) -> Tensor:
    """A cached [batch, ...] activation repeated for ``n_var`` variants: [n_var * batch, ...]."""
    return cache_value.repeat(n_var, *([1] * (cache_value.dim() - 1)))


def _sender_run(ctx: PatchingContext, layer: int, record: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 1 for every head of ``layer`` as a sender: final-position logit diffs [head, batch] and the recorded activations."""
    model = ctx.model
    n_heads, batch = model.cfg.n_heads, ctx.corrupted_tokens.shape[0]
    clean_z = ctx.clean_cache[_z(layer)]
    eye = torch.eye(n_heads, dtype=torch.bool, device=clean_z.device)[:, None, None, :, None]  # [variant, 1, 1, head, 1]
    recorded: dict[str, Tensor] = {}

    def sender(z: Tensor, hook=None) -> Tensor:
        z = z.reshape(n_heads, batch, *z.shape[1:])
        return torch.where(eye, clean_z[None], z).reshape(n_heads * batch, *z.shape[2:])

    def freeze(l: int):
        def hook(z: Tensor, hook=None) -> Tensor:
            return _batched(ctx.corrupted_cache[_z(l)], n_heads)
        return hook

    hooks = [(_z(layer), sender)] + [(_z(l), freeze(l)) for l in range(layer + 1, model.cfg.n_layers)]
    hooks += [(name, recording_hook(recorded, name)) for name in record]
    resid = _batched(ctx.corrupted_cache[f"blocks.{layer}.hook_resid_pre"], n_heads)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for block in model.blocks[layer:]:
            resid = block(resid)[0]
        logits = model.unembed(model.ln_final(resid[:, -1:]))
    ld = logit_diff(logits, ctx.answer_tokens.repeat(n_heads, 1)).reshape(n_heads, batch)
    return ld, recorded


def path_patch_to_logits(ctx: PatchingContext) -> Float[Tensor, "layer head"]:
    """Normalised effect of each sender head along its paths to the final residual stream (other heads frozen)."""
    resolve_hook_names(ctx.model, [_z(l) for l in range(ctx.model.cfg.n_layers)])
    rows = [_sender_run(ctx, layer, [])[0].mean(-1) for layer in range(ctx.model.cfg.n_layers)]
    return normalised(torch.stack(rows).cpu(), ctx.clean_logit_diff, ctx.corrupted_logit_diff)


def path_patch_to_receivers(ctx: PatchingContext, receivers: list[dict], component: str = "v") -> Float[Tensor, "layer head"]:
    """Normalised effect of each sender head along its paths into the ``component`` input of ``receivers``.

    ``receivers``: ``{layer, head}`` dicts; their q/k/v inputs are replaced together (as in the IOI paper).
    """
    if component not in QKV_HOOKS:
        raise ValueError(f"component must be one of {sorted(QKV_HOOKS)}, not {component!r}")
    model = ctx.model
    n_heads, batch = model.cfg.n_heads, ctx.corrupted_tokens.shape[0]
    recv_layers = sorted({r["layer"] for r in receivers})
    names = {l: f"blocks.{l}.{QKV_HOOKS[component]}" for l in recv_layers}
    resolve_hook_names(model, list(names.values()))
    first = recv_layers[0]
    rows = []
    for layer in range(model.cfg.n_layers):
        reachable = [r for r in receivers if r["layer"] > layer]
        if not reachable:
            rows.append(torch.full((n_heads,), ctx.corrupted_logit_diff))
            continue
        _, recorded = _sender_run(ctx, layer, [names[l] for l in recv_layers if l > layer])

        def replace(l: int):
            heads = [r["head"] for r in reachable if r["layer"] == l]

            def hook(act: Tensor, hook=None) -> Tensor:  # act [variant*batch, pos, head, d_head]
                act = act.clone()
                act[:, :, heads] = recorded[names[l]][:, :, heads]
                return act
            return hook

        start = max(first, layer + 1)
        resid = _batched(ctx.corrupted_cache[f"blocks.{start}.hook_resid_pre"], n_heads)
        hooks = [(names[l], replace(l)) for l in recv_layers if l > layer]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            for block in model.blocks[start:]:
                resid = block(resid)[0]
            logits = model.unembed(model.ln_final(resid[:, -1:]))
        rows.append(logit_diff(logits, ctx.answer_tokens.repeat(n_heads, 1)).reshape(n_heads, batch).mean(-1).cpu())
    return normalised(torch.stack(rows), ctx.clean_logit_diff, ctx.corrupted_logit_diff)


def receiver_effects(ctx: PatchingContext, receivers: dict[str, dict]) -> dict[tuple[str, str], Float[Tensor, "layer head"]]:
    """``path_patch_to_receivers`` of every sender into each receiver's q, k and v input, keyed (receiver, input)."""
    return {(label, c): path_patch_to_receivers(ctx, [r], c) for label, r in receivers.items() if r["layer"] > 0 for c in QKV_HOOKS}


def compare_with_direct_path(ctx: PatchingContext, heads: dict[str, dict], effects: dict[tuple[str, str], Tensor]) -> list[dict]:
    """For each pair of ``heads`` (sender earlier than receiver) and each of q/k/v: our exact path effect (from
    ``receiver_effects``) next to TransformerLens's ``get_act_patch_direct_path`` (the direct edge only, same
    normalised metric)."""
    from transformer_lens.patching import get_act_patch_direct_path

    from .patching import tl_metric

    rows = []
    for s_label, s in heads.items():
        receivers = {label: r for label, r in heads.items() if r["layer"] > s["layer"]}
        if not receivers:
            continue
        for component in ("q", "k", "v"):
            direct = get_act_patch_direct_path(ctx.model, ctx.corrupted_tokens, ctx.clean_cache, ctx.corrupted_cache, tl_metric(ctx),
                                               s["layer"], s["head"], component, verbose=False)
            for r_label, r in receivers.items():
                exact = float(effects[(r_label, component)][s["layer"], s["head"]])
                tl = float(direct[r["layer"], r["head"]])
                rows.append({"sender": s_label, "receiver": r_label, "input": component, "exact path": exact,
                             "TL direct path": tl, "difference": exact - tl})
    return rows
