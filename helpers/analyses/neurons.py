"""MLP neurons: which write the logit difference, which matter when patched, what they respond to and promote.

A neuron is one unit of an MLP's hidden layer: its post-activation (``blocks.L.mlp.hook_post``: the activation
function's output, times the "up" projection in gated MLPs) times its row of ``W_out`` is what it writes into the
residual stream. The MLP's output is the sum of those writes plus ``b_out``.

- ``neuron_dla``: each neuron's direct contribution to the logit difference at the final position (its write
  through the final norm with the clean run's cached scale, dotted with ``W_U[:, correct] − W_U[:, incorrect]``,
  as ``helpers.analyses.dla`` does for heads). Per layer the neurons plus ``b_out`` sum to that MLP's DLA; the
  largest deviation is returned (``identity_error``) so an architecture where this does not hold (a norm after the
  MLP, as in Gemma 2) says so instead of hiding it.
- ``neuron_patching``: exact activation patching of each neuron (all positions, clean into corrupted), batched
  through the intervention engine like every sweep; patching all neurons of a layer at once equals patching that
  layer's ``mlp_out`` at every position (tested on every family).
- ``top_activating``: where a neuron fires most on the task's prompts; ``output_tokens``: the tokens its output
  direction promotes and suppresses through the unembedding (its direct effect, before the final norm's scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import utilities as utils
from transformer_lens.ActivationCache import ActivationCache

from helpers.analyses.dla import project_stack
from helpers.engine.capabilities import check_dense_mlp
from helpers.engine.metrics import normalised
from helpers.engine.norms import frozen_scales, post_normed, post_norms, sublayer_bias
from helpers.methods.attribution_patching import attribution_patch
from helpers.methods.patching import PatchingContext, Sweep, run_patched_hook, run_sweep
from helpers.schema.results import CircuitExpmsResults
from helpers.task.prompts import PromptPair, PromptSet

NEURONS = Sweep("neuron", "mlp.hook_post", (("neuron", 1),), None)  # one variant per neuron, all positions


def post_hook(layer: int) -> str:
    """The hook of layer ``layer``'s neuron activations."""
    return utils.get_act_name("post", layer)


def neuron_hook_names(model, layers: list[int] | None = None) -> list[str]:
    """Hooks neuron DLA needs besides ``dla.dla_hook_names``: the post-activations of ``layers`` (default all).
    Raises ``NotSupported`` first where the MLP has no neurons of its own (``capabilities.check_dense_mlp``)."""
    check_dense_mlp(model)
    return [post_hook(layer) for layer in (range(model.cfg.n_layers) if layers is None else layers)]


@dataclass
class NeuronDLA:
    """Direct logit attribution of every neuron at the final position of the clean prompts."""

    per_prompt: Float[Tensor, "layer neuron batch"]  # each neuron's contribution to each prompt's logit difference
    bias: Float[Tensor, "layer batch"]  # b_out's contribution
    mlp: Float[Tensor, "layer batch"]  # the whole MLP output's contribution (hook_mlp_out)
    identity_error: float  # max over layers and prompts |sum of neurons + bias - MLP DLA|
    frozen_scales: list[str] = field(default_factory=list)  # norm scales held at their run values (``norms.frozen_scales``)

    @property
    def values(self) -> Float[Tensor, "layer neuron"]:
        """Mean over prompts."""
        return self.per_prompt.mean(-1)

    def top(self, k: int, sign: str = "abs") -> list[dict]:
        """The ``k`` neurons with the largest mean DLA (``"abs"``, ``"pos"`` or ``"neg"``): ``{layer, neuron, dla}``."""
        return top_neurons(self.values, k, sign, "dla")


