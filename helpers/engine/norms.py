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


def sublayer_bias(model, module, name: str, device) -> Float[Tensor, " d_model"]:
    """A block's output bias (``attn.b_O``, ``mlp.b_out``), or zeros where the checkpoint has none (Llama, Gemma, ...)."""
    bias = getattr(module, name, None)
    return torch.zeros(model.cfg.d_model, device=device) if bias is None else bias
