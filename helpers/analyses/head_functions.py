"""What a head does with the words of a prompt: copy scores, attention vs contribution, attention to
named positions, how patching one head moves a later head's attention (IOI paper §3), and composition scores
between heads from the weights (Elhage et al. 2021).

All functions take the clean-run cache of ``head_function_hooks`` and work on every head at once; the
templates pick the important heads out of the ``[layer, head]`` results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.forward import run_interventions
from helpers.engine.hooks import run_with_checked_cache
from helpers.engine.interventions import Intervention
from helpers.engine.norms import attention_norm
from helpers.engine.shortcuts import column_logits, restricts_columns
from helpers.schema.heads import Head
from helpers.task.prompts import PromptSet

Positions = dict[str, "int | Int[Tensor, ' batch']"]  # named position -> token index, one for all prompts or one per prompt


def word_positions(prompts: PromptSet, names: list[str] | None = None) -> dict[str, Int[Tensor, " batch"]]:
    """Named positions of words, per prompt (default: every named position except ``end`` and ``±n`` offsets).
    Per prompt because a task with several templates (ABBA and BABA) has its words at different indices.

    Raises ValueError naming the available positions when a requested name is not one of them.
    """
    named = prompts.position_index
    if names is None:
        names = [n for n in named if n != "end" and "+" not in n and "-" not in n]
    unknown = [n for n in names if n not in named]
    if unknown or not names:
        raise ValueError(
            f"named position(s) {unknown or names} not found; this task has: {sorted(named)} "
            f"(set them under `positions:` in the params file)"
        )
    return {n: named[n] for n in names}


def position_matrix(positions: Positions, batch: int, device=None) -> Int[Tensor, "batch word"]:
    """The token index of each named word in each prompt (a shared index is repeated for every prompt)."""
    cols = [p.to(device) if isinstance(p, Tensor) else torch.full((batch,), int(p), device=device) for p in positions.values()]
    return torch.stack(cols, 1).long()


def at_positions(x: Tensor, index: Int[Tensor, "batch word"], dim: int) -> Tensor:
    """``x`` indexed along ``dim`` at each prompt's own positions (``x``'s axis 0 is the batch; dims between 0 and
    ``dim`` are kept): ``x[b, ..., index[b, w], ...]`` with the word axis in place of ``dim``."""
    shape = [index.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = index.shape[1]
    expanded = index.reshape(index.shape[0], *([1] * (dim - 1)), index.shape[1], *([1] * (x.dim() - dim - 1)))
    size = list(x.shape)
    size[dim] = index.shape[1]
    return x.gather(dim, expanded.expand(size).to(x.device))


def head_function_hooks(model) -> list[str]:
    """Hooks the head-function analyses read: resid after the first block, every z and pattern, final LN scale."""
    n = model.cfg.n_layers
    return (
        ["blocks.0.hook_resid_post", "ln_final.hook_scale"]
        + [get_act_name("z", l) for l in range(n)]
        + [get_act_name("pattern", l) for l in range(n)]
    )


def clean_cache(model, prompts: PromptSet):
    """Clean-run cache restricted to ``head_function_hooks`` (raises if any is missing)."""
    with torch.no_grad():
        return run_with_checked_cache(model, prompts.clean_tokens, head_function_hooks(model))[1]


@dataclass
class CopyScores:
    """Percent of (prompt, word) pairs whose word is in the top ``k`` logits of one head's OV output."""

    positive: Float[Tensor, "layer head"]  # OV as is: the head copies the word (mover)
    negative: Float[Tensor, "layer head"]  # OV negated: the head suppresses the word (negative mover)
    k: int
    words: list[str]


