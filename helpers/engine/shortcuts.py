"""Verified shortcuts: savings of the forward pass, each checked against the plain computation before it is used.

``verified`` runs a saving and the plain computation once per model and key, to 1e-5; a saving that is not exact
is switched off for that model for good, with a warning (exact, only slower). ``fast_paths(model)`` lists the
verdicts. The savings: skipping the blocks before the start layer (``skip_blocks_before``), the last block's MLP
at the final position only, and unembedding only the answers' vocabulary columns (``answer_columns``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor

from helpers.engine.capabilities import architecture, model_state, probe_tokens
from helpers.engine.hooks import UNEMBED_LAST, last_position


@contextmanager
def quiet_cache_rename():
    """Silence transformers' notice that ``past_key_values`` is renamed ``cache`` (5.24+): the bridge passes it on under
    the old name, and whether the cache takes effect is checked by ``suffix_ok``, not assumed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


class _Columns(torch.nn.Module):
    """A linear unembedding restricted to some vocabulary columns (rows of its weight); ``full`` is the whole one."""

    def __init__(self, linear: torch.nn.Linear, columns: Tensor):
        super().__init__()
        self.weight = linear.weight[columns].detach()  # gradients flow to the activations, never to the weights
        self.bias = None if linear.bias is None else linear.bias[columns].detach()
        self.full = (linear,)  # a tuple: not a submodule, so its parameters are not listed twice

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextmanager
def answer_columns(model, answers: Int[Tensor, "batch 2"]):
    """For the duration, the model's unembedding computes only the vocabulary columns of ``answers`` (the words a
    logit difference reads); yields ``answers`` as indices into those columns. Each column's logit is the same dot
    product as before (an elementwise soft-capping after it too), so a logit difference is unchanged, while the rest
    of the vocabulary is neither computed nor held. Only for runs whose sole output is a logit difference (not the
    loss, KL or top tokens). Checked once per model (``fast_paths``: ``answer_columns``); where it is not exact, or the
    unembedding is not a plain linear layer, nothing changes and ``answers`` come back as they are."""
    unembed = getattr(model, "unembed", None)
    current = getattr(unembed, "_original_component", None)
    linear = current.full[0] if isinstance(current, _Columns) else current  # inside another answer_columns: its full layer
    if not isinstance(linear, torch.nn.Linear):
        yield answers
        return
    columns = torch.unique(answers.cpu()).to(linear.weight.device)
    restricted = _Columns(linear, columns)
    probe = torch.randn(2, 1, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight)
    if not verified(
        model,
        ("answer_columns",),
        lambda: restricted(probe),
        lambda: linear(probe)[..., columns],
        "unembedding only the answers' columns changed their logits",
    ):
        with full_vocabulary(model):
            yield answers
        return
    unembed._original_component = restricted
    try:
        yield torch.searchsorted(columns, answers.to(columns.device)).to(answers.device)
    finally:
        unembed._original_component = current


def column_logits(model, normed: Float[Tensor, "rows d_model"], columns: Int[Tensor, " column"]) -> Float[Tensor, "rows column"]:
    """The logits of ``normed`` (rows after the final norm) in vocabulary ``columns`` only (sorted, unique): each the same
    dot product (and soft-capping) as in the full unembedding (``answer_columns``); where restricting the unembedding is
    not exact, the full unembedding's columns."""
    with answer_columns(model, columns[None]) as index:
        return model.unembed(normed[:, None]).squeeze(1).index_select(-1, index[0].to(normed.device))


def restricts_columns(model) -> bool:
    """Whether ``answer_columns`` computes only the requested columns on this model (a plain linear unembedding,
    verified exact); otherwise each call of ``column_logits`` computes the whole vocabulary."""
    probe = torch.zeros(1, 2, dtype=torch.long)
    with answer_columns(model, probe) as index:
        return index is not probe


@contextmanager
def full_vocabulary(model):
    """The whole unembedding for the duration, also inside ``answer_columns`` (checks compare full outputs)."""
    unembed = getattr(model, "unembed", None)
    current = getattr(unembed, "_original_component", None)
    if not isinstance(current, _Columns):
        yield
        return
    unembed._original_component = current.full[0]
    try:
        yield
    finally:
        unembed._original_component = current


def fast_paths(model) -> dict:
    """The savings checked on this model so far and whether each was exact (key: saving, start layer)."""
    return dict(model_state(model, "fast_paths"))


def verified(model, key: tuple, fast: Callable[[], Tensor], plain: Callable[[], Tensor], what: str, warn: bool = True) -> bool:
    """Whether ``fast()`` equals ``plain()`` (to 1e-5 of its scale in float32) on this model, checked once per ``key``; a failure
    (or an error in ``fast``) switches that saving off for good, with a warning that says ``what`` changed."""
    verdicts: dict = model_state(model, "fast_paths")
    if key not in verdicts:
        with torch.no_grad(), full_vocabulary(model):
            reference = plain()
            error = ""
            try:
                ok = same_output(fast(), reference)
            except Exception as err:  # noqa: BLE001 - e.g. a block that reshapes with the full sequence length: said below
                ok, error = False, f" ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        verdicts[key] = ok
        if not ok and warn:
            warnings.warn(f"{architecture(model)}: {what}{error}; falling back to the plain computation (exact, slower)", stacklevel=4)
    return verdicts[key]


def same_output(out: Tensor, reference: Tensor) -> bool:
    """``verified``'s test: the same shape and every value within 1e-5 of the reference's scale (float32; half precision:
    its own rounding)."""
    tolerance = max(1e-5, 16 * torch.finfo(reference.dtype).eps)
    return out.shape == reference.shape and bool((out - reference).abs().max() <= tolerance * (1 + reference.abs().max()))