def top_neurons(values: Float[Tensor, "layer neuron"], k: int, sign: str = "abs", key: str = "value") -> list[dict]:
    """The ``k`` largest entries of a [layer, neuron] table by absolute value, or most positive / negative."""
    score = {"abs": values.abs(), "pos": values, "neg": -values}[sign]
    flat = score.flatten().topk(min(k, score.numel())).indices
    d_mlp = values.shape[1]
    return [{"layer": int(i) // d_mlp, "neuron": int(i) % d_mlp, key: float(values.flatten()[i])} for i in flat]


@torch.no_grad()
def neuron_dla(model, cache: ActivationCache, direction: Float[Tensor, "batch d_model"], chunk: int = 512) -> NeuronDLA:
    """``NeuronDLA`` from a clean cache holding the DLA hooks and every layer's ``hook_post`` (``neuron_hook_names``).
    Neurons are projected ``chunk`` at a time (memory: batch × chunk × d_model floats)."""
    rows, biases, mlps = [], [], []
    batch = direction.shape[0]
    normed = "ln2_post" in post_norms(model)  # Gemma-2/3: each neuron's write through the post-MLP norm, scale frozen

    def written(layer: int, stack: Tensor, with_bias: bool = False) -> Tensor:
        return post_normed(model, cache, layer, "ln2_post", stack, with_bias) if normed else stack

    for layer in range(model.cfg.n_layers):
        d_mlp = cache[post_hook(layer)].shape[-1]
        parts = [
            project_stack(
                cache,
                written(layer, cache.get_neuron_results(layer, neuron_slice=slice(start, start + chunk), pos_slice=-1).transpose(0, 1)),
                direction,
            )
            for start in range(0, d_mlp, chunk)
        ]
        rows.append(torch.cat(parts))
        b_out = sublayer_bias(model, model.blocks[layer].mlp, "b_out", direction.device)
        biases.append(project_stack(cache, written(layer, b_out.expand(batch, -1)[None], with_bias=True), direction)[0])
        mlps.append(project_stack(cache, cache[utils.get_act_name("mlp_out", layer)][:, -1][None], direction)[0])
    per_prompt, bias, mlp = torch.stack(rows), torch.stack(biases), torch.stack(mlps)
    error = (per_prompt.sum(1) + bias - mlp).abs().max().item()
    return NeuronDLA(per_prompt.cpu(), bias.cpu(), mlp.cpu(), error, frozen_scales(model))


def neuron_patching(
    ctx: PatchingContext, layers: list[int], memory_mb: float = 1024, only: dict[int, Tensor] | None = None
) -> Float[Tensor, "layer neuron"]:
    """Normalised effect of patching each neuron of ``layers`` (all positions) from clean into corrupted; rows in
    the order of ``layers``. ``ctx`` must cache their ``hook_post`` (``make_context(..., extra_hooks=neuron_hook_names(...))``).
    ``only``: per layer, the neurons to patch (e.g. ``candidates``); the others are NaN."""
    return run_sweep(ctx, NEURONS, layers, memory_mb, only=only)


def neuron_attribution(model, prompts: PromptPair | PromptSet) -> Float[Tensor, "layer neuron"]:
    """Attribution-patching estimate of every neuron's patching effect (gradient at the base run × source − base
    activation, summed over positions and prompts; normalised; ``prompts``: a pair, or a prompt set's denoising pair):
    one forward and one backward for all neurons of all layers. Summed over a layer's neurons it equals the same
    estimate for its ``mlp_out`` (linearity)."""
    return attribution_patch(model, prompts, [NEURONS]).values[NEURONS.name]


def candidates(estimate: Float[Tensor, "layer neuron"], layers: list[int], n: int | None) -> dict[int, Tensor]:
    """Per layer, the ``n`` neurons with the largest |estimate| (all when ``n`` is None or at least the layer's width)."""
    return {layer: estimate[layer].abs().argsort(descending=True)[:n] for layer in layers}


def all_neurons_patched(ctx: PatchingContext, layer: int, hook: str | None = None) -> float:
    """Normalised effect of patching every neuron of ``layer`` at once, all positions (``hook``: another activation of
    that layer patched whole instead, e.g. ``hook_mlp_out``, which must give the same number)."""
    ld = run_patched_hook(ctx, hook or post_hook(layer), torch.ones((1, 1, 1), dtype=torch.bool)).mean()
    return float(normalised(ld, ctx.source_logit_diff, ctx.base_logit_diff))


def mlp_layer_scores(circuit_expms: CircuitExpmsResults) -> dict[int, float]:
    """Per MLP layer, from ``circuit_expms.json``: the largest |mlp_out patching effect| over positions (how much of the
    logit difference patching that layer's output at one position restores), for choosing layers to open up."""
    values = circuit_expms.patching.values["mlp_out"]
    return {layer: max(abs(v) for v in row if v is not None) for layer, row in enumerate(values)}


def top_activating(cache: ActivationCache, tokens: Tensor, to_str, layer: int, neuron: int, k: int = 5) -> list[dict]:
    """The ``k`` (prompt, position) pairs where the neuron's activation is largest on these prompts, with the token
    there and the text up to it (``to_str``: token ids -> strings, e.g. ``model.to_str_tokens``)."""
    acts = cache[post_hook(layer)][..., neuron]
    top = acts.flatten().topk(min(k, acts.numel()))
    n_pos = acts.shape[1]
    rows = []
    for value, index in zip(top.values.tolist(), top.indices.tolist()):
        prompt, pos = divmod(index, n_pos)
        words = to_str(tokens[prompt])
        rows.append(
            {"prompt": prompt, "pos": pos, "token": words[pos], "context": "".join(words[max(0, pos - 8) : pos + 1]), "activation": value}
        )
    return rows


@torch.no_grad()
def output_tokens(model, layer: int, neuron: int, k: int = 8) -> dict[str, list[tuple[str, float]]]:
    """Tokens the neuron's output direction (its ``W_out`` row) raises and lowers most through the unembedding."""
    logits = model.blocks[layer].mlp.W_out[neuron] @ model.W_U
    up, down = logits.topk(k), (-logits).topk(k)
    decode = model.tokenizer.decode
    return {
        "promoted": [(decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices)],
        "suppressed": [(decode([int(i)]), float(-v)) for v, i in zip(down.values, down.indices)],
    }


__all__ = [
    "NEURONS",
    "NeuronDLA",
    "neuron_dla",
    "neuron_patching",
    "all_neurons_patched",
    "mlp_layer_scores",
    "neuron_attribution",
    "candidates",
    "top_activating",
    "output_tokens",
    "top_neurons",
    "neuron_hook_names",
    "post_hook",
]
