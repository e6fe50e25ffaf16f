"""A hook name or filter that matches nothing is an error, never a silent empty cache."""

from __future__ import annotations

import pytest

from helpers.engine.hooks import HookNameError, resolve_hook_names, run_with_checked_cache


def test_unknown_name_raises_with_hint(toy_ioi):
    with pytest.raises(HookNameError, match="hook_pattern"):
        resolve_hook_names(toy_ioi, "blocks.0.attn.hook_attn")


def test_filter_matching_nothing_raises(toy_ioi, ioi_prompts):
    with pytest.raises(HookNameError, match="matched no hook"):
        run_with_checked_cache(toy_ioi, ioi_prompts.clean_tokens, lambda n: n.endswith("hook_attn"))


def test_gated_hook_that_does_not_fire_raises(toy_ioi, ioi_prompts):
    with pytest.raises(HookNameError, match="did not fire"), pytest.warns(UserWarning, match="gated"):
        run_with_checked_cache(toy_ioi, ioi_prompts.clean_tokens, "blocks.0.attn.hook_result")


def test_valid_filter_caches_what_it_names(toy_ioi, ioi_prompts):
    _, cache = run_with_checked_cache(toy_ioi, ioi_prompts.clean_tokens, lambda n: n.endswith("hook_pattern"))
    assert cache["blocks.3.attn.hook_pattern"].shape[1] == toy_ioi.cfg.n_heads
