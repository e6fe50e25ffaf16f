"""Tiny models of every architecture family researchers use, built offline from configs.

No model hub is reachable here, so tests, the benchmark and the toy trainer build random-init models of
each family with ``transformers``' ``from_config`` and save them as a Hugging Face folder (with any
tokenizer) that ``models.load_model`` boots like a downloaded one. The configs keep what makes a family
different: rotary positions (NeoX, GPT-J, Llama, Mistral, Qwen2, Gemma), parallel attention and MLP blocks
(NeoX, GPT-J), RMSNorm and gated MLPs (Llama-likes), grouped-query attention (fewer key/value heads than
query heads), learned positions with an offset and a post-projection (OPT), Gemma's post-norms,
embedding scaling and logit soft-capping.
"""

from __future__ import annotations

from pathlib import Path

import torch

# family -> (config class name, config kwargs); sizes are tiny so that every test runs in seconds.
_COMMON = dict(tie_word_embeddings=False)
# a Llama-like decoder: grouped-query attention (4 query heads, 2 key/value heads), gated MLP, untied unembedding
_GQA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
    **_COMMON,
)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            do_layer_norm_before=True,
        ),
    ),
    "gptj": ("GPTJConfig", dict(n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            rotary_pct=0.25,
            use_parallel_residual=True,
        ),
    ),
    "llama": (
        "LlamaConfig",
        _GQA,
    ),
    "mistral": (
        "MistralConfig",
        dict(_GQA, sliding_window=None),
    ),
    "qwen2": (
        "Qwen2Config",
        _GQA,
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=64,
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            max_position_embeddings=64,
            sliding_window=8,
        ),
    ),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_CONFIGS)

# Architectures the bridge loads where the engine must check, not assume (``tests/test_other_families.py``): BLOOM (the
# bridge's forward from a block does not reproduce its output; ALiBi, it seems), OLMo-2 (a final norm weight TransformerLens does not fold;
# post-norms only), Granite (logit and residual multipliers), Mixtral (a mixture of experts: no neurons of one MLP).
OTHER_FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),
    "olmo2": (
        "Olmo2Config",
        _GQA,
    ),
    "granite": (
        "GraniteConfig",
        dict(_GQA, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.3),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    ),
}


def family_config(family: str, vocab_size: int, bos_id: int | None, eos_id: int | None, pad_id: int | None, **overrides):
    """The ``transformers`` config of a tiny ``family`` model for a tokenizer with these ids."""
    import transformers

    configs = FAMILY_CONFIGS | OTHER_FAMILY_CONFIGS
    if family not in configs:
        raise KeyError(f"unknown family {family!r}; choose from {tuple(configs)}")
    cls_name, kwargs = configs[family]
    ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return getattr(transformers, cls_name)(vocab_size=vocab_size, **ids, **{**kwargs, **overrides})


def build_family_model(family: str, tokenizer, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a random-init tiny ``family`` model with ``tokenizer`` to ``out_dir`` (a folder ``load_model`` boots)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(
        family,
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    _spread_weights(model, seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _spread_weights(model, seed: int) -> None:
    """Re-draw the weights with a larger spread than the default init (std 0.02), so that attention patterns
    and logit differences are far from uniform and a wrong implementation cannot hide in tiny numbers.
    Norm weights get a random scale around 1 (Gemma's around 0: it adds 1 itself)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5))
            elif "norm" in name or "ln" in name:
                centre = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                if not name.endswith("bias"):
                    p.copy_(centre + 0.2 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