def ov_outputs(
    model, resid: Float[Tensor, "batch word d_model"], layer: int, bias: bool = False
) -> Float[Tensor, "batch word head d_model"]:
    """What each head of ``layer`` writes if it attends fully to one position holding ``resid``: the head's norm,
    its value map and ``W_O``. Under grouped-query attention each query head uses its key/value group's value map.

    ``bias``: add the head's value bias and the layer's output bias (``b_V W_O + b_O``). A head attending to one
    position outputs that position's value exactly, value bias included (attention weights sum to 1). TransformerLens
    folds every head's ``b_V W_O`` into the layer's ``b_O`` (``b_V`` then reads 0), and after folding the heads'
    shares cannot be told apart: adding ``b_O`` is how the value bias is included at all.
    """
    n_heads = model.cfg.n_heads
    x = attention_norm(model, layer)(resid)
    W_V = model.W_V[layer]  # [n_kv, d_model, d_head]: one value map per key/value group under GQA
    v = torch.einsum("bwd,hde->bwhe", x, W_V.repeat_interleave(n_heads // W_V.shape[0], dim=0))
    out = torch.einsum("bwhe,hed->bwhd", v, model.W_O[layer])
    return out + output_bias(model, layer) if bias else out


def output_bias(model, layer: int) -> Float[Tensor, "head d_model"]:
    """The constant part of a head's output when it attends to one position: ``b_V W_O + b_O`` (``ov_outputs``)."""
    W_O = model.W_O[layer]
    b_V, b_O = bias_or_none(model, "b_V"), bias_or_none(model, "b_O")
    out = torch.zeros(W_O.shape[0], W_O.shape[-1], dtype=W_O.dtype, device=W_O.device)
    if b_V is not None:
        out = out + torch.einsum("he,hed->hd", b_V[layer].repeat_interleave(model.cfg.n_heads // b_V.shape[1], dim=0), W_O)
    return out + b_O[layer] if b_O is not None else out


def bias_or_none(model, name: str) -> Tensor | None:
    """The stacked bias ``model.<name>`` (e.g. ``b_V``: [layer, head, d_head]), or None for a bias-free model (Llama,
    Mistral, ...), where the bridge raises instead of returning zeros."""
    try:
        return getattr(model, name)
    except AttributeError:
        return None


# Logits held at once by ``top_k_hits`` (rows x the columns of one band of the vocabulary)
TOP_K_LOGITS_MB = 256
VOCAB_BAND = 4096  # vocabulary columns ``top_k_hits`` unembeds at a time; a row stops once k words beat its target


def top_k_hits(model, out: Float[Tensor, "... d_model"], targets: Int[Tensor, ...], k: int) -> Float[Tensor, ...]:
    """1.0 where ``targets`` is among the top ``k`` logits of ``out`` read through the final norm and unembedding:
    fewer than ``k`` other words have a strictly larger logit (a word tied with the target does not push it out).

    The unembedding runs a band of ``VOCAB_BAND`` columns at a time (``shortcuts.column_logits``), counting for each
    row the words whose logit beats its target's; a row whose count reaches ``k`` is a miss, whatever the other
    columns hold, and leaves. Most heads' rows leave in the first band; the rows of a head that copies its target run
    through the whole vocabulary. Same hits as ranking every row's full logits (SmolLM2's copy scores at 64 prompts:
    59 s of full unembeddings before). Rows in slices of ``TOP_K_LOGITS_MB``."""
    flat = out.reshape(-1, out.shape[-1])
    targets = targets.expand(out.shape[:-1]).reshape(-1).to(flat.device)
    vocab = model.cfg.d_vocab
    band = VOCAB_BAND if restricts_columns(model) else vocab  # without the restriction each band costs the whole unembedding
    rows = max(1, int(TOP_K_LOGITS_MB * 2**20) // (4 * min(band, vocab)))
    beaten = torch.cat([_words_above_target(model, part, goal, k, band) for part, goal in zip(flat.split(rows), targets.split(rows))])
    return (beaten < k).float().reshape(out.shape[:-1])


def _words_above_target(model, out: Float[Tensor, "row d_model"], targets: Int[Tensor, " row"], k: int, band: int) -> Int[Tensor, " row"]:
    """How many words other than its target have a larger logit than the target, per row of ``out``: exact below ``k``,
    at least ``k`` where it stops counting (the row left once ``k`` were found)."""
    normed = model.ln_final(out)
    unique, slot = torch.unique(targets, return_inverse=True)
    own = column_logits(model, normed, unique).gather(1, slot[:, None]).squeeze(1)  # each row's target logit
    count = torch.zeros(len(out), dtype=torch.long, device=out.device)
    live = torch.arange(len(out), device=out.device)
    for first in range(0, model.cfg.d_vocab, band):
        if not len(live):
            break
        columns = torch.arange(first, min(first + band, model.cfg.d_vocab), device=out.device)
        above = column_logits(model, normed[live], columns) > own[live, None]
        inside = (targets[live] >= first) & (targets[live] < first + len(columns))  # the target itself never counts
        above[inside.nonzero().squeeze(1), targets[live][inside] - first] = False
        count[live] += above.sum(1)
        live = live[count[live] < k]
    return count


def copy_scores(model, cache, prompts: PromptSet, positions: Positions, k: int = 5, bias: bool = False) -> CopyScores:
    """Copy score of every head (IOI paper §3.3).

    The residual stream after the first block at each named word's position, pushed through the head's
    layer norm and OV circuit as if the head attended there fully (``ov_outputs``; ``bias``: with the value and
    output biases), then the final layer norm and the unembedding: is the word's own token among the top ``k``
    logits? Also with the OV output negated (the bias is added after negating: it does not depend on the word).
    """
    pos = position_matrix(positions, prompts.clean_tokens.shape[0])
    resid = at_positions(cache["blocks.0.hook_resid_post"], pos, 1)  # [batch, word, d_model]
    targets: Int[Tensor, "batch word"] = prompts.clean_tokens.gather(1, pos.to(prompts.clean_tokens.device))
    rows = {1: [], -1: []}
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            out = ov_outputs(model, resid, layer)  # [batch, word, head, d_model]
            constant = output_bias(model, layer) if bias else 0
            for sign in (1, -1):
                rows[sign].append(100 * top_k_hits(model, sign * out + constant, targets[:, :, None], k).mean((0, 1)))
    return CopyScores(torch.stack(rows[1]).cpu(), torch.stack(rows[-1]).cpu(), k, list(positions))


@dataclass
class AttendAndCopy:
    """Copying through QK and OV together: what each head does with the word it attends to most from the end."""

    score: Float[Tensor, "layer head"]  # % of prompts whose most-attended word is in the top k logits of the head's actual output
    attention_to_words: Float[Tensor, "layer head"]  # mean attention from the end to the named words (sum over words)
    k: int
    words: list[str]


def attend_and_copy(model, cache, prompts: PromptSet, positions: Positions, k: int = 5, from_pos: int = -1) -> AttendAndCopy:
    """Does the head attend to a name *and* copy it? Per prompt, the named word the head attends to most from
    ``from_pos``; a hit when that word's token is among the top ``k`` logits of the head's actual output there
    (``z @ W_O``, which weighs every position's value by the head's own attention: QK and OV together), read
    through the final norm and the unembedding as in ``copy_scores``."""
    pos = position_matrix(positions, prompts.clean_tokens.shape[0])
    words = prompts.clean_tokens.gather(1, pos.to(prompts.clean_tokens.device))  # [batch, word]
    n = model.cfg.n_layers
    score, attention = [], []
    with torch.no_grad():
        for layer in range(n):
            pattern = at_positions(cache[get_act_name("pattern", layer)][:, :, from_pos], pos, 2)  # [batch, head, word]
            target = words.gather(1, pattern.argmax(-1))  # [batch, head]
            out = torch.einsum("bhe,hed->bhd", cache[get_act_name("z", layer)][:, from_pos], model.W_O[layer])
            score.append(100 * top_k_hits(model, out, target, k).mean(0))
            attention.append(pattern.sum(-1).mean(0))
    return AttendAndCopy(torch.stack(score).cpu(), torch.stack(attention).cpu(), k, list(positions))


@dataclass
class AttentionContribution:
    """Per head, prompt and word: attention from ``from_pos`` to the word, and the head's logit contribution to it."""

    attention: Float[Tensor, "layer head batch word"]
    contribution: Float[Tensor, "layer head batch word"]
    words: list[str]

    def correlation(self) -> Float[Tensor, "layer head"]:
        """Pearson correlation of attention and contribution over all (prompt, word) points, per head."""
        a = self.attention.flatten(2)
        c = self.contribution.flatten(2)
        a, c = a - a.mean(-1, keepdim=True), c - c.mean(-1, keepdim=True)
        return (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1)).clamp_min(1e-12)


def attention_vs_contribution(model, cache, prompts: PromptSet, positions: Positions, from_pos: int = -1) -> AttentionContribution:
    """Attention from ``from_pos`` to each word, and the head's output there dotted with the word's unembedding.

    The output is divided by the final layer-norm scale at ``from_pos``, as in direct logit attribution
    (IOI paper fig. 3c).
    """
    pos = position_matrix(positions, prompts.clean_tokens.shape[0])
    targets = prompts.clean_tokens.gather(1, pos.to(prompts.clean_tokens.device))  # [batch, word]
    from_end = cache.stack_activation("pattern")[:, :, :, from_pos]  # [layer, batch, head, k]
    attention = torch.stack([at_positions(p, pos, 2) for p in from_end])  # [layer, batch, head, word]
    z = cache.stack_activation("z")[:, :, from_pos]  # [layer, batch, head, d_head]
    out = torch.einsum("lbhe,lhed->lbhd", z, model.W_O) / cache["ln_final.hook_scale"][:, from_pos][None, :, None]
    word_dirs = model.W_U[:, targets]  # [d_model, batch, word]
    contribution = torch.einsum("lbhd,dbw->lbhw", out, word_dirs)
    return AttentionContribution(
        attention.permute(0, 2, 1, 3).detach().cpu(), contribution.permute(0, 2, 1, 3).detach().cpu(), list(positions)
    )


def attention_between(cache, n_layers: int, from_positions: Positions, to_positions: Positions) -> Float[Tensor, "layer head from to"]:
    """Mean attention over prompts from each named position to each named position (each prompt's own), for every head."""
    rows = []
    for l in range(n_layers):
        pattern = cache[get_act_name("pattern", l)]  # [batch, head, q, k]
        src, dst = position_matrix(from_positions, pattern.shape[0]), position_matrix(to_positions, pattern.shape[0])
        rows.append(at_positions(at_positions(pattern, src, 2), dst, 3).mean(0))
    return torch.stack(rows).detach().cpu()


def attention_shift(
    model, cache, prompts: PromptSet, candidates: list[Head], readers: list[Head], positions: Positions, from_pos: int = -1
) -> Float[Tensor, "candidate reader word"]:
    """How much each candidate head moves each later reader head's attention (S-inhibition evidence).

    Clean prompts; in variant i the candidate's output z (all positions) takes its corrupted-run value; the
    change of each reader's attention from ``from_pos`` to each word against the clean patterns in ``cache``
    (``clean_cache``), averaged over prompts. All candidates run as one batch. Readers at or before a
    candidate's layer cannot move (causality: nothing forces their 0, a test checks it).
    """
    n_var, n_heads = len(candidates), model.cfg.n_heads
    cand_layers = sorted({c.layer for c in candidates})
    pat_names = sorted({get_act_name("pattern", r.layer) for r in readers})
    with torch.no_grad():
        _, corrupted = run_with_checked_cache(model, prompts.corrupted_tokens, [get_act_name("z", l) for l in cand_layers])
    interventions = []
    for layer in cand_layers:  # variant i swaps in candidate i's corrupted z (a mask over [pos, head, d_head])
        masks = torch.zeros(n_var, 1, n_heads, 1, dtype=torch.bool)
        for i, c in enumerate(candidates):
            masks[i, 0, c.head] = c.layer == layer
        interventions.append(Intervention(get_act_name("z", layer), "corrupted", masks))
    _, stored = run_interventions(
        model, prompts.clean_tokens, prompts.answer_tokens, interventions, {"corrupted": corrupted.cache_dict}, n_var, record=pat_names
    )
    pos = position_matrix(positions, prompts.clean_tokens.shape[0])
    shift = torch.zeros(n_var, len(readers), pos.shape[1])
    for j, r in enumerate(readers):
        name = get_act_name("pattern", r.layer)
        patched = stored[name].reshape(n_var, -1, *stored[name].shape[1:])[:, :, r.head, from_pos]  # [variant, batch, k]
        patched = at_positions(patched.transpose(0, 1), pos, 2).transpose(0, 1)  # [variant, batch, word]
        base = at_positions(cache[name][:, r.head, from_pos], pos, 1)
        shift[:, j] = (patched - base[None]).mean(1).cpu()
    return shift


def composition_scores(model, mode: str = "K") -> Float[Tensor, "layer head layer head"]:
    """Composition scores (Elhage et al. 2021) of every earlier head into every later head: ``[l1, h1, l2, h2]`` is
    ``|W_OV(l1,h1) · R(l2,h2)|_F / (|W_OV|_F |R|_F)`` with R the later head's W_QK (Q), W_QK^T (K) or W_OV (V);
    0 unless l1 < l2. TransformerLens's own ``composition_scores`` on its factored matrices, one earlier layer at a
    time: ``model.all_composition_scores`` gives the same numbers but materialises every pair at once (about 10 GB
    on gpt2-small)."""
    from transformer_lens.utilities.matrix import (
        composition_scores as tl_composition_scores,
    )

    with torch.no_grad():
        ov, qk = model.OV, model.QK
        right = {"Q": qk, "K": qk.T, "V": ov}[mode]
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        out = torch.zeros(n_layers, n_heads, n_layers, n_heads)
        for layer in range(n_layers - 1):
            out[layer, :, layer + 1 :] = tl_composition_scores(ov[layer], right[layer + 1 :]).float().cpu()
    return out


def composition_baseline(scores: Float[Tensor, "layer head layer head"]) -> float:
    """Mean composition score over all pairs of an earlier and a later head (the others are zero)."""
    n_layers = scores.shape[0]
    later = torch.arange(n_layers)[:, None, None, None] < torch.arange(n_layers)[None, None, :, None]
    return float(scores[later.expand_as(scores)].mean())


def composition_pairs(scores: Float[Tensor, "layer head layer head"], senders: list[Head], receivers: list[Head]) -> list[dict]:
    """Composition score of each sender into each later receiver, as ``{from, to, score}``."""
    return [
        {"from": a.label, "to": b.label, "score": round(float(scores[(*a.index, *b.index)]), 6)}
        for a in senders
        for b in receivers
        if a.layer < b.layer
    ]
