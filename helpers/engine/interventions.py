"""Interventions as values, and the one runner that applies them through the model's own forward pass.

An ``Intervention`` says *what* activation is set (a hook name), *where* (a boolean mask over the
activation's non-batch axes, one row per variant), and *from which source*: the clean or corrupted run, a
mean, zero, or activations recorded in an earlier run. Every experiment in this package (activation and
path patching, knockout of everything outside a circuit, attention shift, backup-head ablation) is a list of
these values, so what was patched can be printed and stored with the results (``to_json``).

``run_interventions`` applies a list of them to many variants at once: variant ``i`` is one copy of the base
batch, stacked along the batch axis (variant-major). It starts at the earliest intervened layer from the
base run's cached residual stream, through the bridge's own ``forward(resid, start_at_layer=L)`` — RoPE,
causal and sliding-window masks, parallel blocks, post-norms and soft-capping are whatever the model
itself does; no code here steps through blocks by hand. It computes only what a patch can change:

* **layers**: the blocks before ``L`` are not computed: their outputs would be discarded by
  ``start_at_layer`` anyway, so they are stood in for by a pass-through for the duration of the call (the
  model's layer loop, with its per-layer masks and position embeddings, is unchanged);
* **positions**: attention is causal, so a patch whose earliest patched position is ``p`` changes nothing
  at positions before ``p``. With the base run's keys and values (``KVPrefix``, the model's own Hugging Face
  KV cache) only positions ``>= p`` are recomputed, the way generation extends a prompt: the model derives
  the rotary offsets, causal and sliding-window masks from the cache length, and grouped-query caches keep
  their key/value groups;
* **the last block** runs its MLP at the final position only (its other positions are read by nothing),
  unless a hook acts on or after that MLP;
* **the unembedding** reads the final position only (the metric reads nothing else), and where the only output
  is a logit difference, only the answers' vocabulary columns (``answer_columns``: on Gemma-3, 262,144 words,
  the full unembedding costs more per token than a block).

Each saving is checked the first time a model uses it (per start layer): the fast result must equal the
plain computation (the bridge's own ``start_at_layer`` forward, all positions, every block) to 1e-5;
otherwise that model falls back to the plain computation for good, with a warning (exact, only slower).
``fast_paths(model)`` lists the verdicts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.capabilities import architecture, model_state, probe_tokens
from helpers.engine.hooks import UNEMBED_LAST, last_position, recording_hook
from helpers.engine.metrics import logit_diff

SOURCES = ("clean", "corrupted", "mean", "zero", "recorded")


@dataclass(eq=False)
class Intervention:
    """Set activation ``hook`` to ``source`` values where ``mask`` is True.

    ``mask``: [variant, *activation axes without batch] (axes of size 1 broadcast), True where variant i takes
    the source value; ``None`` = everywhere, in every variant. ``source`` is one of ``SOURCES``; its values
    for ``hook`` come from the ``sources`` mapping given to the runner: [1, ...] (a mean or zero, the same for
    every prompt), [batch, ...] (per prompt) or [variant * batch, ...] (recorded per variant).
    """

    hook: str
    source: str
    mask: Bool[Tensor, "variant ..."] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"intervention source must be one of {SOURCES}, not {self.source!r}")

    @property
    def layer(self) -> int | None:
        """The block the hooked activation belongs to (None for embeddings)."""
        parts = self.hook.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    @property
    def n_variants(self) -> int | None:
        return None if self.mask is None else self.mask.shape[0]

    def __repr__(self) -> str:
        where = "everywhere" if self.mask is None else f"{self.mask.shape[0]} variants x {list(self.mask.shape[1:])} mask"
        return f"Intervention({self.hook} <- {self.source}, {where})"

    def to_json(self) -> dict:
        """What was patched, for result files: hook, source, and per variant the number of entries set."""
        out: dict = {"hook": self.hook, "source": self.source}
        if self.mask is not None:
            out["mask_shape"] = list(self.mask.shape)
            out["entries_set_per_variant"] = self.mask.flatten(1).sum(1).tolist()
        return out

    def first_position(self, n_pos: int, changes: Bool[Tensor, "*axes"] | None = None) -> int:
        """The earliest position this intervention changes in any variant (``n_pos`` if none): nothing it does can
        change an activation at an earlier position. ``changes`` (activation axes without batch): where its source
        differs from the activation it replaces in some prompt; setting an entry to the value it already has changes
        nothing. Without it, every entry the mask selects counts as changed."""
        sets = torch.ones(1, dtype=torch.bool) if self.mask is None else self.mask
        if changes is not None:
            sets = sets & changes[None].to(sets.device)
        axis = position_axis(self.hook)
        if sets.dim() <= axis or sets.shape[axis] == 1:  # broadcast over positions: every position
            return 0 if bool(sets.any()) else n_pos
        hit = sets.movedim(axis, 0).flatten(1).any(1).nonzero()
        return int(hit[0]) if len(hit) else n_pos

    def from_position(self, start: int) -> Intervention:
        """This intervention on a run that computes positions ``>= start`` only (its mask cut to those positions)."""
        if start == 0 or self.mask is None:
            return self
        return Intervention(self.hook, self.source, from_position(self.mask, self.hook, start))

    def apply(self, act: Tensor, value: Tensor, n_var: int) -> Tensor:
        """``act`` ([n_var * batch, ...], variant-major) with this intervention's entries taken from ``value``."""
        batch = act.shape[0] // n_var
        act = act.reshape(n_var, batch, *act.shape[1:])
        value = value.to(act.dtype)
        value = value.reshape(n_var, batch, *value.shape[1:]) if value.shape[0] == n_var * batch and n_var > 1 else value[None]
        if self.mask is None:
            out = value.expand_as(act)
        else:
            mask = self.mask.to(act.device)
            mask = mask.reshape(mask.shape[0], 1, *mask.shape[1:])
            out = torch.where(mask, value, act)
        return out.reshape(n_var * batch, *act.shape[2:])


