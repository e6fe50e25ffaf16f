"""Clean/corrupted prompt batches from a task's params, deterministic in the seed.

Rules: slots that share a pool get distinct words within a prompt; pool words that are not a single known
token in the form the template needs (``"Mary"`` at the start, ``" Mary"`` after a space) are dropped with a
printed count; prompts are unique; every clean and corrupted prompt has the same token length (else a
ParamsError naming the template). A task with several sentence templates (``templates:``, e.g. IOI's ABBA and
BABA) fills them round robin; a named position may then sit at a different index in each template:
``position_index`` has every named position per prompt, ``positions`` the ones shared by all prompts.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from helpers.task.params import NOISE_SLOT_RE, POSITION_RE, SLOT_RE, Corruption, NotExpressible, ParamsError, TaskParams
from helpers.task.vocab import read_pool


@dataclass
class AlternativeRun:
    """One of the task's extra corruptions (``params.corruptions``), built for the same slot words as the clean prompts.

    A template corruption has its own tokens; a noise corruption reads the clean tokens and adds Gaussian noise
    to the token embeddings where ``noise_mask`` is True (``position_vs_token.EmbeddingNoise``; per prompt, as a slot may sit
    at another index in each of the task's templates).
    """

    name: str
    spec: Corruption
    prompts: list[str]
    tokens: Int[Tensor, "batch pos"]
    noise_mask: Bool[Tensor, "batch pos"] | None = None

    @property
    def noise_positions(self) -> list[int]:
        """The noised token indices when they are the same in every prompt (else ValueError: use ``noise_mask``)."""
        if self.noise_mask is None:
            return []
        rows = {tuple(row.nonzero().flatten().tolist()) for row in self.noise_mask}
        if len(rows) != 1:
            raise ValueError(f"corruption {self.name!r} noises different positions in different templates; use noise_mask")
        return list(rows.pop())


@dataclass(frozen=True, eq=False)
class PromptPair:
    """The two runs of one patching experiment, passed as one value: ``base``, the prompts whose run is patched, and
    ``source``, the prompts whose run the patched values come from, scored on the same ``answers`` ([:, 0] correct,
    [:, 1] incorrect). Normalised effects put the base run at 0 and the source run at 1.

    ``PromptSet.denoising()`` is the usual direction (base: the corrupted prompts, source: the clean ones: what does
    restoring this activation bring back?); ``PromptSet.noising()`` the other (base: clean, source: corrupted: what does
    corrupting it destroy?). ``groups``: each prompt's sentence template (None: one); ``positions``: every named
    position, per prompt; ``base_name`` / ``source_name``: what the runs are called in results and plots."""

    base: Int[Tensor, "batch pos"]
    source: Int[Tensor, "batch pos"]
    answers: Int[Tensor, "batch 2"]
    groups: Int[Tensor, " batch"] | None = None
    positions: dict[str, Int[Tensor, " batch"]] = field(default_factory=dict)
    base_name: str = "corrupted"
    source_name: str = "clean"

    def __post_init__(self) -> None:
        if self.base.shape != self.source.shape:
            raise ValueError(
                f"the {self.base_name} and {self.source_name} prompts of a pair must have the same shape [batch, pos], got "
                f"{list(self.base.shape)} and {list(self.source.shape)}: patching matches them position by position"
            )
        if self.answers.shape != (self.base.shape[0], 2):
            raise ValueError(
                f"answers must be [batch, 2] (correct, incorrect) for {self.base.shape[0]} prompts, got {list(self.answers.shape)}"
            )

    @classmethod
    def denoising(
        cls, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"], answers: Int[Tensor, "batch 2"], **kw
    ) -> PromptPair:
        """Patch the clean run's values into the corrupted run (base: corrupted, source: clean)."""
        return cls(corrupted, clean, answers, **kw)

    def swapped(self) -> PromptPair:
        """The same prompts with base and source exchanged (denoising <-> noising)."""
        return replace(self, base=self.source, source=self.base, base_name=self.source_name, source_name=self.base_name)

    def __len__(self) -> int:
        return self.base.shape[0]


@dataclass
class PromptSet:
    """A batch of matched clean/corrupted prompts with answer tokens and named positions."""

    params: TaskParams
    clean_prompts: list[str]
    corrupted_prompts: list[str]
    slot_words: list[dict[str, str]]
    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_tokens: Int[Tensor, "batch 2"]  # [:, 0] correct, [:, 1] incorrect
    position_labels: list[str]  # one per token index, slots shown as [S1] ("[S1]|[S2]" where templates differ)
    dropped_words: dict[str, list[str]] = field(default_factory=dict)
    alternatives: dict[str, AlternativeRun] = field(default_factory=dict)  # params.corruptions, by name
    template_names: list[str] = field(default_factory=lambda: ["template"])  # the task's sentence templates
    template_index: Int[Tensor, " batch"] | None = None  # which template each prompt was filled from (None: all the first)
    position_index: dict[str, Int[Tensor, " batch"]] = field(default_factory=dict)  # every named position, per prompt

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    @property
    def templates(self) -> Int[Tensor, " batch"]:
        """Which template each prompt was filled from (index into ``template_names``)."""
        if self.template_index is None:
            return torch.zeros(self.clean_tokens.shape[0], dtype=torch.long)
        return self.template_index

    @property
    def positions(self) -> dict[str, int]:
        """Name -> token index of the named positions that are the same in every prompt (all of them with one template)."""
        return {name: int(index[0]) for name, index in self.position_index.items() if bool((index == index[0]).all())}

    @property
    def varying_positions(self) -> list[str]:
        """Named positions whose token index differs between the task's templates (not in ``positions``)."""
        return [name for name in self.position_index if name not in self.positions]

    def template_masks(self) -> dict[str, Bool[Tensor, " batch"]]:
        """Template name -> which prompts were filled from it."""
        index = self.templates.cpu()
        return {name: index == i for i, name in enumerate(self.template_names)}

    @property
    def axis_labels(self) -> list[str]:
        """Unique per-position labels for plot axes, e.g. ``3:[S2]``."""
        return [f"{i}:{lab}" for i, lab in enumerate(self.position_labels)]

    def denoising(self) -> PromptPair:
        """The prompts as a patching pair in the usual direction: the clean run's values patched into the corrupted run."""
        return PromptPair.denoising(
            self.clean_tokens, self.corrupted_tokens, self.answer_tokens, groups=self.template_index, positions=self.position_index
        )

    def noising(self) -> PromptPair:
        """The other direction: the corrupted run's values patched into the clean run."""
        return self.denoising().swapped()

    def to(self, device: str) -> PromptSet:
        self.clean_tokens = self.clean_tokens.to(device)
        self.corrupted_tokens = self.corrupted_tokens.to(device)
        self.answer_tokens = self.answer_tokens.to(device)
        for alt in self.alternatives.values():
            alt.tokens = alt.tokens.to(device)
        self.position_index = {name: index.to(device) for name, index in self.position_index.items()}
        return self


def as_pair(prompts: PromptPair | PromptSet) -> PromptPair:
    """``prompts`` as a patching pair: a pair as it is, a prompt set in its denoising direction."""
    if isinstance(prompts, PromptPair):
        return prompts
    if isinstance(prompts, PromptSet):
        return prompts.denoising()
    raise TypeError(
        f"expected a PromptPair or a PromptSet, got {type(prompts).__name__}: pass prompts (a PromptSet), prompts.noising(), "
        "or PromptPair.denoising(clean_tokens, corrupted_tokens, answer_tokens)"
    )


def fill(template: str, words: dict[str, str]) -> str:
    """``template`` with every ``[SLOT]`` replaced by ``words[SLOT]``."""
    return SLOT_RE.sub(lambda m: words[m.group(1)], template)


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS (the bridge tokenizer prepends BOS unless told not to)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def unknown_id(tokenizer) -> int | None:
    """The id that out-of-vocabulary text maps to, if it is distinct from BOS (word-level tokenizers)."""
    unk = tokenizer.unk_token_id
    return unk if unk is not None and unk != tokenizer.bos_token_id else None


def slot_forms(params: TaskParams) -> dict[str, set[str]]:
    """For each slot, the forms its words take: ``"{}"`` (no leading space) and/or ``" {}"``."""
    forms: dict[str, set[str]] = {s: set() for s in params.slot_pools}
    extra = [text for name in params.corruptions for text in params.corruption_forms(name).values()]
    extra += [t for v in params.variants for t in (v.template, v.corrupted_template)]
    for text in (params.correct, params.incorrect, *extra):
        for m in SLOT_RE.finditer(text):
            spaced = m.start() > 0 and text[m.start() - 1] == " "
            forms[m.group(1)].add(" {}" if spaced else "{}")
    return forms


def usable_words(params: TaskParams, tokenizer) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(pool -> words that are single known tokens in every needed form, pool -> dropped words)."""
    unk = unknown_id(tokenizer)
    needed: dict[str, set[str]] = {}
    for slot, forms in slot_forms(params).items():
        needed.setdefault(params.slot_pools[slot], set()).update(forms)
    kept, dropped = {}, {}
    for pool, forms in needed.items():
        try:
            words = read_pool(pool)
        except ParamsError as err:
            slots = sorted(s for s, p in params.slot_pools.items() if p == pool)
            raise ParamsError(f"{params.source}: slots ({', '.join(slots)}): {err}") from None
        ok = [w for w in words if all(_single_known(tokenizer, f.format(w), unk) for f in forms)]
        kept[pool] = ok
        dropped[pool] = [w for w in words if w not in ok]
        if not ok:
            slots = sorted(s for s, p in params.slot_pools.items() if p == pool)
            raise NotExpressible(
                f"{params.source}: slots ({', '.join(slots)}): none of the {len(words)} words of pool '{pool}' is one "
                f"known token for this tokenizer in the form the template needs ({' and '.join(repr(f.format('w')) for f in sorted(forms))}), "
                f"e.g. {words[:3]}; use a pool of single-token words"
            )
    return kept, dropped


def _single_known(tokenizer, text: str, unk: int | None) -> bool:
    ids = token_ids(tokenizer, text)
    return len(ids) == 1 and ids[0] != unk


def slots_by_pool(params: TaskParams) -> dict[str, list[str]]:
    """Pool -> the slots it feeds, both sorted (slots sharing a pool get distinct words)."""
    out: dict[str, list[str]] = {}
    for slot in sorted(params.slot_pools):
        out.setdefault(params.slot_pools[slot], []).append(slot)
    return dict(sorted(out.items()))


def count_possible(params: TaskParams, words: dict[str, list[str]]) -> int:
    """How many distinct slot assignments exist (distinct words within a pool)."""
    return math.prod(math.perm(len(words[p]), len(slots)) for p, slots in slots_by_pool(params).items())


def sample_assignments(params: TaskParams, words: dict[str, list[str]], n: int, seed: int) -> list[dict[str, str]]:
    """``n`` unique slot -> word assignments, deterministic in ``seed``."""
    possible = count_possible(params, words)
    src = params.source
    if n > possible:
        raise ParamsError(
            f"{src}: n_prompts: {n} unique prompts requested but the pools allow only {possible}; "
            f"lower n_prompts or add words to the pools ({sorted(set(params.slot_pools.values()))})"
        )
    rng = random.Random(seed)
    slots = sorted(params.slot_pools)
    groups = slots_by_pool(params)

    def draw() -> dict[str, str]:
        out: dict[str, str] = {}
        for pool, members in groups.items():
            out.update(zip(members, rng.sample(words[pool], len(members))))
        return out

    if possible <= 4 * n:  # small space: enumerate and sample without rejection
        per_pool = [
            [dict(zip(members, combo)) for combo in itertools.permutations(words[pool], len(members))] for pool, members in groups.items()
        ]
        every = [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*per_pool)]
        return rng.sample(every, n)
    seen, out = set(), []
    while len(out) < n:
        a = draw()
        key = tuple(a[s] for s in slots)
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def answer_token(tokenizer, text: str, field_name: str, params: TaskParams) -> int:
    """The single token id of an answer string, or a ParamsError naming the answer field."""
    ids = token_ids(tokenizer, text)
    unk = unknown_id(tokenizer)
    if len(ids) != 1 or ids[0] == unk:
        raise NotExpressible(
            f"{params.source}: {field_name}: answer {text!r} is {len(ids)} token(s) {ids} for this tokenizer"
            f"{' (unknown word)' if unk in ids else ''}; answers must be one known token (mind the leading space)"
        )
    return ids[0]


def slot_token_index(tokenizer, template: str, words: dict[str, str], slot: str, occurrence: int, n_prefix: int = 1) -> int:
    """Token index of the ``occurrence``-th ``[slot]`` in ``template`` filled with ``words`` (``n_prefix``: 1 with a BOS first, else 0)."""
    marker = f"[{slot}]"
    start = -1
    for _ in range(occurrence):
        start = template.index(marker, start + 1)
    return n_prefix + len(token_ids(tokenizer, fill(template[:start], words).rstrip(" ")))


def resolve_position(
    params: TaskParams, tokenizer, words: dict[str, str], n_pos: int, spec: str, n_prefix: int = 1, template: str | None = None
) -> int:
    """Token index of a named position spec (``end``, ``S2``, ``S2#2``, ``S1+1``) in ``template`` (default: the first)."""
    m = POSITION_RE.match(spec)
    template = params.variants[0].template if template is None else template
    base = n_pos - 1 if m["end"] else slot_token_index(tokenizer, template, words, m["slot"], int(m["occ"] or 1), n_prefix)
    idx = base + int(m["off"] or 0)
    if not 0 <= idx < n_pos:
        raise ParamsError(f"{params.source}: positions: {spec!r} resolves to token {idx}, outside 0..{n_pos - 1}")
    return idx


def make_prompts(params: TaskParams, tokenizer, verbose: bool = True, prepend_bos: bool | None = None) -> PromptSet:
    """Generate, tokenise and check the prompt batch of a task (see module docstring for the rules).

    ``prepend_bos``: start every prompt with the tokenizer's BOS token (default: when it has one; the session
    passes the model's own convention, ``model.cfg.default_prepend_bos``: Qwen and Pythia prompts start without).
    """
    words, dropped = usable_words(params, tokenizer)
    if verbose:
        _report_dropped(words, dropped)
    assignments = sample_assignments(params, words, params.n_prompts, params.seed)
    variants = params.variants
    template_index = [i % len(variants) for i in range(len(assignments))]  # round robin: balanced and deterministic
    clean = [fill(variants[t].template, a) for t, a in zip(template_index, assignments)]
    corrupted = [fill(variants[t].corrupted_template, a) for t, a in zip(template_index, assignments)]
    prefix = _bos_prefix(params, tokenizer, prepend_bos)
    clean_ids = [prefix + token_ids(tokenizer, p) for p in clean]
    corr_ids = [prefix + token_ids(tokenizer, p) for p in corrupted]
    n_pos = _check_tokens(params, tokenizer, template_index, (clean, clean_ids), (corrupted, corr_ids))
    answers = [_answer_pair(params, tokenizer, a) for a in assignments]
    first_of = {t: template_index.index(t) for t in range(len(variants))}  # each template's first prompt
    per_variant = [
        {
            name: resolve_position(params, tokenizer, assignments[first_of[t]], n_pos, spec, len(prefix), variants[t].template)
            for name, spec in params.positions.items()
        }
        for t in range(len(variants))
    ]
    variant_labels = [
        _slot_labels(params, tokenizer, t, assignments, template_index, clean, clean_ids, len(prefix)) for t in range(len(variants))
    ]
    return PromptSet(
        params=params,
        clean_prompts=clean,
        corrupted_prompts=corrupted,
        slot_words=assignments,
        clean_tokens=torch.tensor(clean_ids),
        corrupted_tokens=torch.tensor(corr_ids),
        answer_tokens=torch.tensor(answers),
        position_labels=["|".join(dict.fromkeys(vl[i] for vl in variant_labels)) for i in range(n_pos)],
        dropped_words={p: d for p, d in dropped.items() if d},
        alternatives={
            name: alternative_run(params, tokenizer, name, c, assignments, template_index, clean, clean_ids, prefix)
            for name, c in params.corruptions.items()
        },
        template_names=[v.name for v in variants],
        template_index=torch.tensor(template_index),
        position_index={name: torch.tensor([per_variant[t][name] for t in template_index]) for name in params.positions},
    )


def _report_dropped(words: dict[str, list[str]], dropped: dict[str, list[str]]) -> None:
    """Print, per pool, the words dropped because they are not one token in this tokenizer."""
    for pool, lost in dropped.items():
        if lost:
            more = " …" if len(lost) > 8 else ""
            print(
                f"pool '{pool}': dropped {len(lost)} of {len(lost) + len(words[pool])} words that are not one token here: {lost[:8]}{more}"
            )


def _bos_prefix(params: TaskParams, tokenizer, prepend_bos: bool | None) -> list[int]:
    """``[BOS]`` when prompts start with the tokenizer's BOS token (default: when it has one), else ``[]``."""
    bos = tokenizer.bos_token_id
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos and bos is None:
        raise ParamsError(
            f"{params.source}: this tokenizer has no BOS token to prepend; load the model with its own convention (prepend_bos=False)"
        )
    return [bos] if prepend_bos else []


def _check_tokens(
    params: TaskParams,
    tokenizer,
    template_index: list[int],
    clean: tuple[list[str], list[list[int]]],
    corrupted: tuple[list[str], list[list[int]]],
) -> int:
    """Refuse prompts with words unknown to the tokenizer or of different token lengths; returns the common length."""
    src, variants = params.source, params.variants
    unk = unknown_id(tokenizer)
    for name, (prompts, ids) in (("template", clean), ("corrupted_template", corrupted)):
        bad = [p for p, row in zip(prompts, ids) if unk in row] if unk is not None else []
        if bad:
            raise NotExpressible(
                f"{src}: {name}: contains words unknown to this tokenizer, e.g. {bad[0]!r}; use vocabulary words with their exact spacing (' ,' vs ',')"
            )
    (clean_text, clean_ids), (corr_text, corr_ids) = clean, corrupted
    lengths = {len(r) for r in clean_ids + corr_ids}
    if len(lengths) != 1:
        i = next(i for i in range(len(clean_text)) if len(clean_ids[i]) != len(corr_ids[i]) or len(clean_ids[i]) != len(clean_ids[0]))
        which = (
            "template/corrupted_template"
            if params.templates is None
            else f"templates ({variants[template_index[i]].name} vs {variants[0].name})"
        )
        raise NotExpressible(
            f"{src}: {which}: prompts must all have the same token length, found lengths {sorted(lengths)}; "
            f"e.g. clean {clean_text[0]!r} ({len(clean_ids[0])}) vs clean {clean_text[i]!r} ({len(clean_ids[i])}) vs corrupted {corr_text[i]!r} "
            f"({len(corr_ids[i])}). Make every template and corrupted template mirror the first token for token."
        )
    return lengths.pop()


def _answer_pair(params: TaskParams, tokenizer, assignment: dict[str, str]) -> list[int]:
    """The correct and incorrect answer tokens of one prompt (each one token, and different)."""
    c = answer_token(tokenizer, fill(params.correct, assignment), "correct", params)
    w = answer_token(tokenizer, fill(params.incorrect, assignment), "incorrect", params)
    if c == w:
        raise ParamsError(f"{params.source}: correct/incorrect: both resolve to {fill(params.correct, assignment)!r}; they must differ")
    return [c, w]


def _slot_labels(
    params: TaskParams,
    tokenizer,
    t: int,
    assignments: list[dict[str, str]],
    template_index: list[int],
    clean: list[str],
    clean_ids: list[list[int]],
    n_prefix: int,
) -> list[str]:
    """Template ``t``'s position labels: each token decoded, ``[S1]``… at its slots' tokens; refuses a slot word that
    is not exactly one whole token at its slot in every prompt of the template."""
    v = params.variants[t]
    first = template_index.index(t)
    labels = [tokenizer.decode([tok]) for tok in clean_ids[first]]
    for slot in set(SLOT_RE.findall(v.template)):
        for occ in range(1, v.template.count(f"[{slot}]") + 1):
            idx = slot_token_index(tokenizer, v.template, assignments[first], slot, occ, n_prefix)
            labels[idx] = f"[{slot}]"
            wrong = [
                p
                for p, a, row, ti in zip(clean, assignments, clean_ids, template_index)
                if ti == t and tokenizer.decode([row[idx]]).strip() != a[slot]
            ]
            if wrong:
                raise NotExpressible(
                    f"{params.source}: template: [{slot}] occurrence {occ} is not at token {idx} in {wrong[0]!r}; slot words must be whole tokens"
                )
    return labels


def alternative_run(
    params: TaskParams,
    tokenizer,
    name: str,
    spec: Corruption,
    assignments: list[dict[str, str]],
    template_index: list[int],
    clean: list[str],
    clean_ids: list[list[int]],
    prefix: list[int],
) -> AlternativeRun:
    """The prompts of extra corruption ``name`` for the clean prompts' slot words; a ParamsError naming
    ``corruptions.<name>`` when its prompts do not match the clean ones token for token."""
    where = f"{params.source}: corruptions.{name}"
    variants, n_pos = params.variants, len(clean_ids[0])
    if spec.noise is not None:
        mask = torch.zeros(len(clean), n_pos, dtype=torch.bool)
        for b, (t, a) in enumerate(zip(template_index, assignments)):
            for slot_spec in spec.noise:
                m = NOISE_SLOT_RE.match(slot_spec)
                mask[b, slot_token_index(tokenizer, variants[t].template, a, m["slot"], int(m["occ"] or 1), len(prefix))] = True
        return AlternativeRun(name, spec, clean, torch.tensor(clean_ids), mask)
    forms = params.corruption_forms(name)
    prompts = [fill(forms[variants[t].name], a) for t, a in zip(template_index, assignments)]
    ids = [prefix + token_ids(tokenizer, p) for p in prompts]
    unk = unknown_id(tokenizer)
    bad = [p for p, row in zip(prompts, ids) if len(row) != n_pos or (unk is not None and unk in row)]
    if bad:
        raise ParamsError(
            f"{where}.template: {bad[0]!r} is not {n_pos} known tokens like the clean prompt; make it mirror "
            "the clean template token for token"
        )
    return AlternativeRun(name, spec, prompts, torch.tensor(ids))
