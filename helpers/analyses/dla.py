"""Direct logit attribution (DLA): how much each component writes along the logit-difference direction.

The final residual stream at the last position is a sum of component outputs (embeddings, each attention
head, each MLP, biases). After the final LayerNorm's centring and scaling (applied with the *cached* scale,
so the map is linear), each component's dot product with ``W_U[:, correct] - W_U[:, incorrect]`` is its
direct contribution to the logit difference; the contributions plus the unembedding-bias difference sum to
the model's logit difference exactly (up to float error; tested on every family).

Architectures differ in what that sum contains and whether it is exact (``capabilities.decomposition_caveats``):
rotary models have no positional-embedding term; parallel blocks (GPT-J, NeoX) have no residual stream
between attention and MLP (the logit lens reads whole layers); Gemma-2's final-logit soft-capping makes the
logit difference a non-linear function of the residual stream: there the numbers are approximations, the residual
measured and reported, never hidden.

**Post-norms** (Gemma-2/3: a norm between each head's write and the residual stream, ``ln1_post``, and after the
MLP, ``ln2_post``). RMSNorm(Σ_h x_h) = Σ_h x_h · w / rms(Σ_h x_h): with the norm's scale frozen at its value in the
run (as the final norm's already is), the norm is a linear map, so each head's (and each neuron's) share passes
through it on its own and the shares sum exactly to the layer's output (``post_normed``, through the model's own
norm module). ``frozen_scales`` names the scales a decomposition freezes.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache

from helpers.engine.capabilities import architecture, decomposition_caveats, parallel_blocks, position_embeddings
from helpers.engine.norms import post_normed, post_norms, sublayer_bias

DLA_HOOK_SUFFIXES = (
    "hook_embed",
    "hook_pos_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_z",
    "hook_pattern",
    "hook_scale",
)


IDENTITY_TOLERANCE = 1e-3  # relative to the logit differences' scale: float32 sums over hundreds of components stay far below


def measured_caveats(model, error: float, logit_diffs: Float[Tensor, " batch"]) -> dict[str, str]:
    """The architecture's known caveats (``capabilities.decomposition_caveats``), plus ``identity`` where the measured
    ``error`` (max |sum of components + bias diff - logit diff|) exceeds ``IDENTITY_TOLERANCE`` of the logit
    differences' scale and no known caveat explains it: an architecture whose unembedding reads the residual stream
    in a way this decomposition does not model (measured: an unfolded final norm, OLMo-2; a logit scale, Granite).
    Its DLA numbers are then not a decomposition: the notebook prints that under the identity error, warns, and records
    ``exact: false`` with the reason in its results."""
    caveats = decomposition_caveats(model)
    largest = float(logit_diffs.detach().abs().max())
    if not caveats and error > IDENTITY_TOLERANCE * (1 + largest):
        caveats["identity"] = (
            f"the components do not sum to the logit difference on this architecture ({architecture(model)}: max error "
            f"{error:.3g} against logit differences up to {largest:.3g}); the final norm or the "
            "unembedding is not in the form DLA reads (e.g. a norm weight TransformerLens did not fold, or a logit scale): "
            "these numbers are not a decomposition"
        )
    return caveats


def dla_hook_filter(name: str) -> bool:
    """Hooks DLA, the logit lens and the attention plots need (nothing else is cached; absent ones are not required)."""
    return name.endswith(DLA_HOOK_SUFFIXES) and ".hook_in" not in name


def dla_hook_names(model) -> list[str]:
    """The ``dla_hook_filter`` hooks this architecture fires: no positional embedding with rotary positions,
    no mid residual with parallel attention + MLP."""
    skip = []
    if not position_embeddings(model.cfg):
        skip.append("hook_pos_embed")
    if parallel_blocks(model.cfg):
        skip.append("hook_resid_mid")
    return [n for n in model.hook_dict if dla_hook_filter(n) and not n.endswith(tuple(skip))]


def logit_diff_direction(model, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, "batch d_model"]:
    """Unembedding direction of correct minus incorrect answer, per prompt."""
    directions = model.tokens_to_residual_directions(answer_tokens)
    return directions[:, 0] - directions[:, 1]


def unembed_bias_diff(model, answer_tokens: Int[Tensor, "batch 2"]) -> Float[Tensor, " batch"]:
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
    incl_mid = "blocks.0.hook_resid_mid" in cache.cache_dict  # parallel attention + MLP has no mid residual
    stack, labels = cache.accumulated_resid(layer=-1, incl_mid=incl_mid, pos_slice=-1, return_labels=True)
    return project_stack(cache, stack, direction), labels


def logit_lens_vocabulary(model, cache: ActivationCache, answer_tokens: Int[Tensor, "batch 2"], k: int = 5) -> list[dict]:
    """The logit lens over the whole vocabulary: at each accumulated residual stream (final position, final norm with
    the cached scale, unembedding), the mean rank of the correct and incorrect answers (0 = top), how often the correct
    one is the top token, and the ``k`` tokens most often on top across prompts. After the last layer this is the
    model's own ranking (soft-capping, where present, does not change ranks)."""
    incl_mid = "blocks.0.hook_resid_mid" in cache.cache_dict
    stack, labels = cache.accumulated_resid(layer=-1, incl_mid=incl_mid, pos_slice=-1, return_labels=True)
    normed = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)  # [component, batch, d_model]
    rows = []
    for label, resid in zip(labels, normed):
        layer_logits = resid @ model.W_U + model.b_U  # [batch, vocab]: one component at a time (37 x 64 x 262k is 2.5 GB)
        answer = layer_logits.gather(-1, answer_tokens)  # [batch, 2]
        ranks = (layer_logits[:, None, :] > answer[..., None]).sum(-1).float()  # [batch, 2]
        top = layer_logits.argmax(-1)
        ids, counts = top.unique(return_counts=True)
        common = ids[counts.argsort(descending=True)][:k]
        rows.append(
            {
                "after": label,
                "rank correct": float(ranks[:, 0].mean()),
                "rank incorrect": float(ranks[:, 1].mean()),
                "correct is top": float((ranks[:, 0] == 0).float().mean()),
                "most frequent top tokens": [model.tokenizer.decode([int(t)]) for t in common],
            }
        )
    return rows


