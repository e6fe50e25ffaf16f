"""Weight-based head analyses: what a head's QK and OV circuits do, read from the weights, no prompts needed.

Following Elhage et al. (2021), a head's effect factors into a QK circuit (where it attends: ``W_Q W_Kᵀ``) and an
OV circuit (what it moves: ``W_V W_O``), both TransformerLens ``FactoredMatrix`` values (``model.QK``, ``model.OV``).

- ``ov_copying``: the full OV circuit ``W_E W_OV W_U`` restricted to a set of tokens (the task's words, or any):
  row t is what the head writes to the logits when it attends to token t. A copying head puts each token's own logit
  first: the score is the fraction of tokens whose own logit is the largest in their row, and the mean rank of the
  own logit (0 = top). Tokens are read through the embedding alone (``W_E``; ``effective_embedding=True`` adds
  MLP0's output on it, the "extended embedding" view of the IOI paper), through the head's own norm module.
- ``qk_tokens``: the full QK circuit ``W_E W_QK W_Eᵀ`` on the same tokens (which source token a destination token
  attends to, from token identity alone).
- ``positional_qk``: the QK circuit on the learned positional embeddings: the attention a head gives from each
  position to each earlier one from position alone, and its average over destinations by offset. Previous-token
  heads peak at offset 1. Rotary models have no positional embedding to read: ``NotSupported``.

- ``ov_singular_tokens`` / ``qk_singular_tokens``: the top singular directions of a head's OV circuit (read through
  the unembedding with TransformerLens's ``SVDInterpreter``: which tokens each output direction promotes and
  suppresses) and of its QK circuit (``FactoredMatrix.svd``, read through the embedding: which destination tokens
  look for which source tokens), with the share of the circuit's squared singular values they hold (how low-rank
  the head is). A singular direction's sign is arbitrary: both ends are shown.

These are approximations by design (each reads one path through the model: token or position alone, the layer norm
applied to that part only); the prompt-based scores (``head_functions``, ``induction_checks``) are the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import SVDInterpreter
from transformer_lens import utilities as utils

from helpers.engine.capabilities import check_positional
from helpers.engine.hooks import recording_hook, zero_activation
from helpers.engine.norms import attention_norm
from helpers.schema.heads import Head


def _normed(model, x: Float[Tensor, "n d_model"], layer: int) -> Float[Tensor, "n d_model"]:
    """``x`` through block ``layer``'s own attention norm (``norms.attention_norm``: ``ln1``, or none where the attention
    reads the residual stream as it is) as if it were the whole residual stream at one position."""
    return attention_norm(model, layer)(x[None])[0]


def embeddings(model, tokens: Int[Tensor, " n"], effective_embedding: bool = False) -> Float[Tensor, "n d_model"]:
    """Token embeddings (``W_E`` rows); with ``effective_embedding``, plus MLP0's output on each token: the model's
    own forward on the token alone (one position, no BOS) with layer 0's attention output silenced, so MLP0 sees the
    token as the first position would (its positional embedding included)."""
    emb = model.W_E[tokens]
    if not effective_embedding:
        return emb
    store: dict = {}
    mlp0 = utils.get_act_name("mlp_out", 0)
    with torch.no_grad():
        model.run_with_hooks(
            tokens[:, None],
            fwd_hooks=[(utils.get_act_name("attn_out", 0), zero_activation), (mlp0, recording_hook(store, mlp0))],
            stop_at_layer=1,
        )
    return emb + store[mlp0][:, 0]


@dataclass
class OVCopying:
    """How much each head's OV circuit copies the given tokens (``ov_copying``)."""

    top1: Float[Tensor, "layer head"]  # fraction of tokens whose own logit is the largest in their row
    mean_rank: Float[Tensor, "layer head"]  # mean rank of the own logit in its row (0 = top; chance ≈ (n - 1) / 2)
    n_tokens: int


def _ov_rows(model, x: Float[Tensor, "n d_model"], layer: int, head: int, tokens: Int[Tensor, " n"]) -> Float[Tensor, "n n"]:
    return (x @ model.OV[layer, head]).AB @ model.W_U[:, tokens]


@torch.no_grad()
def ov_circuit(model, layer: int, head: int, tokens: Int[Tensor, " n"], effective_embedding: bool = False) -> Float[Tensor, "n n"]:
    """Full OV circuit on ``tokens``: row i is the logits (over the same tokens) the head writes when it attends
    fully to token i."""
    return _ov_rows(model, _normed(model, embeddings(model, tokens, effective_embedding), layer), layer, head, tokens)