def position_axis(hook: str) -> int:
    """The axis of ``hook``'s activation (batch first) indexed by the position it is computed at: the destination
    (query) axis of attention patterns and scores ``[batch, head, dest, src]``, axis 1 of everything else."""
    return 2 if hook.endswith(("hook_pattern", "hook_attn_scores")) else 1


def from_position(values: Tensor, hook: str, start: int) -> Tensor:
    """``values`` of activation ``hook`` (or a mask over it, variant-first) at positions ``>= start`` only; an axis of
    size 1 broadcasts over positions and is kept."""
    axis = position_axis(hook)
    if start == 0 or values.dim() <= axis or values.shape[axis] == 1:
        return values
    return values.narrow(axis, start, values.shape[axis] - start)


def suffix_start(
    interventions: Sequence[Intervention],
    n_pos: int,
    sources: Mapping[str, Mapping[str, Tensor]] | None = None,
    base_cache: Mapping[str, Tensor] | None = None,
) -> int:
    """The earliest position any of ``interventions`` changes (at most ``n_pos - 1``): positions before it are unchanged.

    With ``sources`` and ``base_cache`` (the unintervened run), an entry set to the value it has in the base run does
    not count: e.g. a head's clean output patched at every position changes nothing before the first corrupted token.
    (Exact: positions before the earliest change keep their base values in every activation, so there each
    intervention sets an entry to the value it already has.)"""
    return min([iv.first_position(n_pos, _changes(iv, sources, base_cache)) for iv in interventions] + [n_pos - 1])


def _changes(iv: Intervention, sources, base_cache) -> Tensor | None:
    """Where ``iv``'s source differs from the base run's activation in some prompt (None where that is not known: the
    hook is not cached, or the source is recorded per variant)."""
    if sources is None or base_cache is None or iv.hook not in base_cache:
        return None
    base = base_cache[iv.hook]
    value = source_value(sources, iv, like=base)
    if value.shape[0] not in (1, base.shape[0]) or value.shape[1:] != base.shape[1:]:
        return None
    return (value != base).any(0)


class _Apply:
    """Forward hook applying one intervention with its resolved value (a small object, not a closure)."""

    def __init__(self, intervention: Intervention, value: Tensor, n_var: int):
        self.intervention, self.value, self.n_var = intervention, value, n_var

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        return self.intervention.apply(act, self.value, self.n_var)


