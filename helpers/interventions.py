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
itself does; no code here steps through blocks by hand. Two exact savings make it fast:

* the blocks before ``L`` are not computed: their outputs would be discarded by ``start_at_layer``
  anyway, so they are stood in for by a pass-through for the duration of the call (the model's layer loop,
  with its per-layer masks and position embeddings, is unchanged);
* only the final position is unembedded (the metric reads nothing else).

Both are checked the first time a model starts at each layer: the fast result must equal the bridge's plain
``start_at_layer`` forward (which does run the early blocks) to 1e-5; otherwise the model falls back to the
plain forward for good, with a warning (exact, only slower).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from .hooks import recording_hook
from .metrics import logit_diff

SOURCES = ("clean", "corrupted", "mean", "zero", "recorded")
_LAYER_FREE = ("hook_embed", "hook_pos_embed")  # hooks before the first block


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


def hooks_for(interventions: Sequence[Intervention], sources: Mapping[str, Mapping[str, Tensor]], n_var: int) -> list[tuple[str, _Apply]]:
    """(hook name, hook) pairs applying ``interventions`` to ``n_var`` variants (for ``model.hooks`` or ``run_with_hooks``)."""
    return [(iv.hook, _Apply(iv, source_value(sources, iv), n_var)) for iv in interventions]


def start_layer(interventions: Sequence[Intervention], record: Sequence[str] = ()) -> int | None:
    """The earliest block any intervention or recorded hook touches; None if one acts before the first block."""
    layers = [iv.layer for iv in interventions] + [Intervention(name, "clean").layer for name in record]
    if any(layer is None for layer in layers):
        return None
    return min(layers) if layers else None


def run_interventions(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    interventions: Sequence[Intervention],
    sources: Mapping[str, Mapping[str, Tensor]],
    n_var: int,
    base_cache: Mapping[str, Tensor] | None = None,
    record: Sequence[str] = (),
) -> tuple[Float[Tensor, "variant batch"], dict[str, Tensor]]:
    """Per-prompt logit difference of ``n_var`` copies of ``tokens`` under ``interventions``, and the recorded hooks.

    With ``base_cache`` (the unintervened run of ``tokens``, holding ``blocks.L.hook_resid_pre``) the run starts
    at the earliest intervened layer L from the cached residual stream (exact: nothing before L changes);
    otherwise it runs from the tokens. ``record``: hook names whose activations (variant-major) are returned.
    """
    recorded: dict[str, Tensor] = {}
    hooks = hooks_for(interventions, sources, n_var) + [(name, recording_hook(recorded, name)) for name in record]
    layer = start_layer(interventions, record)
    with torch.no_grad():
        if layer is None or layer == 0 or base_cache is None:
            with model.hooks(fwd_hooks=hooks):
                logits = model(tokens.repeat(n_var, 1))[:, -1:]
        else:
            resid = base_cache[get_act_name("resid_pre", layer)]
            logits = forward_from_layer(model, resid.repeat(n_var, *([1] * (resid.dim() - 1))), layer, hooks)
    return logit_diff(logits, answers.repeat(n_var, 1)).reshape(n_var, -1), recorded


def forward_from_layer(model, resid: Float[Tensor, "batch pos d_model"], layer: int, hooks: list) -> Float[Tensor, "batch 1 d_vocab"]:
    """Final-position logits of the bridge's ``forward(resid, start_at_layer=layer)`` under ``hooks``, fast where verified."""
    unembed_last = [UNEMBED_LAST]
    if _fast_start_ok(model, resid, layer):
        with _skip_blocks_before(model, layer), model.hooks(fwd_hooks=hooks + unembed_last):
            return model(resid, start_at_layer=layer)
    with model.hooks(fwd_hooks=hooks):
        return model(resid, start_at_layer=layer)[:, -1:]


def _last_position(x: Tensor, hook=None) -> Tensor:
    return x[:, -1:]


UNEMBED_LAST = ("unembed.hook_in", _last_position)  # a forward hook: unembed the final position only (what metrics read)


