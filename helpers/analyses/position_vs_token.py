"""Position or token: what a head's output tells the heads after it (IOI paper §3.3 and Appendix A).

The IOI circuit's S-inhibition heads tell the name movers which name *not* to copy. That signal could name the
duplicated *token* ("John") or its *position* (the first clause's second name). Patching a head's output from
a prompt that changes only one of the two tells them apart (the task's ``corruptions`` in the params):

* **flipped order** (ABBA -> BABA with the same names, ``changes: position``): the subject's position
  changes, its token does not;
* **exchanged names** (the names swapped everywhere, ``changes: token``): the subject's token changes, its
  positions do not;
* **noise** (Gaussian noise on some slots' token embeddings, as in causal tracing): the word is blurred.

For each head and each extra corruption ``c`` the **effect** is

    LD(clean prompts, with the head's output at the final position taken from the run of c) / LD(clean) - 1,

the relative change of the clean logit difference (always the clean prompts' answers): 0 = the head's output
there carries nothing that ``c`` changes; -1 = the logit difference is gone; below -1 it is reversed. What
holds exactly (tested): a source equal to the clean run gives 0 for every head, and each value equals
``transformer_lens.patching`` run with the clean prompts as the base and the source's cache as the patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from helpers.engine.capabilities import NotSupported, hook_takes_effect
from helpers.engine.hooks import resolve_hook_names
from helpers.methods.patching import SWEEPS, PatchingContext, make_context, run_sweep
from helpers.schema.heads import Head
from helpers.task.prompts import AlternativeRun, PromptPair, PromptSet

POSITIONS = ("end", "all")  # where a head's output is taken from the source run: the final position, or every position


@dataclass(eq=False)
class EmbeddingNoise:
    """A forward hook (on ``hook_embed``) adding fixed Gaussian noise to the token embeddings (zero where a prompt's
    tokens are not noised)."""

    noise: Float[Tensor, "batch pos d_model"]

    def __call__(self, embed: Tensor, hook=None) -> Tensor:
        return embed + self.noise.to(embed.device, embed.dtype)

    def __repr__(self) -> str:
        return f"EmbeddingNoise({int((self.noise != 0).any(-1).sum())} noised tokens)"


def embedding_noise(model, alt: AlternativeRun, seed: int) -> tuple[str, EmbeddingNoise]:
    """(hook name, hook) adding noise of std ``alt.spec.scale`` x the std of the clean token embeddings where
    ``alt.noise_mask`` is True; deterministic in ``seed``. NotSupported where edits of the embeddings are discarded."""
    name = resolve_hook_names(model, "hook_embed")[0]
    if not hook_takes_effect(model, name):
        raise NotSupported(f"noise corruption {alt.name!r} is not supported for this architecture: the bridge discards edits of hook_embed")
    with torch.no_grad():
        _, cache = model.run_with_cache(alt.tokens, names_filter=[name], stop_at_layer=0)
    sigma = float(cache[name].float().std())
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(*alt.noise_mask.shape, model.cfg.d_model, generator=generator) * alt.noise_mask[..., None]
    return name, EmbeddingNoise(noise * alt.spec.scale * sigma)


def source_context(model, prompts: PromptSet, alt: AlternativeRun, seed: int = 0) -> PatchingContext:
    """A patching context whose base run is the *clean* prompts and whose source is the run of ``alt`` (its tokens,
    with its embedding noise where it is a noise corruption)."""
    hooks = [embedding_noise(model, alt, seed)] if alt.noise_mask is not None else []
    pair = PromptPair(base=prompts.clean_tokens, source=alt.tokens, answers=prompts.answer_tokens, base_name="clean", source_name=alt.name)
    return make_context(model, pair, source_hooks=hooks, warn=False)


@dataclass
class SignalPatching:
    """Every head's output patched from one extra corruption into the clean run (see module docstring)."""

    corruption: str
    changes: str  # what the corruption changes: position, token, both, other
    position: str  # where the head's output is taken from the source: "end" or "all"
    effect: Float[Tensor, "layer head"]  # LD(patched) / LD(clean) - 1
    logit_diff_clean: float  # the clean prompts' mean logit difference
    logit_diff_source: float  # the source run's mean logit difference on the clean answers

    def to_json(self) -> dict:
        return {
            "corruption": self.corruption,
            "changes": self.changes,
            "position": self.position,
            "effect": self.effect,
            "logit_diff_clean": self.logit_diff_clean,
            "logit_diff_source": self.logit_diff_source,
            "effect_is": "LD(clean, head output from the source) / LD(clean) - 1",
        }


