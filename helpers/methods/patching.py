"""Activation patching: run the corrupted prompts, copy in one clean activation, see how much of the clean
logit difference comes back (normalised: 0 = corrupted run, 1 = clean run).

One engine serves every sweep. For a layer L, each *variant* (a position, a head, a head at a position, an
attention-pattern entry) is one copy of the corrupted batch; a boolean mask says which entries of the
activation are taken from the clean cache in that copy. Three levers make it fast, all exact:

1. start from the cached corrupted residual stream at layer L (nothing before layer L changes), and unembed
   only the final position;
2. recompute only the positions from the first one a variant changes, with the corrupted run's keys and values
   for the earlier ones (nothing before it changes; ``kv_cache.KVPrefix``);
3. run many variants as one batch, cut by first changed position and a memory budget (``variant_chunks``);
   variants whose clean and corrupted entries are equal are exactly 0 and are skipped.

Results equal ``transformer_lens.patching`` (tested to 1e-4) in the same layouts (``SWEEPS[name].layout``).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.std import tqdm  # noqa: I001 - text bars: tqdm.auto warns (TqdmWarning) in kernels without ipywidgets
from transformer_lens.ActivationCache import ActivationCache

from helpers.engine.capabilities import NotSupported, edit_reaches_residual, hook_takes_effect, kv_heads, parallel_blocks
from helpers.engine.chunks import variants_per_chunk
from helpers.engine.flops import ModelShape, run_flops
from helpers.engine.forward import run_interventions
from helpers.engine.hooks import UNEMBED_LAST, resolve_hook_names
from helpers.engine.interventions import Intervention, position_axis
from helpers.engine.kv_cache import KVPrefix, run_with_kv
from helpers.engine.memory import release_freed_memory
from helpers.engine.metrics import LOGIT_DIFF, Metric, NormalisationCheck, check_normalisation, group_weights, logit_diff, normalised
from helpers.schema.heads import rank_heads
from helpers.task.prompts import PromptPair, PromptSet, as_pair


@dataclass(frozen=True)
class Sweep:
    """What a sweep patches: the activation ``blocks.L.<hook>`` and the axes that index one patch variant.

    ``axes`` pairs a result-axis name with the activation axis it indexes (counted after the batch axis), so
    the result has the layout ``[layer, *axis names]``, the same as the matching ``transformer_lens.patching``
    function; activation axes not named are patched whole (e.g. all positions of a head).
    """

    name: str
    hook: str
    axes: tuple[tuple[str, int], ...]
    tl_function: str | None  # the transformer_lens.patching function with the same result (None: it has none)

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"

    @property
    def layout(self) -> tuple[str, ...]:
        return ("layer", *(axis for axis, _ in self.axes))


_POS, _HEAD_VEC, _HEAD_PAT = (("pos", 0),), (("head", 1),), (("head", 0),)
SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in [
        Sweep("resid_pre", "hook_resid_pre", _POS, "get_act_patch_resid_pre"),
        Sweep("resid_mid", "hook_resid_mid", _POS, "get_act_patch_resid_mid"),
        Sweep("attn_out", "hook_attn_out", _POS, "get_act_patch_attn_out"),
        Sweep("mlp_out", "hook_mlp_out", _POS, "get_act_patch_mlp_out"),
        Sweep("head_out", "attn.hook_z", _HEAD_VEC, "get_act_patch_attn_head_out_all_pos"),
        Sweep("head_q", "attn.hook_q", _HEAD_VEC, "get_act_patch_attn_head_q_all_pos"),
        Sweep("head_k", "attn.hook_k", _HEAD_VEC, "get_act_patch_attn_head_k_all_pos"),
        Sweep("head_v", "attn.hook_v", _HEAD_VEC, "get_act_patch_attn_head_v_all_pos"),
        Sweep("head_pattern", "attn.hook_pattern", _HEAD_PAT, "get_act_patch_attn_head_pattern_all_pos"),
        Sweep("head_out_by_pos", "attn.hook_z", (("pos", 0), ("head", 1)), "get_act_patch_attn_head_out_by_pos"),
        Sweep("head_q_by_pos", "attn.hook_q", (("pos", 0), ("head", 1)), "get_act_patch_attn_head_q_by_pos"),
        Sweep("head_k_by_pos", "attn.hook_k", (("pos", 0), ("head", 1)), "get_act_patch_attn_head_k_by_pos"),
        Sweep("head_v_by_pos", "attn.hook_v", (("pos", 0), ("head", 1)), "get_act_patch_attn_head_v_by_pos"),
        Sweep("head_pattern_by_pos", "attn.hook_pattern", (("head", 0), ("dest", 1)), "get_act_patch_attn_head_pattern_by_pos"),
        Sweep(
            "head_pattern_dest_src",
            "attn.hook_pattern",
            (("head", 0), ("dest", 1), ("src", 2)),
            "get_act_patch_attn_head_pattern_dest_src_pos",
        ),
    ]
}


@dataclass
class PatchingContext:
    """Everything a sweep needs: the prompt pair, both runs' caches and their baselines.

    Sweeps patch the ``source`` run's activations into the ``base`` run (``pair``; in ``PromptSet.denoising()``, the
    clean prompts' values into the corrupted run), and normalise so that the base run is 0 and the source run 1."""

    model: object
    pair: PromptPair
    source_cache: ActivationCache
    base_cache: ActivationCache
    source_logit_diff: float
    base_logit_diff: float
    source_per_prompt: Float[Tensor, " batch"] | None = None  # per-prompt baselines, for per-template breakdowns
    base_per_prompt: Float[Tensor, " batch"] | None = None
    base_kv: KVPrefix | None = None  # the base run's keys and values: patches recompute only later positions
    forward_gflops: float | None = None  # GFLOP/s the base run's forward reached here (for estimates; None: not timed)

    @property
    def base_tokens(self) -> Int[Tensor, "batch pos"]:
        """The prompts of the run that is patched."""
        return self.pair.base

    @property
    def answer_tokens(self) -> Int[Tensor, "batch 2"]:
        return self.pair.answers

    @property
    def normalisation(self) -> NormalisationCheck:
        """Whether the source - base gap makes normalised effects meaningful (recorded with the results)."""
        return check_normalisation(self.source_logit_diff, self.base_logit_diff, warn=False)


