"""Hook-name resolution that refuses to match nothing.

TransformerLens silently caches nothing for a filter that matches no hook (the seeds' ``hook_attn`` filter
printed zeros for this reason). Every helper here resolves names against ``model.hook_dict`` first and raises
``HookNameError`` when a name is unknown or a filter matches nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

NameSpec = str | Iterable[str] | Callable[[str], bool]


class HookNameError(KeyError):
    """A hook name or filter matched no hook point of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def resolve_hook_names(model, spec: NameSpec) -> list[str]:
    """The hook names ``spec`` (a name, names, or a predicate) selects; raises HookNameError if none or unknown."""
    available = model.hook_dict
    if callable(spec):
        names = [n for n in available if spec(n)]
        if not names:
            raise HookNameError("the names filter matched no hook point of this model; e.g. hook names: " + ", ".join(list(available)[:6]))
        return names
    names = [spec] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        hint = (
            "use 'hook_pattern' for attention patterns (there is no 'hook_attn')"
            if any("hook_attn" == n.rsplit(".", 1)[-1] for n in unknown)
            else "see model.hook_dict for valid names"
        )
        raise HookNameError(f"unknown hook name(s) {unknown or names}: {hint}")
    return names


def last_position(x: Tensor, hook=None) -> Tensor:
    """A forward hook that passes on the final position only."""
    return x[:, -1:]


UNEMBED_LAST = ("unembed.hook_in", last_position)  # a forward hook: unembed the final position only (what metrics read)


def run_with_checked_cache(model, tokens, spec: NameSpec, all_positions: bool = False, **kwargs) -> tuple:
    """``model.run_with_cache`` restricted to the hooks ``spec`` selects, which must all be found in the cache:
    (logits, cache). The logits are the final position's, [batch, 1, d_vocab] (what the metrics read; 1.3 GB less
    at 64 prompts of a 262k vocabulary), or every position's with ``all_positions``. No autograd graph is kept
    (cached activations are data; gradient methods run their own forward)."""
    names = resolve_hook_names(model, spec)
    with torch.no_grad(), model.hooks(fwd_hooks=[] if all_positions else [UNEMBED_LAST]):
        logits, cache = model.run_with_cache(tokens, names_filter=names, **kwargs)
    missing = [n for n in names if n not in cache.cache_dict]
    if missing:
        raise HookNameError(f"hooks {missing} did not fire (gated hooks need e.g. model.set_use_attn_result(True))")
    return logits, cache


def recording_hook(store: dict, name: str, fresh: bool = False) -> Callable:
    """A forward hook that keeps its activation in ``store[name]`` (``name`` as requested: the bridge may call
    the hook with a canonical alias in ``hook.name``) and leaves it unchanged.

    ``fresh``: record and pass on a copy, for gradients. Then d metric / d recorded activation covers exactly
    what an edit of this hook reaches. Some bridge hooks see a tensor that other paths also use unhooked: the
    hook's output at ``hook_resid_mid`` / ``hook_mlp_in`` feeds only the MLP, while the residual stream goes on
    with the tensor the hook was given, so the gradient with respect to that tensor also counts the residual path."""

    def record(act, hook=None):
        if fresh:
            act = act.clone()
        store[name] = act
        return act

    return record


def zero_activation(act: Tensor, hook=None) -> Tensor:
    """A forward hook that sets its activation to zero."""
    return torch.zeros_like(act)
