"""What an architecture can do, and what this package has measured about a loaded model: the one place for
"does this architecture support X" facts and probes. The methods' gates (``methods.patching.check_supported``,
``methods.edges.unsupported_reason``, ``methods.importance``) compose them into their own refusals.

* ``NotSupported``: an analysis that does not exist for an architecture (raised before any work, with the reason);
* ``architecture`` / ``kv_heads`` / ``parallel_blocks`` / ``position_embeddings``: the configuration facts every
  "is this supported" question starts from; ``decomposition_caveats`` (why DLA is not exact here) and
  ``check_positional`` (positional QK circuits need position embeddings) are read from them;
* the probes, measured on the loaded model and cached per model and hook: ``hook_takes_effect`` (is an edit of this
  hook kept, or does the bridge discard it) and ``edit_reaches_residual`` (does an edit of a mid-block hook reach the
  residual stream or only the MLP), on ``probe_tokens``;
* ``model_state``: one store per loaded model for the verdicts of the probes (does a hook fire, does a shortcut
  reproduce the plain forward, which receiver forks were made) and what they reuse. It lives beside the model, not in
  its ``__dict__``, and goes with it (weak keys).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.hooks import recording_hook, zero_activation

_STATE: WeakKeyDictionary = WeakKeyDictionary()


class NotSupported(ValueError):
    """An analysis that does not exist for this architecture (e.g. resid_mid with parallel attention and MLP)."""


def architecture(model) -> str:
    """The Hugging Face class the bridge wraps (e.g. ``LlamaForCausalLM``), or the model's own class."""
    return type(getattr(model, "original_model", model)).__name__


def kv_heads(cfg) -> int:
    """Key/value heads per layer: fewer than the query heads under grouped-query attention, else as many."""
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads


def parallel_blocks(cfg) -> bool:
    """Attention and MLP read the same residual stream in parallel (GPT-J, GPT-NeoX/Pythia): no mid residual."""
    return bool(getattr(cfg, "parallel_attn_mlp", False))


def position_embeddings(cfg) -> bool:
    """The model adds learned or sinusoidal position embeddings to the residual stream (not rotary / ALiBi)."""
    return getattr(cfg, "positional_embedding_type", "standard") == "standard"


def decomposition_caveats(model) -> dict[str, str]:
    """Why DLA is not an exact decomposition on this architecture, keyed by what it affects ('layers'); empty when
    it is exact. (Post-norms are not a caveat: their scales are frozen, ``frozen_scales``.)"""
    caveats: dict[str, str] = {}
    cap = getattr(model.cfg, "output_logits_soft_cap", 0) or 0
    if cap > 0:
        caveats["layers"] = (
            f"final logits are soft-capped (tanh, cap {cap}): the logit difference is not linear in the residual "
            "stream, so component contributions only approximate it"
        )
    return caveats


def check_dense_mlp(model) -> None:
    """Raise ``NotSupported`` unless every block's MLP is one dense layer of neurons with an output matrix (``W_out``):
    a mixture of experts (Mixtral, Qwen-MoE, OLMoE) routes each token through some experts' own neurons, so there is
    no one neuron basis for the layer to attribute, patch or read."""
    mlp = model.blocks[0].mlp
    try:
        w_out = mlp.W_out
    except AttributeError:
        w_out = None
    if w_out is None or "blocks.0.mlp.hook_post" not in model.hook_dict:
        raise NotSupported(
            f"neuron analyses are not supported for this architecture ({architecture(model)}): its MLP "
            f"({type(mlp).__name__}) is not one dense layer of neurons (e.g. a mixture of experts); the MLP-level "
            "results (mlp_out patching, DLA per layer) still apply"
        )


def check_positional(model) -> None:
    """Raise ``NotSupported`` unless the model adds learned or sinusoidal position embeddings to the residual stream."""
    if not position_embeddings(model.cfg):
        kind = model.cfg.positional_embedding_type
        raise NotSupported(
            f"positional QK circuits read the positional embeddings; this model has {kind!r} positions "
            "(no embedding to read): use the previous-token score on repeated random tokens (induction_checks)"
        )


def model_state(model, name: str, factory: Callable[[], Any] = dict) -> Any:
    """The store ``name`` of this loaded model (``factory()`` on first use): e.g. ``"fast_paths"``, the verdicts of
    the shortcuts checked on it (``shortcuts.verified``)."""
    stores = _STATE.setdefault(model, {})
    if name not in stores:
        stores[name] = factory()
    return stores[name]


def forget(model, name: str) -> Any:
    """Drop the store ``name`` of this model (the next use starts empty: every probe is made again); returns it."""
    return _STATE.get(model, {}).pop(name, None)


def probe_tokens(model) -> Tensor:
    """Two short fixed prompts for the probes: BOS (or id 0) and four other ids. Two, so that a probe also catches
    code that only works for one prompt (e.g. a reshape that broadcasts correctly for a batch of one)."""
    bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else 0
    return torch.tensor([[bos, 5, 7, 9, 11], [bos, 6, 8, 10, 12]], device=model.cfg.device) % model.cfg.d_vocab


def hook_takes_effect(model, hook: str) -> bool:
    """Whether setting activation ``hook`` to zero changes the model's output (cached per model and hook).

    Some attention bridges compute attention inside the wrapped Hugging Face module and only *report* some
    activations afterwards (e.g. the pattern on OPT and GPT-J): an edit there is discarded, and a sweep over
    it would be a silent zero. Analyses check this before patching such a hook.
    """
    verdicts: dict = model_state(model, "hook_effect")
    if hook not in verdicts:
        tokens = probe_tokens(model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = model_state(model, "probe")
            if "output" not in probe:  # the unedited output, computed once per model
                probe["output"] = model(tokens)
            with model.hooks(fwd_hooks=[(hook, zero_activation)]):
                edited = model(tokens)
        verdicts[hook] = bool((edited - probe["output"]).abs().max() > 1e-6)
    return verdicts[hook]


def edit_reaches_residual(model, hook: str) -> bool:
    """Whether an edit of ``hook`` in block L (its mid residual stream ``hook_resid_mid``, or the MLP-input fork
    ``hook_mlp_in``) reaches the residual stream itself, not only the MLP's input (cached per model and hook).

    In the TransformerLens 4 bridge the edited tensor goes to the MLP only, and the residual stream goes on with
    the unedited one: patching "resid_mid" there patches the MLP input, and patching all of it does not recover
    the clean run (TransformerLens 4's own ``get_act_patch_resid_mid`` does the same)."""
    verdicts: dict = model_state(model, "reaches_residual")
    if hook not in verdicts:
        layer = int(hook.split(".")[1])
        tokens = probe_tokens(model)
        names = [get_act_name("resid_post", layer), get_act_name("mlp_out", layer)]
        runs = []
        for hooks in ([], [(hook, lambda act, hook=None: act + 1.0)]):
            store: dict = {}
            with torch.no_grad(), model.hooks(fwd_hooks=hooks + [(n, recording_hook(store, n)) for n in names]):
                model(tokens)
            runs.append(store[names[0]] - store[names[1]])  # the residual stream without the MLP's write
        verdicts[hook] = bool((runs[1] - runs[0]).abs().max() > 1e-3)
    return verdicts[hook]