def source_value(sources: Mapping[str, Mapping[str, Tensor]], intervention: Intervention, like: Tensor | None = None) -> Tensor:
    """The tensor ``intervention`` draws from; ``zero`` needs ``like`` (an activation of that hook) for its shape."""
    if intervention.source == "zero":
        if intervention.hook in sources.get("zero", {}):
            return sources["zero"][intervention.hook]
        if like is None:
            like = next(
                (sources[s][intervention.hook] for s in ("corrupted", "clean") if s in sources and intervention.hook in sources[s]), None
            )
        if like is None:
            raise KeyError(f"zero source for {intervention.hook}: no cached activation of that hook to take the shape from")
        return torch.zeros_like(like[:1])
    try:
        return sources[intervention.source][intervention.hook]
    except KeyError:
        raise KeyError(f"no {intervention.source!r} values for hook {intervention.hook}") from None


def hooks_for(
    interventions: Sequence[Intervention], sources: Mapping[str, Mapping[str, Tensor]], n_var: int, start: int = 0
) -> list[tuple[str, _Apply]]:
    """(hook name, hook) pairs applying ``interventions`` to ``n_var`` variants (for ``model.hooks`` or ``run_with_hooks``);
    ``start``: the run computes positions ``>= start`` only (masks and source values are cut to match)."""
    return [
        (iv.hook, _Apply(iv.from_position(start), from_position(source_value(sources, iv), iv.hook, start), n_var)) for iv in interventions
    ]


def start_layer(interventions: Sequence[Intervention], record: Sequence[str] = ()) -> int | None:
    """The earliest block any intervention or recorded hook touches; None if one acts before the first block."""
    layers = [iv.layer for iv in interventions] + [Intervention(name, "clean").layer for name in record]
    if any(layer is None for layer in layers):
        return None
    return min(layers) if layers else None


@dataclass(eq=False)
class KVPrefix:
    """The keys and values every attention layer computed in a base run, as the model's own Hugging Face KV cache
    holds them (per layer ``[batch, kv_head, pos, d_head]``: after rotary embeddings, one per key/value group).

    A run that changes nothing before position ``start`` takes positions ``< start`` from here and recomputes
    positions ``>= start`` only (``cache``): exact, because attention is causal.
    """

    keys: list[Float[Tensor, "batch kv_head pos d_head"]]
    values: list[Float[Tensor, "batch kv_head pos d_head"]]

    @property
    def n_pos(self) -> int:
        return self.keys[0].shape[2]

    def __repr__(self) -> str:
        batch, n_kv, n_pos, d_head = self.keys[0].shape
        return f"KVPrefix({len(self.keys)} layers x {batch} prompts x {n_pos} positions, {n_kv} key/value heads of {d_head})"

    def cache(self, start: int, n_var: int = 1, n_prompts: int | None = None):
        """A fresh Hugging Face cache of positions ``< start`` of every layer, for ``n_var`` copies of the batch
        (variant-major; ``n_prompts``: of its first prompts only); the forward that receives it extends it in place,
        so every run gets its own."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k, v = k[:n_prompts, :, :start], v[:n_prompts, :, :start]
            cache.update(k.repeat(n_var, 1, 1, 1), v.repeat(n_var, 1, 1, 1), layer)
        return cache


def run_with_kv(model, tokens: Int[Tensor, "batch pos"], **kwargs) -> tuple[Tensor, object, KVPrefix | None]:
    """``model.run_with_cache(tokens, **kwargs)`` that also keeps the run's keys and values (the model fills the Hugging
    Face cache it is handed, in the same forward): logits, activation cache, and the ``KVPrefix`` (None, with a
    warning, where the model leaves the cache empty; patches then recompute every position)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with _quiet_cache_rename():
        logits, activations = model.run_with_cache(tokens, past_key_values=cache, **kwargs)
    prefix = KVPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]) if cache.layers else None
    if prefix is None or len(prefix.keys) != model.cfg.n_layers or any(k.shape[:3:2] != tokens.shape for k in prefix.keys):
        shapes = [] if prefix is None else [tuple(k.shape) for k in prefix.keys]
        warnings.warn(f"{architecture(model)}: no usable key/value cache ({shapes}); patches recompute every position", stacklevel=2)
        return logits, activations, None
    return logits, activations, prefix


