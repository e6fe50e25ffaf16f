"""Direct logit attribution (DLA): how much each component writes along the logit-difference direction.

The final residual stream at the last position is a sum of component outputs (embeddings, each attention
head, each MLP, biases). After the final LayerNorm's centring and scaling (applied with the *cached* scale,
so the map is linear), each component's dot product with ``W_U[:, correct] - W_U[:, incorrect]`` is its
direct contribution to the logit difference; the contributions plus the unembedding-bias difference sum to
the model's logit difference exactly (up to float error; tested).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

DLA_HOOK_SUFFIXES = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                     "hook_attn_out", "hook_mlp_out", "hook_z", "hook_pattern", "hook_scale")


def dla_hook_filter(name: str) -> bool:
    """Hooks DLA, the logit lens and the attention plots need (nothing else is cached)."""
    return name.endswith(DLA_HOOK_SUFFIXES) and ".hook_in" not in name


def logit_diff_direction(model, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, "batch d_model"]:
    """Unembedding direction of correct minus incorrect answer, per prompt."""
    directions = model.tokens_to_residual_directions(answer_tokens)
    return directions[:, 0] - directions[:, 1]


def unembed_bias_diff(model, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, "batch"]:
    """``b_U[correct] - b_U[incorrect]``: the part of the logit difference no component writes."""
    b_U = model.b_U
    return b_U[answer_tokens[:, 0]] - b_U[answer_tokens[:, 1]]


def project_stack(
    cache: ActivationCache, stack: Float[Tensor, "component batch d_model"], direction: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "component batch"]:
    """Each component's contribution to the logit difference, after the final LN (cached scale), per prompt."""
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    return torch.einsum("cbd,bd->cb", scaled, direction)


def logit_lens(cache: ActivationCache, direction: Float[Tensor, "batch d_model"]) -> tuple[Float[Tensor, "component batch"], list[str]]:
    """Logit difference read off the accumulated residual stream after each half-layer (logit lens)."""
    stack, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    return project_stack(cache, stack, direction), labels


def layer_dla(cache: ActivationCache, direction: Float[Tensor, "batch d_model"]) -> tuple[Float[Tensor, "component batch"], list[str]]:
    """DLA of embeddings and each layer's attention and MLP output."""
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    return project_stack(cache, stack, direction), labels


def head_dla(model, cache: ActivationCache, direction: Float[Tensor, "batch d_model"]) -> Float[Tensor, "layer head batch"]:
    """DLA of every attention head (its z @ W_O, without b_O)."""
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    return project_stack(cache, stack, direction).reshape(model.cfg.n_layers, model.cfg.n_heads, -1)


def full_dla(cache: ActivationCache, direction: Float[Tensor, "batch d_model"]) -> tuple[Float[Tensor, "component batch"], list[str]]:
    """DLA of the complete decomposition (embeddings, every head, every MLP, biases): sums to the logit diff."""
    stack, labels = cache.get_full_resid_decomposition(layer=-1, pos_slice=-1, expand_neurons=False, return_labels=True)
    return project_stack(cache, stack, direction), labels