def patch_from(
    model, prompts: PromptSet, name: str, position: str = "end", memory_mb: float = 1024, seed: int = 0, progress: bool = True
) -> SignalPatching:
    """Patch each head's output (``z``; at the final position or everywhere) from extra corruption ``name``."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {position!r}")
    if name not in prompts.alternatives:
        raise KeyError(f"no corruption {name!r}; this task defines {sorted(prompts.alternatives)} under 'corruptions:'")
    alt = prompts.alternatives[name]
    ctx = source_context(model, prompts, alt, seed)
    n_heads, end = model.cfg.n_heads, prompts.n_pos - 1
    if position == "end":
        only = {layer: end * n_heads + torch.arange(n_heads) for layer in range(model.cfg.n_layers)}
        ld = run_sweep(ctx, SWEEPS["head_out_by_pos"], memory_mb=memory_mb, only=only, raw=True, progress=progress)[:, end]
    else:
        ld = run_sweep(ctx, SWEEPS["head_out"], memory_mb=memory_mb, raw=True, progress=progress)
    base = ctx.base_logit_diff  # the clean prompts (the base run here)
    return SignalPatching(name, alt.spec.changes, position, ld / base - 1, base, ctx.source_logit_diff)


def patch_from_all(
    model, prompts: PromptSet, position: str = "end", memory_mb: float = 1024, seed: int = 0, progress: bool = True
) -> dict[str, SignalPatching]:
    """``patch_from`` for every extra corruption of the task (an empty dict when it defines none)."""
    return {name: patch_from(model, prompts, name, position, memory_mb, seed, progress) for name in prompts.alternatives}


def reads_as(effects: dict[str, float], changes: dict[str, str], threshold: float = 0.1) -> str:
    """What a head's output signals, from its effects per corruption: "position" when the strongest effect of a
    position-changing corruption is at least ``threshold`` and twice the strongest token-changing one, "token"
    the other way round, "both" when both pass ``threshold``, "neither" otherwise (or "n/a" without both kinds)."""
    kinds = {kind: max((abs(v) for n, v in effects.items() if changes[n] == kind), default=None) for kind in ("position", "token")}
    pos, tok = kinds["position"], kinds["token"]
    if pos is None or tok is None:
        return "n/a"
    if pos >= threshold and pos >= 2 * tok:
        return "position"
    if tok >= threshold and tok >= 2 * pos:
        return "token"
    return "both" if pos >= threshold and tok >= threshold else "neither"


def signal_table(results: dict[str, SignalPatching], k: int, roles: dict[str, str] | None = None, threshold: float = 0.1) -> list[dict]:
    """The ``k`` heads with the largest effect of any corruption: per head its effect under each, what it reads
    as (``reads_as`` with ``threshold``) and its proposed role (``roles``: head label -> role)."""
    if not results:
        return []
    stacked = torch.stack([r.effect for r in results.values()])  # [corruption, layer, head]
    strongest = stacked.abs().amax(0).flatten()
    n_heads = stacked.shape[-1]
    changes = {name: r.changes for name, r in results.items()}
    rows = []
    for flat in strongest.argsort(descending=True)[:k].tolist():
        layer, head = divmod(flat, n_heads)
        label = Head(layer, head).label
        effects = {name: round(float(r.effect[layer, head]), 6) for name, r in results.items()}
        rows.append({"head": label, **effects, "reads as": reads_as(effects, changes, threshold), "role": (roles or {}).get(label, "")})
    return rows