def check_supported(model, spec: Sweep) -> None:
    """Raise ``NotSupported`` for sweeps whose activation this architecture does not have."""
    if spec.hook == "hook_resid_mid" and parallel_blocks(model.cfg):
        raise NotSupported(
            f"sweep {spec.name!r} is not supported for this architecture: attention and MLP run in parallel "
            "(GPT-J, GPT-NeoX/Pythia), so there is no residual stream between them"
        )
    hook = spec.hook_name(model.cfg.n_layers - 1)
    if spec.hook == "hook_resid_mid" and not edit_reaches_residual(model, hook):
        raise NotSupported(
            f"sweep {spec.name!r} is not supported for this architecture ({type(model.original_model).__name__}): "
            "the TransformerLens bridge passes an edited resid_mid to the MLP only and the residual stream "
            "goes on unedited, so this sweep would patch the MLP input under another name (patching all of "
            "it would not recover the clean run). Use attn_out, mlp_out or the next layer's resid_pre"
        )
    if not hook_takes_effect(model, hook):
        raise NotSupported(
            f"sweep {spec.name!r} is not supported for this architecture ({type(model.original_model).__name__}): "
            f"the TransformerLens bridge discards edits of {hook.rsplit('.', 1)[-1]} here (the attention runs inside "
            "the Hugging Face module), so patching it would report a silent zero"
        )


