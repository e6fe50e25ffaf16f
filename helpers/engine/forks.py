"""Per-head residual forks: each head's own copy of the residual stream at its q, k and v inputs.

Path patching into one head's query and edge-level circuits need the input of *one* receiver (a head's q, k or v)
edited while every other reader of the residual stream sees it unchanged. The bridge provides this as
``blocks.L.hook_{q,k,v}_input`` ([batch, pos, head, d_model], before ``ln1``) on attentions that can fork
(``set_use_split_qkv_input``: Llama-likes, GPT-2, Pythia, Gemma).

Where the bridge's attention cannot fork (its plain ``AttentionBridge`` hands the whole computation to Hugging Face:
OPT, GPT-J), ``split_qkv_input`` makes the same forks at the projections, with the model's own modules: the block's
residual input (what ``ln1`` reads) is copied per head, the fork's hooks run on the copies, and each head's q (k, v)
is ``ln1``'s module applied to its copy times that head's slice of the model's own q (k, v) projection weights (and
bias); the result replaces the bridge's ``attn.hook_q`` (``hook_k``, ``hook_v``), which feeds the attention. Nothing
is recomputed while no hook is on a fork. Verified once per model (``shortcuts.verified``), not assumed: with
every fork hooked by the identity, the output equals the plain forward; else ``NotImplementedError``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

from helpers.engine.capabilities import model_state, probe_tokens
from helpers.engine.shortcuts import verified

COMPONENTS = ("q", "k", "v")
SPLIT_WHERE_HOOKED = True  # the bridge's forks only in blocks with a hook on one (``_split_where_hooked``; tests turn it off)


@contextmanager
def split_qkv_input(model):
    """The per-head pre-norm q/k/v forks (``hook_{q,k,v}_input``) on for the duration, flags restored: the bridge's
    own, or made at the projections where it has none (module docstring)."""
    saved_split = bool(getattr(model.cfg, "use_split_qkv_input", False))
    saved_attn_in = bool(getattr(model.cfg, "use_attn_in", False))
    try:
        if saved_attn_in:  # the two forks exclude each other
            model.set_use_attn_in(False)
        try:
            model.set_use_split_qkv_input(True)
        except (NotImplementedError, ValueError) as err:  # the bridge's attention cannot fork
            with _projection_forks(model, err):
                yield
        else:
            try:
                if SPLIT_WHERE_HOOKED:
                    with _split_where_hooked(model):
                        yield
                else:
                    yield
            finally:
                model.set_use_split_qkv_input(saved_split)
    finally:
        if saved_attn_in:
            model.set_use_attn_in(True)


@contextmanager
def _split_where_hooked(model):
    """The bridge's q/k/v forks only in the blocks where a hook is on one of them, for the duration: every other
    block's attention runs as in the plain forward (the bridge's fork copies the residual stream per head and
    normalises each copy, about 60% more time per block on SmolLM2). The flag is read from the attention's config
    when it runs, so it is set just before each attention and restored after (configs shared by the blocks, as in
    GPT-2 and Pythia, or cloned per block, as in Llama)."""

    def before(attn, args) -> None:
        forks = (attn.hook_q_input, attn.hook_k_input, attn.hook_v_input)
        model._write_propagated_hook_flag(attn.config, "use_split_qkv_input", any(fork.has_hooks(dir="fwd") for fork in forks))

    def after(attn, args, output) -> None:
        model._write_propagated_hook_flag(attn.config, "use_split_qkv_input", True)

    handles = []
    try:
        for block in model.blocks:
            handles += [block.attn.register_forward_pre_hook(before), block.attn.register_forward_hook(after)]
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def mlp_input_fork(model):
    """The MLP-input fork (``hook_mlp_in``: the residual stream as the MLP reads it, before its norm) on for the
    duration, flag restored: the bridge's own, or, where the bridge never calls it (GPT-J's parallel block, whose MLP
    reads the attention's ``ln1`` output), made at the MLP's input: the hooks run on a copy of the block's residual
    input, and the MLP reads ``ln1`` of that copy (verified as the q/k/v forks are)."""
    saved = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    model.set_use_hook_mlp_in(True)
    try:
        if _fires(model, "blocks.0.hook_mlp_in"):
            yield
            return
        with _made_forks(model, {"mlp"}, "the bridge never calls hook_mlp_in"):
            yield
    finally:
        model.set_use_hook_mlp_in(saved)


@contextmanager
def receiver_forks(model):
    """Every receiver input an edge can enter on its own: the per-head q/k/v forks and the MLP-input fork."""
    with split_qkv_input(model), mlp_input_fork(model):
        yield


def made_forks(model) -> list[str]:
    """The receiver forks ``receiver_forks`` made itself on this model (where the bridge has none), once it has run:
    ``"q/k/v"`` (at the projections) and ``"mlp"`` (at the MLP's input)."""
    verdicts = model_state(model, "fast_paths")
    made = {kind for key, ok in verdicts.items() if ok and key[0] == "made_forks" for kind in key[1:]}
    return (["q/k/v"] if made & set(COMPONENTS) else []) + (["mlp"] if "mlp" in made else [])


def _fires(model, name: str) -> bool:
    """Whether the bridge calls hook point ``name`` in a forward (cached per model)."""
    verdicts: dict = model_state(model, "fires")
    if name not in verdicts:
        seen = []
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, lambda act, hook: seen.append(1))]):
            model(probe_tokens(model))
        verdicts[name] = bool(seen)
    return verdicts[name]


