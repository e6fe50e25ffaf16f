"""Repeated random tokens and the attention-pattern scores of every head on them (and tasks built from them).

Scores on a sequence ``BOS, r, r`` (r = ``seq_len`` random tokens), from the attention pattern [q, k]:
* previous-token score: mean attention from each token to the token just before it;
* duplicate-token score: mean attention from each token of the second r to the same token in the first r;
* induction score: mean attention from each token of the second r to the token *after* its earlier copy.
"""

from __future__ import annotations

import math
import random

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.hooks import resolve_hook_names


def random_word_ids(tokenizer) -> list[int]:
    """Ids of space-prefixed alphabetic tokens (``ĠMary`` in byte-level BPE, ``▁Mary`` in SentencePiece): random "words"
    for GPT-2, Llama-style, Gemma and the toy vocabularies alike."""
    ids = sorted(
        i for t, i in tokenizer.get_vocab().items() if t[:1] in ("Ġ", "▁") and t[1:].isalpha()
    )  # get_vocab order varies per process
    if len(ids) < 50:
        special = {tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id}
        ids = [i for i in range(len(tokenizer)) if i not in special]
    return ids


def n_prefix(model) -> int:
    """1 if the model's prompts start with a BOS token (its own convention, ``cfg.default_prepend_bos``), else 0."""
    return int(bool(model.cfg.default_prepend_bos) and model.tokenizer.bos_token_id is not None)


def repeated_random_tokens(model, seq_len: int, batch: int, seed: int) -> Int[Tensor, "batch prefix+2*seq_len"]:
    """``BOS, r, r`` (``r, r`` for models whose prompts start without BOS) with r uniform over random words
    (see ``random_word_ids``), deterministic in ``seed``."""
    allowed = torch.tensor(random_word_ids(model.tokenizer))
    gen = torch.Generator().manual_seed(seed)
    r = allowed[torch.randint(len(allowed), (batch, seq_len), generator=gen)]
    bos = torch.full((batch, n_prefix(model)), model.tokenizer.bos_token_id or 0)
    return torch.cat([bos, r, r], dim=1).to(model.cfg.device)


def pattern_scores(patterns: Float[Tensor, "layer batch head q k"], seq_len: int, first: int = 1) -> dict[str, Float[Tensor, "layer head"]]:
    """Previous-token, duplicate-token and induction scores from patterns on ``BOS, r, r`` (see module docstring);
    ``first`` is the position of r's first token (0 without BOS)."""
    second = slice(first + seq_len, first + 2 * seq_len)  # query positions of the second copy

    def diag(offset: int, queries: slice) -> Tensor:
        d = patterns.diagonal(offset=-offset, dim1=-2, dim2=-1)  # [layer, batch, head, q - offset]
        start = queries.start - offset
        return d[..., start : queries.stop - offset].mean((1, 3))

    return {
        "prev_token": diag(1, slice(1, first + 2 * seq_len)),
        "duplicate_token": diag(seq_len, second),
        "induction": diag(seq_len - 1, second),
    }


def repeated_token_scores(
    model, seq_len: int, batch: int, seed: int, tokens: Tensor | None = None
) -> tuple[dict[str, Tensor], Float[Tensor, "batch pos"]]:
    """Head scores on repeated random tokens (or on given ``[BOS,] r, r`` ``tokens``) and the per-token loss."""
    tokens = repeated_random_tokens(model, seq_len, batch, seed) if tokens is None else tokens
    first = tokens.shape[1] - 2 * seq_len
    names = resolve_hook_names(model, [get_act_name("pattern", l) for l in range(model.cfg.n_layers)])
    with torch.no_grad():
        loss, cache = model.run_with_cache(tokens, names_filter=names, return_type="loss", loss_per_token=True)
    patterns = cache.stack_activation("pattern")  # [layer, batch, head, q, k]
    return {k: v.cpu() for k, v in pattern_scores(patterns, seq_len, first).items()}, loss.cpu()