def layer_dla(cache: ActivationCache, direction: Float[Tensor, "batch d_model"]) -> tuple[Float[Tensor, "component batch"], list[str]]:
    """DLA of embeddings and each layer's attention and MLP output."""
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    return project_stack(cache, stack, direction), labels


def head_results(model, cache: ActivationCache) -> Float[Tensor, "layer head batch d_model"]:
    """What each attention head writes to the residual stream at the final position: its ``z @ W_O`` (without
    ``b_O``), through the post-attention norm with its scale frozen where the architecture has one (``post_normed``)."""
    cfg = model.cfg
    stack = cache.stack_head_results(layer=-1, pos_slice=-1).reshape(cfg.n_layers, cfg.n_heads, -1, cfg.d_model)
    if "ln1_post" not in post_norms(model):
        return stack
    return torch.stack([post_normed(model, cache, layer, "ln1_post", stack[layer]) for layer in range(cfg.n_layers)])


def head_dla(model, cache: ActivationCache, direction: Float[Tensor, "batch d_model"]) -> Float[Tensor, "layer head batch"]:
    """DLA of every attention head (``head_results``: its z @ W_O, without b_O, post-normed where the model does)."""
    stack = head_results(model, cache)
    return project_stack(cache, stack.flatten(0, 1), direction).reshape(model.cfg.n_layers, model.cfg.n_heads, -1)


def full_dla(
    model, cache: ActivationCache, direction: Float[Tensor, "batch d_model"]
) -> tuple[Float[Tensor, "component batch"], list[str]]:
    """DLA of the complete decomposition (embeddings, every head, every MLP, biases): sums to the logit diff. Under a
    post-attention norm each layer's attention output splits into its heads (``head_results``) and its ``b_O`` share
    ("<layer>_attn_bias"), each through the norm with its frozen scale."""
    if "ln1_post" not in post_norms(model):
        stack, labels = cache.get_full_resid_decomposition(layer=-1, pos_slice=-1, expand_neurons=False, return_labels=True)
        return project_stack(cache, stack, direction), labels
    layers, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    heads, batch = head_results(model, cache), direction.shape[0]
    rows, labels = [], []
    for row, label in zip(layers, layer_labels):
        if not label.endswith("_attn_out"):
            rows.append(row[None])
            labels.append(label)
            continue
        layer = int(label.split("_")[0])
        b_O = sublayer_bias(model, model.blocks[layer].attn, "b_O", direction.device).expand(1, batch, -1)
        rows += [heads[layer], post_normed(model, cache, layer, "ln1_post", b_O, with_bias=True)]
        labels += [f"L{layer}H{h}" for h in range(model.cfg.n_heads)] + [f"{layer}_attn_bias"]
    return project_stack(cache, torch.cat(rows), direction), labels