def settled(model, key: tuple) -> bool:
    """Whether ``verified`` has a verdict for ``key`` on this model."""
    return key in model_state(model, "fast_paths")


def settle_exact(model, key: tuple) -> None:
    """Record the saving ``key`` exact on this model, for a caller that compared it with the model's own output."""
    model_state(model, "fast_paths")[key] = True


def start_exact(model, layer: int) -> bool:
    """Whether the bridge's own forward from block ``layer`` (``start_at_layer``, given the residual stream there)
    reproduces the model's output from the tokens: checked once per model and layer on ``probe_tokens`` (or settled by a
    patched run's own start check, ``forward.checked_start``, when that run reproduces the model's output). Every other
    saving is checked against this start, so a start that is itself wrong would make every number that starts at a
    block wrong with no error (measured on BLOOM; its ALiBi position biases are the likely cause). Where
    it fails, runs start from the tokens (``forward.run_interventions``; exact, slower) or refuse (edges)."""
    probe = probe_tokens(model)
    state = model_state(model, "start_probe")

    def probe_run() -> dict:
        if not state:
            names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
            logits, cache = model.run_with_cache(probe, names_filter=names)
            state.update({"logits": logits[:, -1:], **{i: cache[n] for i, n in enumerate(names)}})
        return state

    return verified(
        model,
        ("start_at_layer", layer),
        lambda: model(probe_run()[layer], start_at_layer=layer)[:, -1:],
        lambda: probe_run()["logits"],
        f"running from block {layer} (the bridge's start_at_layer on the residual stream there) changed the output; "
        "runs start from the tokens",
    )


def fast_start_ok(model, resid: Tensor, layer: int) -> bool:
    """Whether skipping the blocks before ``layer`` and unembedding one position is exact on this model
    (checked once per model and layer against the plain ``start_at_layer`` forward)."""
    probe = resid[:2]

    def fast() -> Tensor:
        with skip_blocks_before(model, layer), model.hooks(fwd_hooks=[UNEMBED_LAST]):
            return model(probe, start_at_layer=layer)

    return verified(
        model,
        ("skip_blocks", layer),
        fast,
        lambda: model(probe, start_at_layer=layer)[:, -1:],
        f"skipping the blocks before layer {layer} changed the output",
    )


_BEFORE_THE_MLP = ("hook_resid_pre", "hook_in", "hook_attn_out", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


def acts_on_last_mlp_or_later(model, hooks: list) -> bool:
    """Whether any of ``hooks`` acts on the last block's MLP or anything after it (then that MLP runs at every position)."""
    last = f"blocks.{model.cfg.n_layers - 1}."
    for name, _ in hooks:
        if not isinstance(name, str) or name.startswith(("ln_final", "unembed")):
            return True
        if name.startswith(last):
            rest = name[len(last) :]
            if rest not in _BEFORE_THE_MLP and not rest.startswith(("attn.", "ln1.", "ln1_post.")):
                return True
    return False


def last_mlp_at_final_position(model) -> tuple[str, Callable]:
    """A forward hook: the last block's MLP reads its final position only (its write broadcasts onto the residual
    stream; the other positions of the last block's output are read by nothing)."""
    return (f"blocks.{model.cfg.n_layers - 1}.mlp.hook_in", last_position)


def last_mlp_ok(model) -> bool:
    """Whether the last block's MLP at the final position only leaves the final logits exact (checked once per model;
    no warning: some blocks reshape by the full sequence length, e.g. OPT, and keep the full MLP)."""
    tokens = probe_tokens(model)

    def fast() -> Tensor:
        with model.hooks(fwd_hooks=[last_mlp_at_final_position(model), UNEMBED_LAST]):
            return model(tokens)

    return verified(model, ("last_mlp",), fast, lambda: model(tokens)[:, -1:], "", warn=False)


@contextmanager
def skip_blocks_before(model, layer: int):
    """Stand in a pass-through for blocks ``0..layer-1`` (their output is replaced at ``layer`` anyway)."""
    skipped = list(model.blocks[:layer])
    stand_ins = [_PassThrough(_output_template(model, block)) for block in skipped]
    before = [block.__dict__.get("forward") for block in skipped]
    for block, stand_in in zip(skipped, stand_ins):
        block.__dict__["forward"] = stand_in  # the instance attribute shadows the class's forward (bridge __setattr__ bypassed)
    try:
        yield
    finally:
        for block, old in zip(skipped, before):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = old


class _PassThrough:
    """A block's stand-in: returns its hidden-state input in the structure the real block returns."""

    def __init__(self, template: tuple | None):
        self.template = template

    def __call__(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if self.template is None else (hidden, *self.template[1:])


def _output_template(model, block) -> tuple | None:
    """None if ``block`` returns a tensor, else one real output tuple of it (measured once per model, for every block
    in one forward of two tokens)."""
    templates: dict = model_state(model, "block_outputs")
    if id(block) not in templates:
        seen: dict = {}
        handles = [b.register_forward_hook(lambda mod, args, out: seen.setdefault(id(mod), out)) for b in model.blocks]
        try:
            with torch.no_grad():
                bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else 0
                model(torch.tensor([[bos, bos]], device=model.cfg.device))
        finally:
            for handle in handles:
                handle.remove()
        templates.update({key: tuple(out) if isinstance(out, tuple) else None for key, out in seen.items()})
    return templates[id(block)]