def repeated_text_tokens(model, seq_len: int, n_texts: int, seed: int) -> tuple[list[str], Int[Tensor, "batch 1+2*seq_len"]]:
    """``n_texts`` texts ``r r`` of ``seq_len`` distinct random words each, and their tokens (BOS first)."""
    rng = random.Random(seed)
    vocab = words_that_round_trip(model.tokenizer, random_word_ids(model.tokenizer), 4 * seq_len * n_texts, rng)
    texts = []
    for _ in range(n_texts):
        r = "".join(rng.sample(vocab, seq_len))
        texts.append(r + r)
    tokens = model.to_tokens(texts)  # as detect_head tokenizes them: BOS first only where the model prepends one
    if tokens.shape[1] - 2 * seq_len not in (0, 1):
        raise ValueError(f"random words did not tokenize to one token each ({tokens.shape[1]} tokens for {2 * seq_len} words)")
    return texts, tokens


def words_that_round_trip(tokenizer, ids: list[int], n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` texts of ``ids`` (in random order) that tokenize back to that one token: a real tokenizer has
    vocabulary entries its merges never produce from the plain text (SmolLM2: 24 random words gave 31 tokens)."""
    found = []
    for i in rng.sample(ids, len(ids)):
        text = tokenizer.decode([i])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == [i]:
            found.append(text)
            if len(found) == n:
                break
    return found


def head_detector_agreement(model, seq_len: int = 12, n_texts: int = 3, seed: int = 0) -> dict[str, float]:
    """Max |ours - TransformerLens ``detect_head``| per score kind on ``r r`` texts, after the detector's scaling.

    ``detect_head`` ("mul") averages over all query rows of the sequence, ours over the scored ones only, so
    ours × (scored queries) / (sequence length) must equal it exactly.
    """
    from transformer_lens.head_detector import detect_head

    texts, tokens = repeated_text_tokens(model, seq_len, n_texts, seed)
    ours, _ = repeated_token_scores(model, seq_len, 0, 0, tokens=tokens)
    names = {"prev_token": "previous_token_head", "duplicate_token": "duplicate_token_head", "induction": "induction_head"}
    out = {}
    n_pos = tokens.shape[1]
    for kind, name in names.items():
        n_scored = n_pos - 1 if kind == "prev_token" else seq_len
        ref = torch.stack([detect_head(model, t, name) for t in texts]).mean(0)
        out[kind] = float((ours[kind] * n_scored / n_pos - ref).abs().max())
    return out


def repeated_tokens(model, text: str) -> Int[Tensor, "1 pos"]:
    """``[BOS,] t, t``: the tokens of ``text`` written twice, tokenized once (concatenating the strings could fuse
    tokens at the seam, so the second half would not repeat the first)."""
    once = model.to_tokens(text, prepend_bos=False)
    with_bos = model.to_tokens(text)
    return torch.cat([with_bos[:, : with_bos.shape[1] - once.shape[1]], once, once], dim=1)


def uniform_loss(model) -> float:
    """Loss of a uniform guess over the random words that ``repeated_random_tokens`` draws from."""
    return math.log(len(random_word_ids(model.tokenizer)))


def induction_task(
    model, seq_len: int, batch: int, seed: int, copied: int | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch 2"]]:
    """(clean, corrupted, answers) for induction as a patching task: clean is ``[BOS,] r, r[:copied]`` (the second copy
    cut after ``copied`` words, default half), so the next word is ``r[copied]``; corrupted replaces the first copy by
    other random words ``s`` (nothing to induct from); answers are ``(r[copied], s[copied])``."""
    copied = seq_len // 2 if copied is None else copied
    if not 0 < copied < seq_len:
        raise ValueError(f"copied must be between 1 and seq_len - 1 ({seq_len - 1}), not {copied}")
    both = repeated_random_tokens(model, 2 * seq_len, batch, seed)  # [BOS,] r s, r s: two independent word runs
    first = n_prefix(model)
    r, s = both[:, first : first + seq_len], both[:, first + seq_len : first + 2 * seq_len]
    prefix = both[:, :first]
    clean = torch.cat([prefix, r, r[:, :copied]], dim=1)
    corrupted = torch.cat([prefix, s, r[:, :copied]], dim=1)
    return clean, corrupted, torch.stack([r[:, copied], s[:, copied]], dim=1)