class _MlpFork:
    """Forward pre-hook on the MLP: its input from the MLP-input fork of the block's residual input, through ``ln1``
    (a parallel block's shared norm), when a hook is on the fork (else untouched)."""

    def __init__(self, model, layer: int, inputs: dict[int, Tensor]):
        block = model.blocks[layer]
        self.fork, self.layer, self.inputs = block.hook_mlp_in, layer, inputs
        self.norm = getattr(block.ln1, "_original_component", block.ln1)

    def __call__(self, act: Tensor, hook=None) -> Tensor | None:
        if not self.fork.has_hooks(dir="fwd"):
            return None
        return self.norm(self.fork(self.inputs[self.layer])).to(act.dtype)


class _ProjectionFork:
    """Forward hook on ``blocks.L.attn.hook_{c}``: each head's ``c`` from its own fork of the block's residual input,
    when a hook is on the fork (else the bridge's value, untouched)."""

    def __init__(self, model, layer: int, component: str, inputs: dict[int, Tensor]):
        attn = model.blocks[layer].attn
        self.fork = getattr(attn, f"hook_{component}_input")
        self.norm = getattr(model.blocks[layer].ln1, "_original_component", model.blocks[layer].ln1)
        projection = getattr(attn, component)
        self.projection = getattr(projection, "original_component", None) or projection  # the Hugging Face Linear
        self.layer, self.inputs = layer, inputs

    def __call__(self, act: Tensor, hook=None) -> Tensor | None:
        if not self.fork.has_hooks(dir="fwd"):
            return None
        batch, pos, n, d_head = act.shape  # n: query heads, or key/value heads
        resid = self.inputs[self.layer]
        forked = self.fork(resid[:, :, None].expand(batch, pos, n, resid.shape[-1]).contiguous())
        weight = self.projection.weight.reshape(n, d_head, -1)
        out = torch.einsum("bphd,hkd->bphk", self.norm(forked), weight.to(forked.dtype))
        bias = getattr(self.projection, "bias", None)
        if bias is not None:
            out = out + bias.reshape(n, d_head).to(out.dtype)
        return out.to(act.dtype)


@contextmanager
def _projection_forks(model, why: Exception):
    """The q/k/v forks made at the projections for the duration (verified once per model; module docstring)."""
    with _made_forks(model, set(COMPONENTS), str(why)):
        saved = bool(getattr(model.cfg, "use_split_qkv_input", False))  # True when nested in another made fork
        model.cfg._set_bridge_managed_hook_flag("use_split_qkv_input", True)  # the fork names take hooks now
        try:
            yield
        finally:
            model.cfg._set_bridge_managed_hook_flag("use_split_qkv_input", saved)


@contextmanager
def _made_forks(model, kinds: set[str], why: str):
    """Hooks that make the forks of ``kinds`` (``q``/``k``/``v`` at the projections, ``mlp`` at the MLP's input) from
    the block's residual input, for the duration; ``NotImplementedError`` unless, with every such fork hooked by the
    identity, the output equals the plain forward (checked once per model and kinds)."""
    active: set = model_state(model, "made_forks", set)
    key = ("made_forks", *sorted(kinds))
    if key in active:  # nested (e.g. path patching inside an edge run): the outer forks serve
        yield
        return
    inputs: dict[int, Tensor] = {}

    def recorder(layer: int):
        def record(act: Tensor, hook=None) -> None:
            inputs[layer] = act

        return record

    try:
        hooks = []
        for layer, block in enumerate(model.blocks):
            hooks.append((block.ln1.hook_in, recorder(layer), False))
            hooks += [(getattr(block.attn, f"hook_{c}"), _ProjectionFork(model, layer, c, inputs), True) for c in COMPONENTS if c in kinds]
            if "mlp" in kinds:
                hooks.append((block.mlp.hook_in, _MlpFork(model, layer, inputs), True))
    except AttributeError as err:
        raise NotImplementedError(f"{why}; nor can the forks be made from the block's modules ({err})") from None
    with ExitStack() as stack:
        for point, fn, prepend in hooks:
            handle = point.add_hook(fn, is_permanent=True, prepend=prepend)  # before the caller's own hooks there
            stack.callback(_remove, point, handle)
        names = [f"blocks.{layer}.hook_{c}_input" for layer in range(model.cfg.n_layers) for c in COMPONENTS if c in kinds]
        names += [f"blocks.{layer}.hook_mlp_in" for layer in range(model.cfg.n_layers) if "mlp" in kinds]
        flag = "use_split_qkv_input" if kinds & set(COMPONENTS) else None
        if flag:
            model.cfg._set_bridge_managed_hook_flag(flag, True)
        try:
            ok = verified(model, key, lambda: _identity_forks(model, names), lambda: model(probe_tokens(model)), "", warn=False)
        finally:
            if flag:
                model.cfg._set_bridge_managed_hook_flag(flag, False)
        if not ok:
            raise NotImplementedError(f"{why}; and forks made from the block's modules do not reproduce the model's forward")
        active.add(key)
        stack.callback(active.discard, key)
        yield


def _identity_forks(model, names: list[str]) -> Tensor:
    """The probe's output with every fork in ``names`` hooked by the identity, so that each is made and read."""
    with model.hooks(fwd_hooks=[(name, lambda act, hook: act) for name in names]):
        return model(probe_tokens(model))


def _remove(point, handle) -> None:
    handle.hook.remove()
    if handle in point.fwd_hooks:
        point.fwd_hooks.remove(handle)
