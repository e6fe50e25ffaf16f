"""The one runner that applies interventions through the model's own forward pass, computing only what they change.

Interventions are values (``engine.interventions``); this module runs them.

``run_interventions`` applies a list of them to many variants at once: variant ``i`` is one copy of the base
batch, stacked along the batch axis (variant-major). It starts at the earliest intervened layer from the
base run's cached residual stream, through the bridge's own ``forward(resid, start_at_layer=L)`` — RoPE,
causal and sliding-window masks, parallel blocks, post-norms and soft-capping are whatever the model
itself does; no code here steps through blocks by hand. It computes only what a patch can change:

* **layers**: the blocks before ``L`` are not computed: their outputs would be discarded by
  ``start_at_layer`` anyway, so they are stood in for by a pass-through for the duration of the call (the
  model's layer loop, with its per-layer masks and position embeddings, is unchanged);
* **positions**: attention is causal, so a patch whose earliest patched position is ``p`` changes nothing
  at positions before ``p``. With the base run's keys and values (``KVPrefix``, the model's own Hugging Face
  KV cache) only positions ``>= p`` are recomputed, the way generation extends a prompt: the model derives
  the rotary offsets, causal and sliding-window masks from the cache length, and grouped-query caches keep
  their key/value groups;
* **the last block** runs its MLP at the final position only (its other positions are read by nothing),
  unless a hook acts on or after that MLP;
* **the unembedding** computes what the metric reads (``metrics.Metric``: its positions and vocabulary): for the
  default logit difference, the final position and the answers' two vocabulary columns only (``answer_columns``:
  on Gemma-3, 262,144 words, the full unembedding costs more per token than a block). A metric that reads every
  position (e.g. the sequence loss of ``metrics.LOSSES``) recomputes every position from the start layer.

Each saving is checked the first time a model uses it (per start layer): the fast result must equal the
plain computation (the bridge's own ``start_at_layer`` forward, all positions, every block) to 1e-5;
otherwise that model falls back to the plain computation for good, with a warning (exact, only slower).
The start itself is checked too, against the model's output from the tokens (``shortcuts.start_exact``): where the
bridge's forward from a block is not exact (BLOOM), runs start from the tokens. The checks live in
``engine.shortcuts`` (``fast_paths(model)`` lists the verdicts). A run with the base run's keys
and values checks its start layer against the model's own output instead (``start_run``): one forward settles the
skip and serves as the suffix check's reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache, partial

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from helpers.engine.hooks import UNEMBED_LAST, recording_hook
from helpers.engine.interventions import Intervention, hooks_for, start_layer, suffix_start
from helpers.engine.kv_cache import KVPrefix
from helpers.engine.metrics import LOGIT_DIFF, Metric
from helpers.engine.shortcuts import (
    acts_on_last_mlp_or_later,
    answer_columns,
    fast_start_ok,
    full_vocabulary,
    last_mlp_at_final_position,
    last_mlp_ok,
    quiet_cache_rename,
    same_output,
    settle_exact,
    settled,
    skip_blocks_before,
    start_exact,
    verified,
)


@dataclass(frozen=True)
class MetricReader:
    """``metric`` read from the logits of ``n_var`` stacked copies of a batch (``reading`` makes one): ``columns`` (the
    answers' token ids, or their columns where only those are unembedded) and ``tokens`` of one copy (None for a
    metric that does not read them)."""

    metric: Metric
    columns: Int[Tensor, "batch 2"]
    tokens: Int[Tensor, "batch pos"] | None = None

    def __call__(self, logits: Float[Tensor, "rows pos vocab"], n_var: int) -> Float[Tensor, "variant batch *outputs"]:
        tokens = None if self.tokens is None else self.tokens.repeat(n_var, 1)
        values = self.metric(logits, tokens, self.columns.repeat(n_var, 1))
        return values.reshape(n_var, -1, *values.shape[1:])


@contextmanager
def reading(
    model, metric: Metric, answers: Int[Tensor, "batch 2"], tokens: Int[Tensor, "batch pos"] | None = None
) -> Iterator[MetricReader]:
    """Within it, the model unembeds only the vocabulary ``metric`` reads (the two answer columns where that is
    verified exact, ``shortcuts.answer_columns``); yields the reader of its value."""
    with answer_columns(model, answers) if metric.vocabulary == "answers" else nullcontext(answers) as columns:
        yield MetricReader(metric, columns, tokens)


def run_interventions(
    model,
    tokens: Int[Tensor, "batch pos"],
    answers: Int[Tensor, "batch 2"],
    interventions: Sequence[Intervention],
    sources: Mapping[str, Mapping[str, Tensor]],
    n_var: int,
    base_cache: Mapping[str, Tensor] | None = None,
    record: Sequence[str] = (),
    prefix: KVPrefix | None = None,
    metric: Metric = LOGIT_DIFF,
    record_suffix: bool = False,
) -> tuple[Float[Tensor, "variant batch *outputs"], dict[str, Tensor]]:
    """``metric`` (per prompt; the logit difference by default) of ``n_var`` copies of ``tokens`` under
    ``interventions``, and the recorded hooks.

    With ``base_cache`` (the unintervened run of ``tokens``, holding ``blocks.L.hook_resid_pre``) the run starts
    at the earliest intervened layer L from the cached residual stream (exact: nothing before L changes);
    otherwise it runs from the tokens. With ``prefix`` (the same run's keys and values) it also recomputes only
    the positions from the earliest one any intervention changes (exact by causality), unless hooks are recorded
    (they are returned for every position) or the metric reads every position. ``record``: hook names whose
    activations (variant-major) are returned; ``record_suffix``: recorded hooks that ``base_cache`` holds do not stop
    the position saving: their positions before the recomputed ones are the base run's (the same there, by causality).
    """
    recorded: dict[str, Tensor] = {}
    record_hooks = [(name, recording_hook(recorded, name)) for name in record]
    layer = start_layer(interventions, record)
    resid_name = None if layer is None else get_act_name("resid_pre", layer)
    last_only = metric.positions == "last"
    with torch.no_grad(), reading(model, metric, answers, tokens) as read:
        from_block = base_cache is not None and resid_name in base_cache
        if from_block:
            resid = base_cache[resid_name]
            reference = None
            if last_only and prefix is not None:  # checked against the model's own output, made once per prefix
                reference = start_run(model, resid, layer, partial(start_reference, model, tokens, prefix), own=True)
            if reference is not None and not settled(model, ("skip_blocks", layer)):
                reference()  # settles the skip of the blocks before ``layer``, and the start itself, from the model's own output
            from_block = start_exact(model, layer)
        if not from_block:
            unembed = [UNEMBED_LAST] if last_only else []
            with model.hooks(fwd_hooks=hooks_for(interventions, sources, n_var) + record_hooks + unembed):
                logits = model(tokens.repeat(n_var, 1))
        else:
            suffix = prefix is not None and last_only and (not record or (record_suffix and all(n in base_cache for n in record)))
            start = suffix_start(interventions, resid.shape[1], sources, base_cache) if suffix else 0
            if start and not suffix_ok(model, resid, layer, prefix, reference=reference):
                start = 0
            hooks = hooks_for(interventions, sources, n_var, start) + record_hooks
            stacked = resid[:, start:].repeat(n_var, 1, 1)
            if last_only:
                logits = forward_from_layer(model, stacked, layer, hooks, prefix.cache(start, n_var, from_layer=layer) if start else None)
            else:
                logits = logits_from_layer(model, stacked, layer, hooks)
            if start:  # recorded from ``start`` on: the base run's positions before it
                for name, act in recorded.items():
                    before = base_cache[name][:, :start]
                    recorded[name] = torch.cat([before.repeat(n_var, *[1] * (before.dim() - 1)), act], 1)
        return read(logits, n_var), recorded


def forward_from_layer(
    model, resid: Float[Tensor, "batch pos d_model"], layer: int, hooks: list, past=None
) -> Float[Tensor, "batch 1 d_vocab"]:
    """Final-position logits of the bridge's ``forward(resid, start_at_layer=layer)`` under ``hooks``, fast where verified.

    ``past``: a Hugging Face cache of the positions before ``resid`` (``KVPrefix.cache``); ``resid`` then holds the
    residual stream of the later positions only."""
    if not fast_start_ok(model, resid, layer):
        kwargs = {} if past is None else {"past_key_values": past}
        with model.hooks(fwd_hooks=hooks), quiet_cache_rename():
            return model(resid, start_at_layer=layer, **kwargs)[:, -1:]
    return _fast_from_layer(model, resid, layer, hooks, past)


def _fast_from_layer(
    model, resid: Float[Tensor, "batch pos d_model"], layer: int, hooks: list, past=None
) -> Float[Tensor, "batch 1 d_vocab"]:
    """``forward_from_layer``'s verified saving: the blocks before ``layer`` skipped, the final position unembedded (and
    the last block's MLP run there only, where verified and no hook acts on it or later)."""
    kwargs = {} if past is None else {"past_key_values": past}
    shortcuts = [UNEMBED_LAST]
    if not acts_on_last_mlp_or_later(model, hooks) and last_mlp_ok(model):
        shortcuts.append(last_mlp_at_final_position(model))
    with skip_blocks_before(model, layer), model.hooks(fwd_hooks=hooks + shortcuts), quiet_cache_rename():
        return model(resid, start_at_layer=layer, **kwargs)


def checked_start(
    model, resid: Float[Tensor, "batch pos d_model"], layer: int, expected: Float[Tensor, "batch 1 d_vocab"], own: bool = False
) -> Float[Tensor, "batch 1 d_vocab"]:
    """``forward_from_layer(model, resid, layer, [])`` for a probe whose output, ``expected``, is known (the final
    position of the same prompts' run from block 0; under ``full_vocabulary`` both). Where skipping the blocks
    before ``layer`` is not verified yet, the saving's own run comes first: if it reproduces ``expected`` (to
    ``verified``'s tolerance), the model's output itself, the skip is settled exact by it, one forward instead of
    three (the plain start and the fast one that ``fast_start_ok`` compares, then the run). Otherwise nothing is
    settled: ``forward_from_layer`` checks the skip against the plain start as always (and warns if it differs).
    ``own``: ``expected`` is the model's output from the tokens (not a run from block 0), so a match also settles the
    start from ``layer`` itself (``shortcuts.start_exact``)."""
    key = ("skip_blocks", layer)
    if not settled(model, key):
        out = _fast_from_layer(model, resid, layer, [])
        if same_output(out, expected):
            settle_exact(model, key)
            if own:
                settle_exact(model, ("start_at_layer", layer))
            return out
    return forward_from_layer(model, resid, layer, [])


def start_reference(model, tokens: Int[Tensor, "batch pos"], prefix: KVPrefix) -> Float[Tensor, "2 1 d_vocab"]:
    """The model's own output on the first two of ``tokens`` (final position, whole vocabulary), the run whose keys and
    values ``prefix`` holds: one plain forward, kept on ``prefix`` for every start layer (``start_run``)."""
    if prefix.probe_logits is None:
        with torch.no_grad(), full_vocabulary(model):
            prefix.probe_logits = model(tokens[:2])[:, -1:]
    return prefix.probe_logits


def start_run(
    model,
    resid: Float[Tensor, "batch pos d_model"],
    layer: int,
    expected: Callable[[], Float[Tensor, "2 1 d_vocab"]],
    own: bool = False,
) -> Callable[[], Float[Tensor, "2 1 d_vocab"]]:
    """The run from block ``layer`` of the first two prompts of ``resid`` (the residual stream there), final position,
    whole vocabulary, checked against ``expected()``, the same prompts' output from block 0 (``checked_start``): run
    on first call, then kept. It settles the skip of the earlier blocks and is the suffix check's every-position
    reference (``suffix_ok``): two forwards a start layer, four before. Patched runs expect the model's own output
    (``start_reference``), edge evaluations their clean run's; a ``resid`` from another run (e.g. with
    interventions) does not reproduce it and settles nothing. ``own``: ``expected`` is the model's own output (then a
    match settles the start itself too, ``checked_start``)."""

    @cache
    def run() -> Tensor:
        with torch.no_grad(), full_vocabulary(model):
            return checked_start(model, resid[:2], layer, expected(), own)

    return run


def logits_from_layer(model, resid: Float[Tensor, "batch pos d_model"], layer: int, hooks: list) -> Float[Tensor, "batch pos d_vocab"]:
    """Every position's logits of the bridge's ``forward(resid, start_at_layer=layer)`` under ``hooks`` (for metrics
    that read them all, e.g. a sequence loss), without computing the blocks before ``layer`` where that is verified
    exact on this model (once per start layer, against the plain forward; see the module docstring)."""

    def fast(probe: Tensor) -> Tensor:
        with skip_blocks_before(model, layer):
            return model(probe, start_at_layer=layer)

    probe = resid[:2]
    skip = layer > 0 and verified(
        model,
        ("skip_blocks_all_positions", layer),
        lambda: fast(probe),
        lambda: model(probe, start_at_layer=layer),
        f"skipping the blocks before layer {layer} changed the output",
    )
    with model.hooks(fwd_hooks=hooks):
        return fast(resid) if skip else model(resid, start_at_layer=layer)


def suffix_ok(
    model,
    resid: Float[Tensor, "batch pos d_model"],
    layer: int,
    prefix: KVPrefix,
    setting: str = "",
    reference: Callable[[], Tensor] | None = None,
) -> bool:
    """Whether recomputing only the later positions, with the earlier ones' cached keys and values, equals
    recomputing every position on this model (checked once per model and start layer, on two prompts from the
    middle position); ``setting`` names a context the caller runs in (e.g. receiver forks), verified separately.
    ``reference``: the every-position run of those two prompts where the caller has it
    (``forward_from_layer(model, resid[:2], layer, [])``), so that it is not run again."""
    probe, start = resid[:2], resid.shape[1] // 2
    return verified(
        model,
        ("suffix", layer, setting) if setting else ("suffix", layer),
        lambda: forward_from_layer(model, probe[:, start:], layer, [], prefix.cache(start, 1, len(probe), layer)),
        reference or (lambda: forward_from_layer(model, probe, layer, [])),
        f"recomputing only the positions after a patch (earlier keys and values cached) from layer {layer} changed the output",
    )