def run_interventions(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    interventions: Sequence[Intervention],
    sources: Mapping[str, Mapping[str, Tensor]],
    n_var: int,
    base_cache: Mapping[str, Tensor] | None = None,
    record: Sequence[str] = (),
    prefix: KVPrefix | None = None,
) -> tuple[Float[Tensor, "variant batch"], dict[str, Tensor]]:
    """Per-prompt logit difference of ``n_var`` copies of ``tokens`` under ``interventions``, and the recorded hooks.

    With ``base_cache`` (the unintervened run of ``tokens``, holding ``blocks.L.hook_resid_pre``) the run starts
    at the earliest intervened layer L from the cached residual stream (exact: nothing before L changes);
    otherwise it runs from the tokens. With ``prefix`` (the same run's keys and values) it also recomputes only
    the positions from the earliest one any intervention changes (exact by causality), unless hooks are recorded
    (they are returned for every position). ``record``: hook names whose activations (variant-major) are returned.
    """
    recorded: dict[str, Tensor] = {}
    record_hooks = [(name, recording_hook(recorded, name)) for name in record]
    layer = start_layer(interventions, record)
    resid_name = None if layer is None else get_act_name("resid_pre", layer)
    with torch.no_grad(), answer_columns(model, answers) as columns:
        if base_cache is None or resid_name not in base_cache:
            with model.hooks(fwd_hooks=hooks_for(interventions, sources, n_var) + record_hooks + [UNEMBED_LAST]):
                logits = model(tokens.repeat(n_var, 1))
        else:
            resid = base_cache[resid_name]
            start = 0 if prefix is None or record else suffix_start(interventions, resid.shape[1], sources, base_cache)
            if start and not suffix_ok(model, resid, layer, prefix):
                start = 0
            hooks = hooks_for(interventions, sources, n_var, start) + record_hooks
            past = prefix.cache(start, n_var) if start else None
            logits = forward_from_layer(model, resid[:, start:].repeat(n_var, 1, 1), layer, hooks, past)
    return logit_diff(logits, columns.repeat(n_var, 1)).reshape(n_var, -1), recorded


def forward_from_layer(
    model, resid: Float[Tensor, "batch pos d_model"], layer: int, hooks: list, past=None
) -> Float[Tensor, "batch 1 d_vocab"]:
    """Final-position logits of the bridge's ``forward(resid, start_at_layer=layer)`` under ``hooks``, fast where verified.

    ``past``: a Hugging Face cache of the positions before ``resid`` (``KVPrefix.cache``); ``resid`` then holds the
    residual stream of the later positions only."""
    kwargs = {} if past is None else {"past_key_values": past}
    if not _fast_start_ok(model, resid, layer):
        with model.hooks(fwd_hooks=hooks), _quiet_cache_rename():
            return model(resid, start_at_layer=layer, **kwargs)[:, -1:]
    shortcuts = [UNEMBED_LAST]
    if not _acts_on_last_mlp_or_later(model, hooks) and _last_mlp_ok(model):
        shortcuts.append(_last_mlp_at_final_position(model))
    with _skip_blocks_before(model, layer), model.hooks(fwd_hooks=hooks + shortcuts), _quiet_cache_rename():
        return model(resid, start_at_layer=layer, **kwargs)


def logits_from_layer(model, resid: Float[Tensor, "batch pos d_model"], layer: int, hooks: list) -> Float[Tensor, "batch pos d_vocab"]:
    """Every position's logits of the bridge's ``forward(resid, start_at_layer=layer)`` under ``hooks`` (for metrics
    that read them all, e.g. a sequence loss), without computing the blocks before ``layer`` where that is verified
    exact on this model (once per start layer, against the plain forward; see the module docstring)."""

    def fast(probe: Tensor) -> Tensor:
        with _skip_blocks_before(model, layer):
            return model(probe, start_at_layer=layer)

    probe = resid[:2]
    skip = layer > 0 and _verified(
        model,
        ("skip_blocks_all_positions", layer),
        lambda: fast(probe),
        lambda: model(probe, start_at_layer=layer),
        f"skipping the blocks before layer {layer} changed the output",
    )
    with model.hooks(fwd_hooks=hooks):
        return fast(resid) if skip else model(resid, start_at_layer=layer)


