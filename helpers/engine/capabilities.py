"""What an architecture can do, and what this package has measured about a loaded model.

* ``NotSupported``: an analysis that does not exist for an architecture (raised before any work, with the reason);
* ``architecture`` / ``kv_heads``: the facts every "is this supported" question starts from;
* ``model_state``: one store per loaded model for the verdicts of the probes (does a hook fire, does a shortcut
  reproduce the plain forward, which receiver forks were made) and what they reuse. It lives beside the model, not in
  its ``__dict__``, and goes with it (weak keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

_STATE: WeakKeyDictionary = WeakKeyDictionary()


class NotSupported(ValueError):
    """An analysis that does not exist for this architecture (e.g. resid_mid with parallel attention and MLP)."""


def architecture(model) -> str:
    """The Hugging Face class the bridge wraps (e.g. ``LlamaForCausalLM``), or the model's own class."""
    return type(getattr(model, "original_model", model)).__name__


def kv_heads(cfg) -> int:
    """Key/value heads per layer: fewer than the query heads under grouped-query attention, else as many."""
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads


def model_state(model, name: str, factory: Callable[[], Any] = dict) -> Any:
    """The store ``name`` of this loaded model (``factory()`` on first use): e.g. ``"fast_paths"``, the verdicts of
    the shortcuts checked on it (``interventions._verified``)."""
    stores = _STATE.setdefault(model, {})
    if name not in stores:
        stores[name] = factory()
    return stores[name]


def forget(model, name: str) -> Any:
    """Drop the store ``name`` of this model (the next use starts empty: every probe is made again); returns it."""
    return _STATE.get(model, {}).pop(name, None)