def layout(model, name: str) -> tuple[str, ...]:
    """Result axes of sweep ``name`` on this model: as ``SWEEPS[name].layout``, except that k and v sweeps index
    key/value groups (``kv_group``) under grouped-query attention, where one k and v serve several query heads
    (the same layout as ``transformer_lens.patching``)."""
    spec = SWEEPS[name]
    n_kv = kv_heads(model.cfg)
    if spec.hook in ("attn.hook_k", "attn.hook_v") and n_kv != model.cfg.n_heads:
        return tuple("kv_group" if axis == "head" else axis for axis in spec.layout)
    return spec.layout


def describe(model, name: str) -> dict:
    """What sweep ``name`` patches, for result files: base run, hook, source, one variant per cell of ``layout``."""
    spec = SWEEPS[name]
    return {
        "base_run": "corrupted",
        "hook": f"blocks.{{layer}}.{spec.hook}",
        "source": "clean",
        "one_variant_per": list(layout(model, name)),
        "equals": f"transformer_lens.patching.{spec.tl_function}",
    }


def unsupported_reason(model, name: str) -> str | None:
    """Why sweep ``name`` cannot run on this architecture, or None if it can."""
    try:
        check_supported(model, SWEEPS[name])
    except NotSupported as err:
        return str(err)
    return None


def supported_sweeps(model) -> list[str]:
    """Names of the sweeps this architecture has."""
    return [name for name in SWEEPS if unsupported_reason(model, name) is None]


def patching_hook_names(model) -> list[str]:
    """Every hook the sweeps read from the clean cache or start from in the corrupted cache, plus the token
    embeddings (the start of the integrated-gradients path in attribution patching)."""
    per_layer = {SWEEPS[s].hook_name(l) for s in supported_sweeps(model) for l in range(model.cfg.n_layers)}
    return resolve_hook_names(model, ["hook_embed", *sorted(per_layer)])


def make_context(
    model, prompts: PromptPair | PromptSet, extra_hooks: list[str] = (), source_hooks: list = (), warn: bool = True
) -> PatchingContext:
    """Run the pair's source and base prompts once each (``prompts``: a ``PromptPair``, or a ``PromptSet``, taken in
    its denoising direction), caching only the hooks the sweeps use (plus ``extra_hooks``, e.g. the neuron activations
    ``neurons.neuron_patching`` patches). ``source_hooks``: forward hooks applied to the source run only (e.g. noise
    on its embeddings, when the source is a noised run); ``warn``: warn when the source - base gap is too small to
    normalise by."""
    pair = as_pair(prompts)
    names = patching_hook_names(model)
    names += [n for n in (resolve_hook_names(model, list(extra_hooks)) if extra_hooks else []) if n not in names]
    with torch.no_grad():  # both runs unembed the final position only: the logit difference reads nothing else
        with model.hooks(fwd_hooks=list(source_hooks) + [UNEMBED_LAST]):
            source_logits, source_cache = model.run_with_cache(pair.source, names_filter=names)
        with model.hooks(fwd_hooks=[UNEMBED_LAST]):
            start = time.perf_counter()
            base_logits, base_cache, base_kv = run_with_kv(model, pair.base, names_filter=names)
            seconds = time.perf_counter() - start
    source_ld, base_ld = logit_diff(source_logits, pair.answers).cpu(), logit_diff(base_logits, pair.answers).cpu()
    ctx = PatchingContext(
        model=model,
        pair=pair,
        source_cache=source_cache,
        base_cache=base_cache,
        source_logit_diff=source_ld.mean().item(),
        base_logit_diff=base_ld.mean().item(),
        source_per_prompt=source_ld,
        base_per_prompt=base_ld,
        base_kv=base_kv,
        forward_gflops=run_flops(ModelShape.of(model.cfg), 0, 0, pair.base.shape[1], pair.base.shape[0]) / 1e9 / seconds,
    )
    if warn:
        check_normalisation(ctx.source_logit_diff, ctx.base_logit_diff)  # warns once, here, if the gap is too small
    return ctx


