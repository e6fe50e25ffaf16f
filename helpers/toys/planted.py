"""A model whose circuit is planted by construction: ground truth for edge-level circuit discovery.

**Task: the word two back.** A BOS and ``n_words`` random words; at the final position the model predicts the
word two positions back. The corrupted prompt replaces that word with another; the answers are (clean word,
corrupted word), so the logit difference measures exactly this behaviour.

**Construction** (GPT-2 architecture, 2 layers x 4 heads, d_model 96, weights set by hand, MLPs zero). The
residual stream is cut into subspaces: an *anchor* (+A and -A in every token embedding, so every LayerNorm
divides by a nearly constant std and the model is close to linear in everything else), token codes ``T``
(random unit vectors), one-hot positions ``Pos``, a previous-token space ``P``, an output space ``O`` and a
junk space ``J``.

* ``L0H0`` attends from each position to the one before (its q and k read positions only) and copies the
  token code there into ``P``: a previous-token head.
* ``L1H0`` attends from each position to the one before as well, reads ``P`` there (the token two back) and
  writes it into ``O``, the only space the unembedding reads. ``L1H1`` does the same at 0.3 of the strength: a
  weaker parallel route, so recovering the circuit means finding weak edges too.
* The five other heads are distractors: random attention over tokens and positions, random values read from
  ``T`` (and ``P`` in layer 1), written into ``J``, which nothing reads. They see the corrupted word change,
  so their edges carry activation differences, but none of it reaches the logits except through the tiny
  LayerNorm-scale coupling.

The clean - corrupted difference is one word's token code, so exactly five edges carry it to the logits:
``PLANTED_EDGES``. Every other edge changes the logit difference by orders of magnitude less (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from helpers.analyses.pattern_scores import random_word_ids

PLANTED_EDGES = ("input->L0H0.v", "L0H0->L1H0.v", "L1H0->logits", "L0H0->L1H1.v", "L1H1->logits")
BACKUP_STRENGTH = 0.3  # L1H1 writes the answer too, at this fraction of L1H0's strength
N_POSITIONS = 16
D_MODEL, N_HEADS = 96, 4
D_HEAD = D_MODEL // N_HEADS
ANCHOR = 20.0
_T, _POS, _P, _O, _J = slice(2, 26), slice(26, 42), slice(42, 66), slice(66, 90), slice(90, 96)


def build_planted_model(tokenizer, out_dir: str | Path, seed: int = 0) -> Path:
    """Save the planted model (with ``tokenizer``) as a Hugging Face folder that ``models.load_model`` boots."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=N_POSITIONS,
        n_embd=D_MODEL,
        n_layer=2,
        n_head=N_HEADS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    codes = torch.randn(vocab, D_HEAD, generator=gen)
    codes = codes / codes.norm(dim=-1, keepdim=True)
    scale = (2 * ANCHOR**2 / D_MODEL) ** 0.5  # LayerNorm's std, set by the anchor: LN(x) ~ x / scale
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        t = model.transformer
        t.wte.weight[:, 0], t.wte.weight[:, 1] = ANCHOR, -ANCHOR
        t.wte.weight[:, _T] = codes
        t.wpe.weight[:, _POS] = torch.eye(N_POSITIONS)
        for block in t.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        t.ln_f.weight.fill_(1.0)
        shift = 25.0  # q·k of position p with p-1, before LayerNorm and 1/sqrt(d_head): sharp attention to the previous token
        circuit = {0: {0: 1.0}, 1: {0: 1.0, 1: BACKUP_STRENGTH}}  # layer -> {head: output strength}
        for layer, (read, write) in enumerate([(_T, _P), (_P, _O)]):
            w, w_out = t.h[layer].attn.c_attn.weight, t.h[layer].attn.c_proj.weight  # Conv1D: x @ W
            for h, strength in circuit[layer].items():
                q, k, v = (slice(i * D_MODEL + h * D_HEAD, i * D_MODEL + (h + 1) * D_HEAD) for i in range(3))
                for pos in range(N_POSITIONS):
                    w[_POS.start + pos, q.start + pos] = shift
                    w[_POS.start + pos, k.start + pos + 1] = shift
                w[read, v] = torch.eye(D_HEAD)
                w_out[h * D_HEAD : (h + 1) * D_HEAD, write] = strength * scale * torch.eye(D_HEAD)
            for h in range(len(circuit[layer]), N_HEADS):  # distractors: random attention and values, written into the junk space
                cols = [slice(i * D_MODEL + h * D_HEAD, i * D_MODEL + (h + 1) * D_HEAD) for i in range(3)]
                for c in cols[:2]:
                    w[_T, c] = torch.randn(D_HEAD, D_HEAD, generator=gen) * 2
                    w[_POS, c] = torch.randn(N_POSITIONS, D_HEAD, generator=gen) * 2
                w[_T, cols[2]] = torch.randn(D_HEAD, D_HEAD, generator=gen)
                if layer == 1:
                    w[_P, cols[2]] = torch.randn(D_HEAD, D_HEAD, generator=gen)
                w_out[h * D_HEAD : (h + 1) * D_HEAD, _J] = torch.randn(D_HEAD, _J.stop - _J.start, generator=gen)
        model.lm_head.weight[:, _O] = 8 * scale * codes
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def planted_task(
    model, n_words: int = 8, batch: int = 16, seed: int = 0
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch 2"]]:
    """(clean, corrupted, answers) for the word-two-back task: ``BOS w1..wn``; the corrupted prompt has another word
    at position n-2; answers are (clean word, corrupted word) at that position."""
    if n_words + 1 > N_POSITIONS:
        raise ValueError(f"n_words must be at most {N_POSITIONS - 1} (the planted model's positions)")
    words = torch.tensor(random_word_ids(model.tokenizer))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(len(words), generator=gen)[: n_words + 1] for _ in range(batch)])  # distinct per prompt
    clean = torch.cat([torch.full((batch, 1), model.tokenizer.bos_token_id or 0), words[picks[:, :n_words]]], dim=1)
    target = n_words - 2  # position of the word two back from the final position n_words
    corrupted = clean.clone()
    corrupted[:, target] = words[picks[:, n_words]]
    answers = torch.stack([clean[:, target], corrupted[:, target]], dim=1)
    device = model.cfg.device
    return clean.to(device), corrupted.to(device), answers.to(device)
