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

from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.capabilities import NotSupported, architecture, kv_heads
from helpers.engine.forks import split_qkv_input
from helpers.engine.forward import run_interventions
from helpers.engine.hooks import resolve_hook_names
from helpers.engine.interventions import Intervention
from helpers.engine.metrics import normalised
from helpers.engine.norms import heads_add_up, post_attention_norm, post_norms, sublayer_bias
from helpers.engine.shortcuts import start_exact
from helpers.methods.patching import SWEEPS, PatchingContext, run_patched, variant_masks
from helpers.schema.heads import Head

QKV_HOOKS = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def _z(layer: int) -> str:
    return get_act_name("z", layer)


def _sender_run(ctx: PatchingContext, layer: int, record: list[str], heads: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 1 for the heads ``heads`` of ``layer`` (default: every head) as senders: final-position logit diffs
    [sender, batch] and the activations of the hooks in ``record`` (per sender, variant-major)."""
    heads = torch.arange(ctx.model.cfg.n_heads) if heads is None else heads
    senders = variant_masks(SWEEPS["head_out"], ctx.source_cache[_z(layer)].shape, heads)
    frozen = [Intervention(_z(l), "base") for l in range(layer + 1, ctx.model.cfg.n_layers)]
    return run_patched(ctx, [Intervention(_z(layer), "source", senders), *frozen], len(heads), record)


def path_patch_to_logits(ctx: PatchingContext) -> Float[Tensor, "layer head"]:
    """Normalised effect of each sender head along its paths to the final residual stream (other heads frozen)."""
    resolve_hook_names(ctx.model, [_z(l) for l in range(ctx.model.cfg.n_layers)])
    rows = [_sender_run(ctx, layer, [])[0].mean(-1) for layer in range(ctx.model.cfg.n_layers)]
    return normalised(torch.stack(rows).cpu(), ctx.source_logit_diff, ctx.base_logit_diff)


def _receiver_hook_name(layer: int, component: str) -> str:
    if component not in QKV_HOOKS:
        raise ValueError(f"component must be one of {sorted(QKV_HOOKS)}, not {component!r}")
    return f"blocks.{layer}.{QKV_HOOKS[component]}"


def input_index(cfg, component: str, head: int) -> int:
    """Index of query head ``head``'s ``component`` input in the hooked activation: the head itself for q; its
    key/value group for k and v (grouped-query attention shares one k and v among ``n_heads / n_kv`` heads)."""
    n_kv = kv_heads(cfg)
    return head if component == "q" else head // (cfg.n_heads // n_kv)


def _receiver_run(
    ctx: PatchingContext, sender_layer: int, n_senders: int, recorded: dict[str, Tensor], receivers: list[Head], component: str
) -> Tensor:
    """Step 2: mean logit diff per sender of ``sender_layer`` (``n_senders`` step-1 variants) when the reachable
    receivers' ``component`` inputs take their step-1 values in an otherwise normal corrupted run."""
    reachable = [r for r in receivers if r.layer > sender_layer]
    cfg = ctx.model.cfg
    if not reachable:  # a sender at or after every receiver cannot reach them
        return torch.full((n_senders,), ctx.base_logit_diff)
    interventions = []
    for layer in sorted({r.layer for r in reachable}):
        name = _receiver_hook_name(layer, component)
        shape = ctx.base_cache[name].shape  # [batch, pos, head or kv group, d_head]
        mask = torch.zeros(1, 1, shape[2], 1, dtype=torch.bool)
        mask[0, 0, [input_index(cfg, component, r.head) for r in reachable if r.layer == layer]] = True
        interventions.append(Intervention(name, "recorded", mask))
    logit_diffs, _ = run_interventions(
        ctx.model,
        ctx.base_tokens,
        ctx.answer_tokens,
        interventions,
        {"recorded": recorded},
        n_senders,
        base_cache=ctx.base_cache.cache_dict,
        prefix=ctx.base_kv,
    )
    return logit_diffs.mean(-1).cpu()


def receiver_sweeps(ctx: PatchingContext, targets: dict, senders: Iterable[Head] | None = None) -> dict:
    """For each ``key: (receivers, component)`` of ``targets``, the normalised effect [layer, head] of every sender
    along its paths into those receivers' q, k or v input. Step 1 runs once per sender layer for all targets.
    ``senders``: the only sender heads computed (default: every head); every other cell is NaN."""
    model = ctx.model
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    needed = {(r.layer, c) for receivers, c in targets.values() for r in receivers}
    if not targets:
        return {}
    resolve_hook_names(model, sorted({_receiver_hook_name(l, c) for l, c in needed}))
    chosen = None if senders is None else {(s.layer, s.head) for s in senders}
    rows = {key: torch.full((n_layers, n_heads), float("nan")) for key in targets}
    for layer in range(n_layers):
        heads = torch.arange(n_heads) if chosen is None else torch.tensor(sorted(h for l, h in chosen if l == layer), dtype=torch.long)
        if not len(heads):
            continue
        record = sorted({_receiver_hook_name(l, c) for l, c in needed if l > layer})
        recorded = _sender_run(ctx, layer, record, heads)[1] if record else {}
        for key, (receivers, component) in targets.items():
            rows[key][layer, heads] = _receiver_run(ctx, layer, len(heads), recorded, receivers, component)
    return {key: normalised(r, ctx.source_logit_diff, ctx.base_logit_diff) for key, r in rows.items()}


def path_patch_to_receivers(ctx: PatchingContext, receivers: list[Head], component: str = "v") -> Float[Tensor, "layer head"]:
    """Normalised effect of each sender head along its paths into the ``component`` input of ``receivers``.

    ``receivers``: heads; their q/k/v inputs are replaced together (as in the IOI paper).
    """
    _receiver_hook_name(0, component)  # validate before any forward pass
    return receiver_sweeps(ctx, {"receivers": (receivers, component)})["receivers"]


def receiver_effects(
    ctx: PatchingContext, receivers: dict[str, Head], senders: Iterable[Head] | None = None
) -> dict[tuple[str, str], Float[Tensor, "layer head"]]:
    """Path effect of every sender into each receiver's q, k and v input alone, keyed (receiver, input).
    ``senders``: compute only these senders' rows (e.g. the receivers themselves, for a circuit's own edges: far
    cheaper than every head of the model); the other cells are NaN."""
    targets = {(label, c): ([r], c) for label, r in receivers.items() if r.layer > 0 for c in QKV_HOOKS}
    return receiver_sweeps(ctx, targets, senders)


def direct_path_effects(
    ctx: PatchingContext, sender: Head, component: str = "q", receivers: Iterable[Head] | None = None
) -> Float[Tensor, "layer head"]:
    """Normalised effect of the direct edge from ``sender`` into every later head's ``component`` input (the
    quantity of TransformerLens's ``get_act_patch_direct_path``, Wang et al. 2022): in the corrupted run, the
    sender's clean-minus-corrupted write (``z @ W_O``) is added to one receiver's own pre-norm copy of the
    residual stream (its q/k/v fork, which otherwise holds the corrupted ``resid_pre``); every other reader still
    sees the corrupted sender. The heads of one receiver layer are the variants of one batched run that starts
    at that layer. ``receivers``: the only receiver heads computed (default: every later head); the other later
    cells are NaN. Receivers at or before the sender's layer cannot be reached: 0.

    Under a post-attention norm (Gemma-2/3) the receiver's copy holds the sender layer's normed output with the sender
    clean, ``N(A + delta) - N(A)`` added (``A`` the layer's corrupted pre-norm output; ``edges`` module docstring).

    Raises ValueError for k/v on grouped-query models (a key/value input is shared by several heads),
    NotImplementedError where no q/k/v fork can be found or made (``helpers.engine.forks``)."""
    model, cfg = ctx.model, ctx.model.cfg
    _receiver_hook_name(0, component)
    if not all(start_exact(model, block) for block in range(cfg.n_layers)):
        raise NotSupported(
            f"direct-edge path patching is not supported for this architecture ({architecture(model)}): the bridge's "
            "forward from a block does not reproduce the model's output here, and on such a model (BLOOM) these effects "
            "disagree with TransformerLens's get_act_patch_direct_path; refused rather than reported unverified"
        )
    if not heads_add_up(model):
        raise NotSupported(
            f"direct-edge path patching is not supported for this architecture ({architecture(model)}): its heads' "
            "outputs (z @ W_O) do not add up to the attention output here (e.g. a residual multiplier), and a sender's "
            "write is built from them"
        )
    n_kv = kv_heads(cfg)
    if component != "q" and n_kv != cfg.n_heads:
        raise ValueError(
            f"direct path into {component} is not defined per head under grouped-query attention "
            f"({cfg.n_heads} query heads share {n_kv} key/value inputs)"
        )
    layer, head = sender.layer, sender.head
    z = ctx.source_cache[_z(layer)][:, :, head] - ctx.base_cache[_z(layer)][:, :, head]  # [batch, pos, d_head]
    delta = z @ model.blocks[layer].attn.W_O[head]  # [batch, pos, d_model]
    if "ln1_post" in post_norms(model):  # the layer writes N(A): the receiver reads it with the sender clean
        with torch.no_grad():  # A in the corrupted run, from the cached z (no forward pass per sender)
            w_o = model.blocks[layer].attn.W_O
            attn = torch.einsum("bphd,hdm->bpm", ctx.base_cache[_z(layer)], w_o.to(z.dtype))
            attn = attn + sublayer_bias(model, model.blocks[layer].attn, "b_O", attn.device).to(attn.dtype)
            norm = post_attention_norm(model, layer)
            delta = norm(attn + delta) - norm(attn)
    out = torch.zeros(cfg.n_layers, cfg.n_heads)
    if receivers is None:
        chosen = {l: list(range(cfg.n_heads)) for l in range(layer + 1, cfg.n_layers)}
    else:
        out[layer + 1 :] = float("nan")
        chosen = {}
        for r in receivers:
            if r.layer > layer:
                chosen.setdefault(r.layer, []).append(r.head)
    with split_qkv_input(model), torch.no_grad():
        for l, heads in sorted(chosen.items()):
            heads = sorted(set(heads))
            mask = torch.eye(cfg.n_heads, dtype=torch.bool)[heads][
                :, None, :, None
            ]  # variant i patches heads[i]: [variant, pos, head, d_model]
            name = f"blocks.{l}.attn.hook_{component}_input"
            if name not in model.hook_dict:
                raise NotImplementedError(f"{name} does not exist: this attention has no pre-q/k/v fork")
            fork = ctx.base_cache[get_act_name("resid_pre", l)] + delta  # the receiver's own copy, with the edge
            diffs, _ = run_interventions(
                model,
                ctx.base_tokens,
                ctx.answer_tokens,
                [Intervention(name, "recorded", mask)],
                {"recorded": {name: fork[:, :, None, :]}},
                len(heads),
                base_cache=ctx.base_cache.cache_dict,
                prefix=ctx.base_kv,
            )
            out[l, heads] = normalised(diffs.mean(-1).cpu(), ctx.source_logit_diff, ctx.base_logit_diff)
    return out


def compare_with_direct_path(
    ctx: PatchingContext, heads: dict[str, Head], effects: dict[tuple[str, str], Tensor], max_senders: int | None = None
) -> tuple[list[dict], str | None]:
    """For each pair of ``heads`` (sender earlier than receiver) and each of q/k/v: the exact path effect (from
    ``receiver_effects``) next to the direct edge alone (``direct_path_effects``, equal to TransformerLens's
    ``get_act_patch_direct_path``); their difference is what reaches the receiver through MLPs and other heads.
    ``max_senders`` keeps the senders with the strongest exact effect on a later head. Returns (rows, note):
    the note says what could not be compared on this architecture (no q/k/v fork can be made; k/v under
    grouped-query attention), else None."""
    rows, skipped = [], {}
    for s_label, s in strongest_senders(heads, effects, max_senders).items():
        receivers = {label: r for label, r in heads.items() if r.layer > s.layer}
        for component in ("q", "k", "v"):
            try:
                direct = direct_path_effects(ctx, s, component, receivers.values())
            except (ValueError, NotImplementedError) as err:
                skipped[component] = str(err)
                continue
            for r_label, r in receivers.items():
                exact = float(effects[(r_label, component)][s.index])
                edge = float(direct[r.index])
                rows.append(
                    {
                        "sender": s_label,
                        "receiver": r_label,
                        "input": component,
                        "exact path": exact,
                        "direct edge": edge,
                        "through other paths": exact - edge,
                    }
                )
    note = "; ".join(f"{c}: {why}" for c, why in skipped.items()) or None
    return rows, note


def strongest_senders(heads: dict[str, Head], effects: dict[tuple[str, str], Tensor], n: int | None) -> dict[str, Head]:
    """The ``n`` heads (all if None) with the largest |exact path effect| into a later head of ``heads``."""

    def strength(label: str) -> float:
        s = heads[label]
        return max((abs(float(e[s.index])) for (r, _), e in effects.items() if heads[r].layer > s.layer), default=-1.0)

    senders = [label for label in heads if any(r.layer > heads[label].layer for r in heads.values())]
    ranked = sorted(senders, key=strength, reverse=True)
    return {label: heads[label] for label in (ranked if n is None else ranked[:n])}