@torch.no_grad()
def ov_copying(model, tokens: Int[Tensor, " n"], effective_embedding: bool = False) -> OVCopying:
    """``OVCopying`` of every head on ``tokens`` (module docstring). The embeddings (and MLP0's forward) are computed
    once, the norm once per layer."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    top1, rank = torch.zeros(n_layers, n_heads), torch.zeros(n_layers, n_heads)
    emb = embeddings(model, tokens, effective_embedding)
    for layer in range(n_layers):
        x = _normed(model, emb, layer)
        for head in range(n_heads):
            full = _ov_rows(model, x, layer, head, tokens)
            own = full.diagonal()
            ranks = (full > own[:, None]).sum(-1).float()
            top1[layer, head], rank[layer, head] = (ranks == 0).float().mean(), ranks.mean()
    return OVCopying(top1, rank, len(tokens))


@torch.no_grad()
def qk_tokens(model, layer: int, head: int, tokens: Int[Tensor, " n"]) -> Float[Tensor, "dest src"]:
    """Full QK circuit on ``tokens`` (attention scores from token identity alone, before the softmax and scaling)."""
    x = _normed(model, model.W_E[tokens], layer)
    return (x @ model.QK[layer, head]).AB @ x.T


@torch.no_grad()
def positional_qk(model, layer: int, head: int, n_pos: int) -> Float[Tensor, "dest src"]:
    """Attention from each of the first ``n_pos`` positions to each earlier one (rows sum to 1), from the positional
    embeddings alone through the head's QK circuit (scaled and causally masked as the model does)."""
    check_positional(model)
    x = _normed(model, model.W_pos[:n_pos], layer)
    scores = (x @ model.QK[layer, head]).AB @ x.T / model.cfg.d_head**0.5
    mask = torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def attention_by_offset(pattern: Float[Tensor, "dest src"], max_offset: int) -> Float[Tensor, " offset"]:
    """Mean attention at each offset ``dest - src`` in 0..max_offset, over destinations that have that offset."""
    n = pattern.shape[0]
    return torch.stack(
        [pattern.diagonal(-k)[max(0, max_offset - k) :].mean() if k < n else torch.tensor(float("nan")) for k in range(max_offset + 1)]
    )


def previous_token_offsets(model, n_pos: int = 32, max_offset: int = 4) -> Float[Tensor, "layer head offset"]:
    """``attention_by_offset`` of every head's positional pattern (``positional_qk``)."""
    return torch.stack(
        [
            torch.stack([attention_by_offset(positional_qk(model, layer, head, n_pos), max_offset) for head in range(model.cfg.n_heads)])
            for layer in range(model.cfg.n_layers)
        ]
    )


@dataclass
class SingularDirections:
    """The top singular directions of one head's OV or QK circuit, each read as tokens at both ends."""

    layer: int
    head: int
    circuit: str  # "OV" (read through the unembedding) or "QK" (destination and source sides, through the embedding)
    singular_values: Float[Tensor, " n"]
    share: float  # sum of the top n squared singular values over the total (1 = the circuit has rank <= n)
    directions: list[dict]  # per direction: singular value and its tokens

    @property
    def label(self) -> str:
        return Head(self.layer, self.head).label

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "head": self.head,
            "circuit": self.circuit,
            "singular_values": self.singular_values,
            "share": self.share,
            "directions": self.directions,
        }


def _ends(tokenizer, values: Float[Tensor, " d_vocab"], k: int) -> tuple[list[str], list[str]]:
    """The ``k`` tokens with the largest and the ``k`` with the smallest values."""
    top, bottom = values.topk(k).indices, (-values).topk(k).indices
    return [tokenizer.decode([int(t)]) for t in top], [tokenizer.decode([int(t)]) for t in bottom]


def _share(s: Float[Tensor, " rank"], n: int) -> float:
    squares = s.float() ** 2
    return float(squares[:n].sum() / squares.sum().clamp_min(1e-30))


@torch.no_grad()
def ov_singular_tokens(model, layer: int, head: int, n: int = 3, k: int = 8) -> SingularDirections:
    """The top ``n`` singular directions of the head's OV circuit, each read through the unembedding
    (``SVDInterpreter.get_singular_vectors``): the ``k`` tokens it promotes at one end and at the other."""
    logits = SVDInterpreter(model).get_singular_vectors("OV", layer, n, head)[:, 0]  # [d_vocab, n]
    s = model.OV[layer, head].S
    directions = []
    for i in range(n):
        plus, minus = _ends(model.tokenizer, logits[:, i], k)
        directions.append({"direction": i, "singular_value": float(s[i]), "one end": plus, "other end": minus})
    return SingularDirections(layer, head, "OV", s[:n].detach().cpu(), _share(s, n), directions)


@torch.no_grad()
def qk_singular_tokens(model, layer: int, head: int, n: int = 3, k: int = 8) -> SingularDirections:
    """The top ``n`` singular directions of the head's QK circuit (``FactoredMatrix.svd``): for each, the destination
    tokens whose embedding points along it (query side) and the source tokens (key side), both ends; a destination
    token at one end attends most to source tokens at the same end."""
    U, s, V = model.QK[layer, head].svd()
    query, key = model.W_E @ U[:, :n], model.W_E @ V[:, :n]  # [d_vocab, n]
    directions = []
    for i in range(n):
        q_plus, q_minus = _ends(model.tokenizer, query[:, i], k)
        k_plus, k_minus = _ends(model.tokenizer, key[:, i], k)
        directions.append(
            {
                "direction": i,
                "singular_value": float(s[i]),
                "destination, one end": q_plus,
                "source, one end": k_plus,
                "destination, other end": q_minus,
                "source, other end": k_minus,
            }
        )
    return SingularDirections(layer, head, "QK", s[:n].detach().cpu(), _share(s, n), directions)


__all__ = [
    "SingularDirections",
    "ov_singular_tokens",
    "qk_singular_tokens",
    "OVCopying",
    "ov_circuit",
    "ov_copying",
    "qk_tokens",
    "positional_qk",
    "attention_by_offset",
    "previous_token_offsets",
    "embeddings",
]
