"""A base run's keys and values (``KVPrefix``), so that a patch recomputes only the positions it can change.

Attention is causal: a patch whose earliest patched position is ``p`` changes nothing before ``p``. With the base
run's keys and values (the model's own Hugging Face KV cache) only positions ``>= p`` are recomputed, the way
generation extends a prompt; ``engine.forward.suffix_ok`` checks once per model that this is exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from jaxtyping import Float, Int
from torch import Tensor

from helpers.engine.capabilities import architecture
from helpers.engine.shortcuts import quiet_cache_rename


@dataclass(eq=False)
class KVPrefix:
    """The keys and values every attention layer computed in a base run, as the model's own Hugging Face KV cache
    holds them (per layer ``[batch, kv_head, pos, d_head]``: after rotary embeddings, one per key/value group).

    A run that changes nothing before position ``start`` takes positions ``< start`` from here and recomputes
    positions ``>= start`` only (``cache``): exact, because attention is causal.
    """

    keys: list[Float[Tensor, "batch kv_head pos d_head"]]
    values: list[Float[Tensor, "batch kv_head pos d_head"]]
    # the model's own output on the run's first two prompts (final position, whole vocabulary): what a run of them from a
    # later block is checked against (``forward.start_reference`` fills it on first use, one forward for every layer)
    probe_logits: Float[Tensor, "2 1 d_vocab"] | None = field(default=None, repr=False)

    @property
    def n_pos(self) -> int:
        return self.keys[0].shape[2]

    def __repr__(self) -> str:
        batch, n_kv, n_pos, d_head = self.keys[0].shape
        return f"KVPrefix({len(self.keys)} layers x {batch} prompts x {n_pos} positions, {n_kv} key/value heads of {d_head})"

    def cache(self, start: int, n_var: int = 1, n_prompts: int | None = None, from_layer: int = 0, rows: Int[Tensor, " row"] | None = None):
        """A fresh Hugging Face cache of positions ``< start`` of every layer, for ``n_var`` copies of the batch
        (variant-major; ``n_prompts``: of its first prompts only; ``rows``: instead, the prompt of each row, e.g. the
        points of an integrated-gradients path); the forward that receives it extends it in place,
        so every run gets its own. ``from_layer``: the first block the run computes; the cache of a block before it
        is never read (a forward from ``from_layer`` skips or discards those blocks), so it holds a view of the first
        prompt's keys and values of the right shape instead of copies (the model reads the cache's length there)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k, v = (k[:n_prompts, :, :start], v[:n_prompts, :, :start]) if rows is None else (k[rows, :, :start], v[rows, :, :start])
            if layer < from_layer:
                k, v = (t[:1].expand(n_var * len(t), -1, -1, -1) for t in (k, v))
            else:
                k, v = k.repeat(n_var, 1, 1, 1), v.repeat(n_var, 1, 1, 1)
            stored = DynamicLayer()  # filled directly: ``update`` would copy the repeated keys once more
            stored.lazy_initialization(k, v)
            stored.keys, stored.values = k, v
            cache.layers.append(stored)
        return cache


def run_with_kv(model, tokens: Int[Tensor, "batch pos"], **kwargs) -> tuple[Tensor, object, KVPrefix | None]:
    """``model.run_with_cache(tokens, **kwargs)`` that also keeps the run's keys and values (the model fills the Hugging
    Face cache it is handed, in the same forward): logits, activation cache, and the ``KVPrefix`` (None, with a
    warning, where the model leaves the cache empty; patches then recompute every position)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with quiet_cache_rename():
        logits, activations = model.run_with_cache(tokens, past_key_values=cache, **kwargs)
    prefix = KVPrefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]) if cache.layers else None
    if prefix is None or len(prefix.keys) != model.cfg.n_layers or any(k.shape[:3:2] != tokens.shape for k in prefix.keys):
        shapes = [] if prefix is None else [tuple(k.shape) for k in prefix.keys]
        warnings.warn(f"{architecture(model)}: no usable key/value cache ({shapes}); patches recompute every position", stacklevel=2)
        return logits, activations, None
    return logits, activations, prefix
