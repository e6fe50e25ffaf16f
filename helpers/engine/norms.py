"""Post-sublayer norms: the norms some architectures apply to a sublayer's output before it joins the residual stream.

Gemma-2/3 put a norm between each attention layer's write and the residual stream (``ln1_post``) and after the MLP
(``ln2_post``). RMSNorm(Σ_h x_h) = Σ_h x_h · w / rms(Σ_h x_h): with the norm's scale frozen at its value in the run,
the norm is a linear map, so each head's (or neuron's) share passes through it on its own and the shares sum exactly
to the layer's output (``post_normed``). DLA, neuron DLA, path patching and edge runs all read these from here.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from helpers.engine.capabilities import NotSupported, model_state, probe_tokens

POST_NORMS = {"ln1_post": "post-attention norm", "ln2_post": "post-MLP norm"}


def post_norms(model) -> list[str]:
    """The norms this architecture applies to a sublayer's output before it joins the residual stream
    (``POST_NORMS``: ``ln1_post`` after attention, ``ln2_post`` after the MLP; Gemma-2/3), in block order."""
    return [name for name in POST_NORMS if f"blocks.0.{name}.hook_scale" in model.hook_dict]


def post_attention_norm(model, layer: int):
    """``layer``'s post-attention norm (``ln1_post``) as the model's own module, without the bridge's hooks around it:
    edge runs and direct path patching hook ``ln1_post.hook_in`` or run hooked, and apply the norm to their own mixes
    of head outputs (``edges`` module docstring)."""
    norm = model.blocks[layer].ln1_post
    return getattr(norm, "_original_component", norm)


def attention_norm(model, layer: int):
    """What block ``layer``'s attention applies to the residual stream before its projections: its pre-norm (``ln1``,
    the bridge's module), or the identity where the attention reads the residual stream as it is (OLMo-2: post-norms
    only; checked on ``probe_tokens``: the attention's input equals ``hook_resid_pre``). Weight-based analyses read
    the residual stream through it. ``NotSupported`` where there is no ``ln1`` and the input differs."""
    block = model.blocks[layer]
    if hasattr(block, "ln1"):
        return block.ln1
    verdicts = model_state(model, "attention_reads_resid")
    if layer not in verdicts:
        names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_in"]
        with torch.no_grad():
            _, cache = model.run_with_cache(probe_tokens(model), names_filter=names)
        verdicts[layer] = names[1] in cache and torch.equal(cache[names[0]], cache[names[1]])
    if not verdicts[layer]:
        raise NotSupported(
            f"block {layer} of this architecture has no pre-attention norm (ln1) the bridge names, and its attention does "
            "not read the residual stream as it is: weight-based head analyses cannot tell what it reads"
        )
    return torch.nn.Identity()


def frozen_scales(model) -> list[str]:
    """The norm scales DLA freezes at their values in the run, in words (the final norm's always)."""
    return ["the final norm's"] + [f"each layer's {POST_NORMS[name]}'s" for name in post_norms(model)]


def post_normed(
    model, cache: ActivationCache, layer: int, norm: str, stack: Float[Tensor, "component batch d_model"], with_bias: bool = False
) -> Float[Tensor, "component batch d_model"]:
    """Each component of ``stack`` (a share of what enters post-norm ``norm`` of ``layer`` at the final position)
    through that norm with its scale frozen at the run's cached value: the model's own norm module, whose
    ``hook_scale`` is replaced. Linear, so the shares sum to the norm's output. A norm bias (none in Gemma) is counted
    once: only ``with_bias`` components (the layer's own bias term) carry it."""
    name = f"blocks.{layer}.{norm}"
    scale = cache[f"{name}.hook_scale"][:, -1]  # [batch, 1]
    module = model.get_submodule(name)

    def frozen(value: Tensor, hook=None) -> Tensor:
        return scale.expand_as(value)

    with torch.no_grad(), model.hooks(fwd_hooks=[(f"{name}.hook_scale", frozen)]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge warns that an edited scale leaves Hugging Face's fused forward
        out = module(stack)
        return out if with_bias else out - module(torch.zeros_like(stack[:1]))


def heads_add_up(model) -> bool:
    """Whether each layer's heads' writes (``z @ W_O`` per head, through the post-attention norm with its scale frozen
    where there is one) plus ``b_O`` sum to the layer's attention output (``hook_attn_out``), to 1e-4 of its scale:
    what every per-head decomposition assumes (head DLA, direct-edge path patching). Measured once per model on
    ``capabilities.probe_tokens``; false on an architecture that scales a sublayer's output on its way to the residual
    stream in a way not modelled here (Granite's residual multiplier)."""
    verdicts = model_state(model, "heads_add_up")
    if "ok" not in verdicts:
        cfg = model.cfg
        names = [f"blocks.{layer}.{hook}" for layer in range(cfg.n_layers) for hook in ("attn.hook_z", "hook_attn_out")]
        names += [f"blocks.{layer}.ln1_post.hook_scale" for layer in range(cfg.n_layers)] if "ln1_post" in post_norms(model) else []
        with torch.no_grad():
            _, cache = model.run_with_cache(probe_tokens(model), names_filter=names)
        error = 0.0
        for layer in range(cfg.n_layers):
            attn = model.blocks[layer].attn
            z = cache[f"blocks.{layer}.attn.hook_z"][:, -1]  # [batch, head, d_head]
            heads = torch.einsum("bhd,hdm->hbm", z, attn.W_O.to(z.dtype))
            bias = sublayer_bias(model, attn, "b_O", z.device).to(z.dtype).expand_as(heads[0])[None]
            shares = torch.cat([heads, bias])
            if "ln1_post" in post_norms(model):
                shares = torch.cat(
                    [post_normed(model, cache, layer, "ln1_post", heads), post_normed(model, cache, layer, "ln1_post", bias, True)]
                )
            out = cache[f"blocks.{layer}.hook_attn_out"][:, -1]
            error = max(error, float((shares.sum(0) - out).abs().max()) / (1 + float(out.abs().max())))
        verdicts["ok"] = error <= 1e-4
    return verdicts["ok"]


def sublayer_bias(model, module, name: str, device) -> Float[Tensor, " d_model"]:
    """A block's output bias (``attn.b_O``, ``mlp.b_out``), or zeros where the checkpoint has none (Llama, Gemma, ...)."""
    bias = getattr(module, name, None)
    return torch.zeros(model.cfg.d_model, device=device) if bias is None else bias