@contextmanager
def _quiet_cache_rename():
    """Silence transformers' notice that ``past_key_values`` is renamed ``cache`` (5.24+): the bridge passes it on under
    the old name, and whether the cache takes effect is checked by ``suffix_ok``, not assumed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


class _Columns(torch.nn.Module):
    """A linear unembedding restricted to some vocabulary columns (rows of its weight); ``full`` is the whole one."""

    def __init__(self, linear: torch.nn.Linear, columns: Tensor):
        super().__init__()
        self.weight = linear.weight[columns].detach()  # gradients flow to the activations, never to the weights
        self.bias = None if linear.bias is None else linear.bias[columns].detach()
        self.full = (linear,)  # a tuple: not a submodule, so its parameters are not listed twice

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextmanager
def answer_columns(model, answers: Int[Tensor, "batch 2"]):
    """For the duration, the model's unembedding computes only the vocabulary columns of ``answers`` (the words a
    logit difference reads); yields ``answers`` as indices into those columns. Each column's logit is the same dot
    product as before (an elementwise soft-capping after it too), so a logit difference is unchanged, while the rest
    of the vocabulary is neither computed nor held. Only for runs whose sole output is a logit difference (not the
    loss, KL or top tokens). Checked once per model (``fast_paths``: ``answer_columns``); where it is not exact, or the
    unembedding is not a plain linear layer, nothing changes and ``answers`` come back as they are."""
    unembed = getattr(model, "unembed", None)
    current = getattr(unembed, "_original_component", None)
    linear = current.full[0] if isinstance(current, _Columns) else current  # inside another answer_columns: its full layer
    if not isinstance(linear, torch.nn.Linear):
        yield answers
        return
    columns = torch.unique(answers.cpu()).to(linear.weight.device)
    restricted = _Columns(linear, columns)
    probe = torch.randn(2, 1, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight)
    if not _verified(
        model,
        ("answer_columns",),
        lambda: restricted(probe),
        lambda: linear(probe)[..., columns],
        "unembedding only the answers' columns changed their logits",
    ):
        with _full_vocabulary(model):
            yield answers
        return
    unembed._original_component = restricted
    try:
        yield torch.searchsorted(columns, answers.to(columns.device)).to(answers.device)
    finally:
        unembed._original_component = current


@contextmanager
def _full_vocabulary(model):
    """The whole unembedding for the duration, also inside ``answer_columns`` (checks compare full outputs)."""
    unembed = getattr(model, "unembed", None)
    current = getattr(unembed, "_original_component", None)
    if not isinstance(current, _Columns):
        yield
        return
    unembed._original_component = current.full[0]
    try:
        yield
    finally:
        unembed._original_component = current


def fast_paths(model) -> dict:
    """The savings checked on this model so far and whether each was exact (key: saving, start layer)."""
    return dict(model_state(model, "fast_paths"))


def _verified(model, key: tuple, fast: Callable[[], Tensor], plain: Callable[[], Tensor], what: str, warn: bool = True) -> bool:
    """Whether ``fast()`` equals ``plain()`` (to 1e-5 of its scale in float32) on this model, checked once per ``key``; a failure
    (or an error in ``fast``) switches that saving off for good, with a warning that says ``what`` changed."""
    verdicts: dict = model_state(model, "fast_paths")
    if key not in verdicts:
        with torch.no_grad(), _full_vocabulary(model):
            reference = plain()
            error = ""
            try:
                out = fast()
                tolerance = max(1e-5, 16 * torch.finfo(reference.dtype).eps)  # float32: 1e-5; half precision: its own rounding
                ok = out.shape == reference.shape and bool((out - reference).abs().max() <= tolerance * (1 + reference.abs().max()))
            except Exception as err:  # noqa: BLE001 - e.g. a block that reshapes with the full sequence length: said below
                ok, error = False, f" ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        verdicts[key] = ok
        if not ok and warn:
            warnings.warn(f"{architecture(model)}: {what}{error}; falling back to the plain computation (exact, slower)", stacklevel=4)
    return verdicts[key]


def _fast_start_ok(model, resid: Tensor, layer: int) -> bool:
    """Whether skipping the blocks before ``layer`` and unembedding one position is exact on this model
    (checked once per model and layer against the plain ``start_at_layer`` forward)."""
    probe = resid[:2]

    def fast() -> Tensor:
        with _skip_blocks_before(model, layer), model.hooks(fwd_hooks=[UNEMBED_LAST]):
            return model(probe, start_at_layer=layer)

    return _verified(
        model,
        ("skip_blocks", layer),
        fast,
        lambda: model(probe, start_at_layer=layer)[:, -1:],
        f"skipping the blocks before layer {layer} changed the output",
    )


def suffix_ok(model, resid: Float[Tensor, "batch pos d_model"], layer: int, prefix: KVPrefix, setting: str = "") -> bool:
    """Whether recomputing only the later positions, with the earlier ones' cached keys and values, equals
    recomputing every position on this model (checked once per model and start layer, on two prompts from the
    middle position); ``setting`` names a context the caller runs in (e.g. receiver forks), verified separately."""
    probe, start = resid[:2], resid.shape[1] // 2
    return _verified(
        model,
        ("suffix", layer, setting) if setting else ("suffix", layer),
        lambda: forward_from_layer(model, probe[:, start:], layer, [], prefix.cache(start, 1, len(probe))),
        lambda: forward_from_layer(model, probe, layer, []),
        f"recomputing only the positions after a patch (earlier keys and values cached) from layer {layer} changed the output",
    )


_BEFORE_THE_MLP = ("hook_resid_pre", "hook_in", "hook_attn_out", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


def _acts_on_last_mlp_or_later(model, hooks: list) -> bool:
    """Whether any of ``hooks`` acts on the last block's MLP or anything after it (then that MLP runs at every position)."""
    last = f"blocks.{model.cfg.n_layers - 1}."
    for name, _ in hooks:
        if not isinstance(name, str) or name.startswith(("ln_final", "unembed")):
            return True
        if name.startswith(last):
            rest = name[len(last) :]
            if rest not in _BEFORE_THE_MLP and not rest.startswith(("attn.", "ln1.", "ln1_post.")):
                return True
    return False


