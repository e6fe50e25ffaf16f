"""FLOP counts of the forward computations patching needs, from the model's config alone (no torch).

A count is what the exact algorithm must compute, nothing the implementation happens to do on top: the
matrix products of each block (query/key/value and output projections, attention scores and their
weighting of values, the MLP), and the unembedding, at 2 FLOPs per multiply-add. Norms, softmax,
activation functions, rotary embeddings and residual additions are linear in the width and left out (under
2% of a block at gpt2-small's size). Attention is counted causally: a query at position p reads p + 1 keys.

A patched run from layer L whose earliest patched position is s (``run_flops``) needs: blocks L..n-1 at
positions >= s (positions before s are unchanged and their keys and values cached), except the last block,
which needs keys and values at positions >= s but its query, attention output and MLP at the final
position only, and the unembedding of the final position into the vocabulary columns the metric reads: two for a
logit difference (the answers'; ``engine.forward`` computes only those), every column for a loss or KL. Counting the
whole vocabulary for a logit difference overstated the sweeps, and their fraction of the matmul limit with them:
gpt2-small's resid_pre at 8 prompts by 18% (461 against 391 GFLOP), Gemma-3's head_out_by_pos by 62%.
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.engine.capabilities import kv_heads


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a transformer's FLOPs (read from a TransformerLens config with ``of``)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    gated_mlp: bool
    d_vocab: int

    @classmethod
    def of(cls, cfg) -> ModelShape:
        return cls(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=kv_heads(cfg),
            d_head=cfg.d_head,
            d_mlp=cfg.d_mlp or 4 * cfg.d_model,
            gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
            d_vocab=cfg.d_vocab,
        )

    def key_value(self) -> int:
        """FLOPs of one position's keys and values (one per key/value head)."""
        return 2 * 2 * self.d_model * self.n_kv_heads * self.d_head

    def query_output_mlp(self) -> int:
        """FLOPs of one position's query, attention output projection and MLP (excluding the attention itself)."""
        return 2 * 2 * self.d_model * self.n_heads * self.d_head + (3 if self.gated_mlp else 2) * 2 * self.d_model * self.d_mlp

    def attention(self, position: int) -> int:
        """FLOPs of the scores and weighted values of one query at ``position`` (it reads ``position + 1`` keys)."""
        return 2 * 2 * self.n_heads * self.d_head * (position + 1)

    def block(self, start: int, n_pos: int, final_only: bool = False) -> int:
        """One block computing positions ``start..n_pos-1`` of one prompt; ``final_only``: everything but the keys and
        values at the final position only."""
        queries = [n_pos - 1] if final_only else range(start, n_pos)
        return (n_pos - start) * self.key_value() + sum(self.query_output_mlp() + self.attention(p) for p in queries)

    def unembed(self, n_positions: int = 1, columns: int | None = None) -> int:
        """FLOPs of unembedding ``n_positions`` positions into ``columns`` vocabulary columns (default: all)."""
        return 2 * self.d_model * (self.d_vocab if columns is None else columns) * n_positions


def run_flops(shape: ModelShape, layer: int, start: int, n_pos: int, n_prompts: int, columns: int | None = None) -> int:
    """Minimal FLOPs of one patched run of ``n_prompts`` prompts (all variants together) from block ``layer``
    whose earliest patched position is ``start``, its metric reading ``columns`` of the vocabulary at the final
    position (default: all; 2 for a logit difference; see the module docstring)."""
    blocks = sum(shape.block(start, n_pos, final_only=(l == shape.n_layers - 1)) for l in range(layer, shape.n_layers))
    return n_prompts * (blocks + shape.unembed(columns=columns))


def forward_flops(shape: ModelShape, n_pos: int, n_prompts: int) -> int:
    """FLOPs of one plain forward of ``n_prompts`` prompts: every block and the unembedding at every position (what
    ``transformer_lens.patching`` runs per cell)."""
    return n_prompts * (shape.n_layers * shape.block(0, n_pos) + shape.unembed(n_pos))