def variant_shape(sweep: Sweep, act_shape: torch.Size) -> tuple[int, ...]:
    """Number of variants along each swept axis, e.g. ``(n_pos, n_heads)`` for a by-position head sweep."""
    return tuple(act_shape[1 + axis] for _, axis in sweep.axes)


def variant_masks(sweep: Sweep, act_shape: torch.Size, variants: Int[Tensor, " variant"]) -> Bool[Tensor, "variant ..."]:
    """Masks (broadcastable over the activation's non-batch axes) that are True where variant ``i`` takes the clean value."""
    coords = torch.unravel_index(variants, variant_shape(sweep, act_shape))
    n_dims = len(act_shape) - 1
    mask = torch.ones((len(variants),) + (1,) * n_dims, dtype=torch.bool)
    for coord, (_, axis) in zip(coords, sweep.axes):
        shape = [len(variants)] + [1] * n_dims
        shape[1 + axis] = act_shape[1 + axis]
        one_hot = torch.arange(act_shape[1 + axis])[None] == coord[:, None]
        mask = mask & one_hot.reshape(shape)
    return mask


def first_changed_positions(
    sweep: Sweep, clean: Tensor, corrupted: Tensor, variants: Int[Tensor, " variant"], block: int = 4096
) -> Int[Tensor, " variant"]:
    """The earliest position at which each variant's patch changes the activation: the first position (destination,
    for patterns) where its mask selects an entry whose clean and corrupted values differ in some prompt; ``n_pos``
    where it changes nothing. Nothing before it changes, so a run recomputes only the later positions (a head patched
    at every position still changes nothing before the first corrupted token). ``block``: variants per step (memory)."""
    differs = (clean != corrupted).any(0)
    axis = position_axis(sweep.hook) - 1  # among the axes after batch
    n_pos = differs.shape[axis]
    out = []
    for part in variants.split(block):
        changes = variant_masks(sweep, clean.shape, part).to(differs.device) & differs[None]
        per_position = changes.movedim(1 + axis, 1).flatten(2).any(2)  # [variant, pos]
        out.append(torch.where(per_position.any(1), per_position.int().argmax(1), n_pos).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


RUN_COST_ROWS = 96
"""What one batched forward costs beyond its token rows, in token rows: reading every weight matrix once and the
per-call overhead (measured on 2 CPU cores at gpt2-small's size: a forward of 8 rows took as long as 90 more rows).
``variant_chunks`` weighs it against recomputing positions that a merged run does not need."""


def variant_chunks(
    model,
    variants: Int[Tensor, " variant"],
    starts: Int[Tensor, " variant"],
    n_pos: int,
    batch: int,
    memory_mb: float,
    max_variants: int | None,
) -> list[Int[Tensor, " variant"]]:
    """``variants`` in batched runs, each recomputing the positions from the earliest one its variants change
    (``starts``, from ``first_changed_positions``).

    Variants are taken in order of their first patched position and cut into runs of consecutive starts so that
    the estimated cost is least: each run costs ``RUN_COST_ROWS`` plus the token rows it computes (its variants x
    batch x positions from its earliest start), within ``memory_mb`` and ``max_variants``. A run per start recomputes
    nothing needlessly but reads the weights once per start; one run for all reads them once but recomputes
    positions that later-starting variants do not need."""
    order = torch.argsort(starts, stable=True)
    variants, starts = variants[order], starts[order]
    values, counts = torch.unique_consecutive(starts, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    best, cut = [0.0] + [math.inf] * len(values), [0] * (len(values) + 1)  # best[i]: least cost of the first i starts
    for i in range(1, len(values) + 1):
        n_var = 0
        for j in range(i - 1, -1, -1):  # a run of the starts j..i-1 recomputes from values[j]
            n_var += counts[j]
            runs = math.ceil(n_var / variants_per_chunk(model, batch, n_pos - values[j], memory_mb, max_variants))
            cost = best[j] + runs * RUN_COST_ROWS + n_var * batch * (n_pos - values[j])
            if cost < best[i]:
                best[i], cut[i] = cost, j
    bounds, i = [], len(values)
    while i > 0:
        bounds.append((cut[i], i))
        i = cut[i]
    offsets = [0, *itertools.accumulate(counts)]
    return [
        part
        for j, i in reversed(bounds)
        for part in variants[offsets[j] : offsets[i]].split(variants_per_chunk(model, batch, n_pos - values[j], memory_mb, max_variants))
    ]


def sources(ctx: PatchingContext) -> dict[str, dict[str, Tensor]]:
    """The cached runs interventions draw from (``interventions.SOURCES``)."""
    return {"source": ctx.source_cache.cache_dict, "base": ctx.base_cache.cache_dict}


def run_patched(
    ctx: PatchingContext, interventions: list[Intervention], n_var: int, record: list[str] = (), metric: Metric = LOGIT_DIFF
) -> tuple[Tensor, dict]:
    """Per-prompt ``metric`` ([variant, batch], the logit difference by default; ``engine.metrics``) of the corrupted
    run under ``interventions``, and recorded hooks; starts at the earliest intervened layer from the cached corrupted
    residual stream, and at the earliest patched position from the corrupted run's keys and values."""
    return run_interventions(
        ctx.model,
        ctx.base_tokens,
        ctx.answer_tokens,
        interventions,
        sources(ctx),
        n_var,
        base_cache=ctx.base_cache.cache_dict,
        record=record,
        prefix=ctx.base_kv,
        metric=metric,
    )


def run_patched_hook(ctx: PatchingContext, hook_name: str, masks: Bool[Tensor, "variant ..."]) -> Float[Tensor, "variant batch"]:
    """Per-prompt logit difference of each variant: corrupted run with ``hook_name`` patched from clean by mask."""
    return run_patched(ctx, [Intervention(hook_name, "source", masks)], masks.shape[0])[0]


def sweep_flops(ctx: PatchingContext, name: str, only: dict[int, Tensor] | None = None) -> int:
    """Minimal FLOPs of sweep ``name`` on this context (``only`` as in ``run_sweep``): every live variant from its own
    layer and first patched position (``sweep_plan(minimal=True)``, counted by ``flops.run_flops``), unembedding the two
    answer columns its logit difference reads; what merged runs recompute on top is not counted."""
    shape, (batch, n_pos) = ModelShape.of(ctx.model.cfg), ctx.base_tokens.shape
    plan = sweep_plan(ctx, name, minimal=True, only=only)
    return sum(run_flops(shape, run.layer, run.start, n_pos, run.n_variants * batch, columns=2) for run in plan)


ACHIEVED_FRACTION = 0.4  # of the dense matmul rate the sweeps reach on CPU (bench/results*.md: 38-78%; SmolLM2 at 64 prompts 28-49%)
_MATMUL_RATE: dict[tuple, float] = {}


def matmul_gflops(model) -> float:
    """This machine's dense matmul rate (GFLOP/s) at the model's MLP shape, measured once per process (~0.2 s)."""
    cfg = model.cfg
    key = (cfg.d_model, cfg.d_mlp, str(cfg.device))
    if key not in _MATMUL_RATE:
        a = torch.randn(512, cfg.d_model, device=cfg.device)
        b = torch.randn(cfg.d_model, cfg.d_mlp or 4 * cfg.d_model, device=cfg.device)
        a @ b  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.2:
            a @ b
            n += 1
        _MATMUL_RATE[key] = 2 * a.shape[0] * b.shape[0] * b.shape[1] * n / (time.perf_counter() - t0) / 1e9
    return _MATMUL_RATE[key]


def estimate_seconds(ctx: PatchingContext, name: str, only: dict[int, Tensor] | None = None) -> tuple[float, float]:
    """(minimal GFLOP, estimated seconds) of sweep ``name`` (``only`` as in ``run_sweep``): its FLOP count at the
    slower of ``ACHIEVED_FRACTION`` of the measured matmul rate and the rate the context's own corrupted forward reached
    (a real model's norms, attention and hooks can hold it well below the matmul rate: Gemma-3-270M's sweeps ran at
    about a fifth of the matmul rate, not half). An estimate to decide before waiting, not a promise."""
    gflop = sweep_flops(ctx, name, only) / 1e9
    rate = ACHIEVED_FRACTION * matmul_gflops(ctx.model)
    if ctx.forward_gflops:
        rate = min(rate, ctx.forward_gflops)
    return gflop, gflop / rate


LONG_SWEEP_S = 30.0  # sweeps estimated longer than this say so before they start


def sweep(
    ctx: PatchingContext,
    name: str,
    memory_mb: float = 1024,
    max_variants: int | None = None,
    progress: bool = True,
    heads: Sequence[tuple[int, int]] | None = None,
) -> Float[Tensor, "layer ..."]:
    """Normalised patching effect of every cell of sweep ``name``, laid out as ``SWEEPS[name].layout``.

    Per layer, every variant whose patch changes something runs in batched forwards from that layer on, in
    chunks that fit ``memory_mb`` (and ``max_variants``); variants where clean equals corrupted (e.g. the
    masked half of an attention pattern) are exactly 0 and are not run. ``heads``: only the cells of these
    ``(layer, head)`` pairs (every position of each; for a key/value sweep under grouped-query attention, the
    index along the ``head`` axis, i.e. the group) are computed, each exactly; every other cell is NaN.
    """
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; choose from {sorted(SWEEPS)}")
    only = None if heads is None else head_variants(ctx, SWEEPS[name], heads)
    if progress:
        check_supported(ctx.model, SWEEPS[name])
        gflop, seconds = estimate_seconds(ctx, name, only)
        if seconds > LONG_SWEEP_S:
            print(
                f"patch {name}: {gflop:,.0f} GFLOP at least, about {seconds / 60:.1f} min here (estimate from the FLOP count and "
                f"this machine's matmul rate); fewer prompts (n_prompts) or leaving the sweep out saves it",
                flush=True,
            )
    return run_sweep(ctx, SWEEPS[name], None, memory_mb, max_variants, progress, only=only)


def heads_to_sweep(all_positions: Float[Tensor, "layer head"], k: int | None) -> list[tuple[int, int]] | None:
    """The ``k`` (layer, head) cells with the largest |effect| in an all-position head sweep, for ``sweep(heads=...)``
    of its by-position form; None (every head) when ``k`` is None or covers every head."""
    if k is None or k >= all_positions.numel():
        return None
    return [(head.layer, head.head) for head in rank_heads(all_positions, k, "abs")]


def head_variants(ctx: PatchingContext, spec: Sweep, heads: Sequence[tuple[int, int]]) -> dict[int, Int[Tensor, " variant"]]:
    """Per layer, the flat indices (as ``run_sweep``'s ``only``) of the variants of ``spec`` that patch one of
    ``heads`` [(layer, index along the sweep's ``head`` axis)], at whatever else the sweep varies (e.g. every position)."""
    axes = [axis for axis, _ in spec.axes]
    if "head" not in axes:
        raise ValueError(f"sweep {spec.name!r} has no head axis (layout {spec.layout}); it cannot be restricted to heads")
    chosen: dict[int, list[int]] = {layer: [] for layer in range(ctx.model.cfg.n_layers)}
    for layer, head in heads:
        chosen[int(layer)].append(int(head))
    only = {}
    for layer, wanted in chosen.items():
        hook_name = resolve_hook_names(ctx.model, spec.hook_name(layer))[0]
        flat = torch.arange(math.prod(shape := variant_shape(spec, ctx.source_cache[hook_name].shape))).reshape(shape)
        only[layer] = flat.index_select(axes.index("head"), torch.tensor(sorted(set(wanted)), dtype=torch.long)).flatten()
    return only


def run_sweep(
    ctx: PatchingContext,
    spec: Sweep,
    layers: list[int] | None = None,
    memory_mb: float = 1024,
    max_variants: int | None = None,
    progress: bool = True,
    only: dict[int, Tensor] | None = None,
    raw: bool = False,
    groups: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "layer ..."]:
    """``sweep`` for any ``Sweep`` (also one not in ``SWEEPS``, e.g. ``neurons.NEURONS``), over ``layers`` (default
    all; result rows in that order). ``ctx`` must cache the sweep's hook for those layers. ``only``: per layer, the
    flat indices of the variants to run; the others are NaN (not computed), never a made-up 0. ``raw``: the mean
    logit difference of each variant instead of the normalised effect. ``groups`` (e.g. ``PromptSet.templates``):
    one result per group, ``[group, layer, ...]``, each averaged and normalised over its own prompts only."""
    model = ctx.model
    check_supported(model, spec)
    batch = ctx.base_tokens.shape[0]
    weights = group_weights(batch, groups)  # [batch, group]
    if groups is None:
        source_ld, base_ld = torch.tensor([ctx.source_logit_diff]), torch.tensor([ctx.base_logit_diff])
    else:
        source_ld, base_ld = ctx.source_per_prompt @ weights, ctx.base_per_prompt @ weights
    rows = []
    show = progress and os.environ.get("CIRCUIT_LAB_PROGRESS", "1") != "0"  # the batch runner sets 0 (quiet saved notebooks)
    for layer in tqdm(range(model.cfg.n_layers) if layers is None else layers, desc=f"patch {spec.name}", disable=not show, leave=False):
        hook_name, clean, variants, live, starts = _layer_variants(ctx, spec, layer)
        shape = variant_shape(spec, clean.shape)
        ld = base_ld.repeat(len(variants), 1)  # [variant, group]
        if only is not None:
            selected = torch.zeros(len(variants), dtype=torch.bool)
            selected[only[layer]] = True
            ld[~selected] = float("nan")
            live, starts = live[selected[live]], starts[selected[live]]
        for part in variant_chunks(model, live, starts, _n_pos(spec, clean), batch, memory_mb, max_variants):
            ld[part] = run_patched_hook(ctx, hook_name, variant_masks(spec, clean.shape, part)).cpu() @ weights
        ld = ld if raw else normalised(ld, source_ld, base_ld)
        rows.append(ld.T.reshape(-1, *shape))  # [group, *shape]
        release_freed_memory()  # this layer's patched runs, back to the system (helpers.engine.memory)
    result = torch.stack(rows, 1)  # [group, layer, *shape]
    return result[0] if groups is None else result


def _layer_variants(ctx: PatchingContext, spec: Sweep, layer: int) -> tuple[str, Tensor, Tensor, Tensor, Tensor]:
    """Sweep ``spec`` at ``layer``: the hook, its clean activation, every variant, the live ones (those whose patch
    changes something; the others are exactly the corrupted run) and the first position each live one changes."""
    hook_name = resolve_hook_names(ctx.model, spec.hook_name(layer))[0]
    clean, corrupted = ctx.source_cache[hook_name], ctx.base_cache[hook_name]
    variants = torch.arange(math.prod(variant_shape(spec, clean.shape)))
    first = first_changed_positions(spec, clean, corrupted, variants)
    live = first < _n_pos(spec, clean)
    return hook_name, clean, variants, variants[live], first[live]


def _n_pos(spec: Sweep, act: Tensor) -> int:
    return act.shape[position_axis(spec.hook)]


@dataclass(frozen=True)
class PlannedRun:
    """One batched forward of a sweep: ``n_variants`` copies of the corrupted batch from block ``layer``, recomputing
    positions ``>= start`` (the earliest position its variants patch)."""

    layer: int
    start: int
    n_variants: int


def sweep_plan(
    ctx: PatchingContext,
    name: str,
    memory_mb: float = 1024,
    max_variants: int | None = None,
    minimal: bool = False,
    only: dict[int, Tensor] | None = None,
) -> list[PlannedRun]:
    """The batched runs ``sweep(ctx, name)`` makes (live variants only; ``only`` as in ``run_sweep``); ``minimal``:
    instead, one entry per layer and first patched position, each variant from its own start (what the exact
    algorithm needs, for ``flops.run_flops``)."""
    spec, batch = SWEEPS[name], ctx.base_tokens.shape[0]
    plan = []
    for layer in range(ctx.model.cfg.n_layers):
        _, clean, _, live, starts = _layer_variants(ctx, spec, layer)
        if only is not None:
            keep = torch.isin(live, only[layer])
            live, starts = live[keep], starts[keep]
        if minimal:
            values, counts = starts.unique(return_counts=True)
            plan += [PlannedRun(layer, start, count) for start, count in zip(values.tolist(), counts.tolist())]
            continue
        for part in variant_chunks(ctx.model, live, starts, _n_pos(spec, clean), batch, memory_mb, max_variants):
            plan.append(PlannedRun(layer, int(starts[torch.isin(live, part)].min()), len(part)))
    return plan


def patch_everything_at(ctx: PatchingContext, name: str, layer: int, everything: bool) -> float:
    """Normalised effect of patching *all* (``everything``) or *none* of a layer's activation: 1.0 and 0.0."""
    spec = SWEEPS[name]
    hook_name = spec.hook_name(layer)
    masks = torch.full((1, *ctx.source_cache[hook_name].shape[1:]), everything, dtype=torch.bool)
    ld = run_patched_hook(ctx, hook_name, masks).mean().item()
    return float(normalised(ld, ctx.source_logit_diff, ctx.base_logit_diff))


def tl_reference(ctx: PatchingContext, name: str, cells: Int[Tensor, "cell index"] | None = None) -> Tensor:
    """The same sweep by ``transformer_lens.patching`` (one full forward per cell), for cross-checks and benchmarks.

    ``cells`` ([n, len(layout)] indices in ``SWEEPS[name].layout``) restricts it to those cells (TL's
    ``index_df``) and returns their values in that order; otherwise the whole sweep in the same layout as ours.
    """
    import pandas as pd
    from transformer_lens import patching as tlp

    spec = SWEEPS[name]
    if cells is None:
        return getattr(tlp, spec.tl_function)(ctx.model, ctx.base_tokens, ctx.source_cache, tl_metric(ctx))
    pattern = spec.hook.endswith("hook_pattern")
    setter = {
        ("pos",): tlp.layer_pos_patch_setter,
        ("head",): tlp.layer_head_pattern_patch_setter if pattern else tlp.layer_head_vector_patch_setter,
        ("pos", "head"): tlp.layer_pos_head_vector_patch_setter,
        ("head", "dest"): tlp.layer_head_pos_pattern_patch_setter,
        ("head", "dest", "src"): tlp.layer_head_dest_src_pos_pattern_patch_setter,
    }[spec.layout[1:]]
    activation = spec.hook.rsplit(".", 1)[-1].removeprefix("hook_")  # "attn.hook_z" -> "z", "hook_resid_pre" -> "resid_pre"
    return tlp.generic_activation_patch(
        ctx.model,
        ctx.base_tokens,
        ctx.source_cache,
        tl_metric(ctx),
        patch_setter=setter,
        activation_name=activation,
        index_df=pd.DataFrame(cells.cpu().numpy()),
    )


def tl_metric(ctx: PatchingContext) -> Callable[[Tensor], Tensor]:
    """The same normalised metric as a ``transformer_lens.patching`` metric function (for cross-checks)."""
    return lambda logits: normalised(logit_diff(logits, ctx.answer_tokens).mean(), ctx.source_logit_diff, ctx.base_logit_diff)