def _last_mlp_at_final_position(model) -> tuple[str, Callable]:
    """A forward hook: the last block's MLP reads its final position only (its write broadcasts onto the residual
    stream; the other positions of the last block's output are read by nothing)."""
    return (f"blocks.{model.cfg.n_layers - 1}.mlp.hook_in", last_position)


def _last_mlp_ok(model) -> bool:
    """Whether the last block's MLP at the final position only leaves the final logits exact (checked once per model;
    no warning: some blocks reshape by the full sequence length, e.g. OPT, and keep the full MLP)."""
    tokens = probe_tokens(model)

    def fast() -> Tensor:
        with model.hooks(fwd_hooks=[_last_mlp_at_final_position(model), UNEMBED_LAST]):
            return model(tokens)

    return _verified(model, ("last_mlp",), fast, lambda: model(tokens)[:, -1:], "", warn=False)


@contextmanager
def _skip_blocks_before(model, layer: int):
    """Stand in a pass-through for blocks ``0..layer-1`` (their output is replaced at ``layer`` anyway)."""
    skipped = list(model.blocks[:layer])
    stand_ins = [_PassThrough(_output_template(model, block)) for block in skipped]
    before = [block.__dict__.get("forward") for block in skipped]
    for block, stand_in in zip(skipped, stand_ins):
        block.__dict__["forward"] = stand_in  # the instance attribute shadows the class's forward (bridge __setattr__ bypassed)
    try:
        yield
    finally:
        for block, old in zip(skipped, before):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = old


class _PassThrough:
    """A block's stand-in: returns its hidden-state input in the structure the real block returns."""

    def __init__(self, template: tuple | None):
        self.template = template

    def __call__(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if self.template is None else (hidden, *self.template[1:])


def _output_template(model, block) -> tuple | None:
    """None if ``block`` returns a tensor, else one real output tuple of it (measured once per model)."""
    templates: dict = model_state(model, "block_outputs")
    key = id(block)
    if key not in templates:
        seen: list = []
        handle = block.register_forward_hook(lambda mod, args, out: seen.append(out))
        try:
            with torch.no_grad():
                bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else 0
                model(torch.tensor([[bos, bos]], device=model.cfg.device))
        finally:
            handle.remove()
        templates[key] = tuple(seen[0]) if isinstance(seen[0], tuple) else None
    return templates[key]