def _fast_start_ok(model, resid: Tensor, layer: int) -> bool:
    """Whether skipping the blocks before ``layer`` and unembedding one position is exact on this model
    (checked once per model and layer against the plain ``start_at_layer`` forward)."""
    verdicts: dict = model.__dict__.setdefault("_circuit_lab_fast_start", {})
    if "all" in verdicts:
        return verdicts["all"]
    if layer not in verdicts:
        probe = resid[:2]
        with torch.no_grad():
            plain = model(probe, start_at_layer=layer)[:, -1:]
            with _skip_blocks_before(model, layer), model.hooks(fwd_hooks=[UNEMBED_LAST]):
                fast = model(probe, start_at_layer=layer)
        ok = fast.shape == plain.shape and bool((fast - plain).abs().max() <= 1e-5 * (1 + plain.abs().max()))
        verdicts[layer] = ok
        if not ok:
            verdicts["all"] = False
            warnings.warn(
                f"{type(model.original_model).__name__}: skipping the blocks before layer {layer} changed the output; "
                "falling back to the bridge's full start_at_layer forward (exact, slower)",
                stacklevel=3,
            )
    return verdicts[layer]


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
    templates: dict = model.__dict__.setdefault("_circuit_lab_block_outputs", {})
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


def hook_takes_effect(model, hook: str) -> bool:
    """Whether setting activation ``hook`` to zero changes the model's output (cached per model and hook).

    Some attention bridges compute attention inside the wrapped Hugging Face module and only *report* some
    activations afterwards (e.g. the pattern on OPT and GPT-J): an edit there is discarded, and a sweep over
    it would be a silent zero. Analyses check this before patching such a hook.
    """
    verdicts: dict = model.__dict__.setdefault("_circuit_lab_hook_effect", {})
    if hook not in verdicts:
        tokens = _probe_tokens(model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "_circuit_lab_probe_output" not in model.__dict__:  # the unedited output, computed once per model
                model.__dict__["_circuit_lab_probe_output"] = model(tokens)
            with model.hooks(fwd_hooks=[(hook, zero_activation)]):
                edited = model(tokens)
        verdicts[hook] = bool((edited - model.__dict__["_circuit_lab_probe_output"]).abs().max() > 1e-6)
    return verdicts[hook]


def _probe_tokens(model) -> Tensor:
    """A short fixed prompt for the probes below: BOS (or id 0) and four other ids."""
    bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else 0
    return torch.tensor([[bos, 5, 7, 9, 11]], device=model.cfg.device) % model.cfg.d_vocab


def edit_reaches_residual(model, hook: str) -> bool:
    """Whether an edit of ``hook`` in block L (its mid residual stream ``hook_resid_mid``, or the MLP-input fork
    ``hook_mlp_in``) reaches the residual stream itself, not only the MLP's input (cached per model and hook).

    In the TransformerLens 4 bridge the edited tensor goes to the MLP only, and the residual stream goes on with
    the unedited one: patching "resid_mid" there patches the MLP input, and patching all of it does not recover
    the clean run (TransformerLens 4's own ``get_act_patch_resid_mid`` does the same)."""
    verdicts: dict = model.__dict__.setdefault("_circuit_lab_reaches_residual", {})
    if hook not in verdicts:
        layer = int(hook.split(".")[1])
        tokens = _probe_tokens(model)
        names = [get_act_name("resid_post", layer), get_act_name("mlp_out", layer)]
        runs = []
        for hooks in ([], [(hook, lambda act, hook=None: act + 1.0)]):
            store: dict = {}
            with torch.no_grad(), model.hooks(fwd_hooks=hooks + [(n, recording_hook(store, n)) for n in names]):
                model(tokens)
            runs.append(store[names[0]] - store[names[1]])  # the residual stream without the MLP's write
        verdicts[hook] = bool((runs[1] - runs[0]).abs().max() > 1e-3)
    return verdicts[hook]


def zero_activation(act: Tensor, hook=None) -> Tensor:
    """A forward hook that sets its activation to zero."""
    return torch.zeros_like(act)
