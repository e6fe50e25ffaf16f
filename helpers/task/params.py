"""Task parameters: one YAML file per task in ``params/``, validated by a pydantic schema.

A task is a prompt template with ``[S1]…[Sn]`` slots (a slot may occur several times), the word pool that
feeds each slot, a corrupted template (or a named corruption), the correct and incorrect answer (literal
tokens like ``" 5"`` or slot references like ``" [S1]"``), named positions to analyse and analysis knobs.
Every error names the file, the field and the fix; ``python -m helpers.task.params FILE`` checks a file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from helpers import PARAMS_DIR, POOLS_DIR

SLOT_RE = re.compile(r"\[([A-Za-z][A-Za-z0-9_]*)\]")
POSITION_RE = re.compile(r"^(?:(?P<end>end)|(?P<slot>[A-Za-z][A-Za-z0-9_]*)(?:#(?P<occ>[1-9][0-9]*))?)(?P<off>[+-][0-9]+)?$")
CORRUPTION_RE = re.compile(r"^resample:(?P<slot>[A-Za-z][A-Za-z0-9_]*)(?:#(?P<occ>[1-9][0-9]*))?$")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # task and pool names: they become file and folder names
MAX_PARAMS_BYTES = 1_000_000  # a task file is a few hundred bytes; anything this large is a mistake


class ParamsError(ValueError):
    """A params file is invalid; the message names the file, the field and the fix."""


class NotExpressible(ParamsError):
    """The task cannot be written in this model's tokenizer (an answer of two tokens, slot words that are not one token,
    prompts of unequal token length): the params file is fine, the model cannot take it. In a batch over several
    models (``--model``) this is a ``refused`` row, not bad input."""


class Analysis(BaseModel):
    """Analysis knobs shared by the templates."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(5, ge=1, le=50, description="how many top heads to report, plot and hand on")
    layer_groups: dict[str, list[int]] | None = Field(
        None, description="named layer bands, e.g. {early: [0, 1], late: [2, 3]}; default: three equal bands"
    )
    min_accuracy: float = Field(
        0.75,
        ge=0,
        le=1,
        description="task-sanity gate: fraction of clean prompts whose correct "
        "answer must beat the incorrect one for the task to count as performed",
    )
    min_gap: float = Field(1.0, ge=0, description="task-sanity gate: least clean - corrupted logit-difference gap (nats)")
    by_pos_heads: int | None = Field(
        24,
        ge=1,
        description="by-position head sweeps (one patch per head and position) run over this many heads, those with the "
        "largest |effect| in the all-position sweep (each exact; the others are left out and the notebook lists which ran); "
        "null: every head. Models with at most this many heads always run them all",
    )

    importance_heads: int | None = Field(
        16,
        ge=1,
        description="loss-based importance mean-ablates exactly the heads a first-order estimate ranks highest (this many by "
        "answer loss and this many by logit difference) and the top_k heads of output patching; every head gets the "
        "estimate, the others' exact changes are null in the JSON. null: every head exactly. Models with at most this "
        "many heads always run them all",
    )

    @field_validator("layer_groups")
    @classmethod
    def _groups(cls, v: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        for name, layers in (v or {}).items():
            if not layers:
                raise ValueError(f"group {name!r} has no layers; list at least one, e.g. {name}: [0, 1]")
        return v


NOISE_SLOT_RE = re.compile(r"^(?P<slot>[A-Za-z][A-Za-z0-9_]*)(?:#(?P<occ>[1-9][0-9]*))?$")


class Corruption(BaseModel):
    """Another corrupted form of the clean prompt, for analyses that compare several (position vs token signals,
    causal tracing): a template over the task's slots, or Gaussian noise on some slots' token embeddings."""

    model_config = ConfigDict(extra="forbid")
    template: str | dict[str, str] | None = Field(
        None,
        description="the prompt with the task's slots rearranged, e.g. the two names flipped; in a task with several "
        "`templates`, a mapping from each template's name to its rearranged form",
    )
    noise: list[str] | None = Field(None, description="slots ('S1', 'S2#2') whose token embeddings get Gaussian noise")
    scale: float = Field(3.0, gt=0, le=100, description="noise std in units of the std of the clean token embeddings")
    changes: Literal["position", "token", "both", "other"] = Field(
        "other",
        description="what differs from the clean prompt where the answer is read: the position of a word, the word "
        "(token) at a position, both, or something else; labels the position-vs-token reading",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Corruption:
        if (self.template is None) == (self.noise is None):
            raise ValueError("give exactly one of 'template' (a rearranged prompt) or 'noise' (a list of slots)")
        if self.noise is not None:
            if not self.noise:
                raise ValueError("noise: list at least one slot, e.g. noise: [S2]")
            bad = [n for n in self.noise if not NOISE_SLOT_RE.match(n)]
            if bad:
                raise ValueError(f"noise: {bad} are not 'SLOT' or 'SLOT#k'")
        return self


class TemplateVariant(BaseModel):
    """One sentence template of a task that mixes several (e.g. IOI's ABBA and BABA orders), with its corrupted form."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a short name shown in the per-template breakdown, e.g. ABBA")
    template: str = Field(description="clean prompt with the task's [S1]..[Sn] slots")
    corrupted_template: str | None = Field(None, description="its corrupted prompt; default: the task's named `corruption`")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v) or len(v) > 40:
            raise ValueError(f"{v!r}: use letters, digits, '_' or '-' (at most 40)")
        return v


class CircuitSpec(BaseModel):
    """A hand-written circuit: heads grouped by role, and where each is kept (default: every position)."""

    model_config = ConfigDict(extra="forbid")
    groups: dict[str, list[str]] = Field(description="role -> heads, e.g. {mover: [L3H2]}")
    positions: dict[str, list[str]] = Field(default_factory=dict, description="head -> named positions where it is kept")

    @model_validator(mode="after")
    def _heads_and_positions(self) -> CircuitSpec:
        heads = [h for hs in self.groups.values() for h in hs]
        bad = [h for h in heads if not re.fullmatch(r"L\d+H\d+", h)]
        if bad:
            raise ValueError(f"heads {bad} are not of the form 'L<layer>H<head>', e.g. 'L3H2'")
        stray = sorted(set(self.positions) - set(heads))
        if stray:
            raise ValueError(f"positions given for heads {stray} that are in no group")
        return self


class TaskParams(BaseModel):
    """One task: what the prompts look like and what the model should answer."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="task name; outputs go to nb_outputs/<task>/<model>/")
    description: str = ""
    model: str = Field("toy-ioi", description="bundled model name (models/<name>), local HF dir, or hub name")
    seed: int = Field(0, ge=0, lt=2**32, description="random seed of prompt sampling and of torch in every notebook (0 <= seed < 2**32)")
    n_prompts: int = Field(32, ge=1, le=4096)
    template: str | None = Field(None, description="clean prompt with [S1]..[Sn] slots (or several under `templates`)")
    corrupted_template: str | None = Field(None, description="corrupted prompt; same slots plus optional new ones")
    templates: list[TemplateVariant] | None = Field(
        None,
        description="several sentence templates mixed in one task (prompts split evenly, results averaged over them "
        "and broken down per template), instead of template/corrupted_template",
    )
    corruption: str | None = Field(None, description="named corruption instead of corrupted_template: 'resample:SLOT#k'")
    slots: dict[str, str] = Field(description="slot name -> word pool (params/pools/<pool>.txt)")
    correct: str = Field(description="correct answer token, literal (' 5') or slot reference (' [S1]')")
    incorrect: str = Field(description="incorrect answer token, literal or slot reference")
    positions: dict[str, str] = Field(
        default_factory=lambda: {"end": "end"},
        description="named positions: 'end', 'SLOT' (first occurrence), 'SLOT#k' (k-th), with optional +n/-n",
    )
    corruptions: dict[str, Corruption] = Field(
        default_factory=dict,
        description="named extra corruptions (flipped order, exchanged names, noise) for the "
        "position-vs-token analysis; each a template or noise on slots",
    )
    analysis: Analysis = Analysis()
    circuit: CircuitSpec | None = Field(None, description="a circuit for minimal_circuit; default: built from head_functions.json")
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path:
        """The YAML file these params were read from (for error messages)."""
        return self._source or params_path(self.task)

    @field_validator("task")
    @classmethod
    def _task_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v) or len(v) > 100:
            raise ValueError(f"{v!r}: use letters, digits, '_' or '-' only, starting with a letter or digit (it becomes a folder name)")
        return v

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not v.strip() or "\x00" in v or len(v) > 500:
            raise ValueError(f"{v!r} is not a model name; use a bundled name (models/<name>), a local HF folder or a hub id")
        return v

    @field_validator("slots")
    @classmethod
    def _pools_exist(cls, v: dict[str, str]) -> dict[str, str]:
        for slot, pool in v.items():
            if not NAME_RE.fullmatch(pool):
                raise ValueError(
                    f"slot {slot}: pool {pool!r} is not a pool name (letters, digits, '_' or '-'; the file is params/pools/<name>.txt)"
                )
            if not (POOLS_DIR / f"{pool}.txt").is_file():
                available = sorted(p.stem for p in POOLS_DIR.glob("*.txt"))
                raise ValueError(f"slot {slot}: pool '{pool}' does not exist; use one of {available} or add params/pools/{pool}.txt")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TaskParams:
        """Cross-field checks, in the order a reader fixes a file: the template form, its slots and their pools, the
        corruptions, the named positions, the circuit's positions."""
        self._check_template_form()
        self._check_slot_pools()
        self._check_corruptions()
        self._check_positions()
        self._check_circuit_positions()
        return self

    def _check_template_form(self) -> None:
        """One of ``template`` / ``templates``; one of ``corrupted_template`` / ``corruption`` (a valid one); a slot in
        every template."""
        if self.template is None and self.templates is None:
            raise ValueError(
                "template: required field is missing; add 'template: ...' (see docs/params.md), or "
                "'templates:' with a list of {name, template, corrupted_template} for several"
            )
        if self.template is not None and self.templates is not None:
            raise ValueError(
                "give one of 'template' (one sentence template) or 'templates' (a list of {name, template, corrupted_template}), not both"
            )
        if self.templates is not None:
            self._check_templates()
        elif (self.corrupted_template is None) == (self.corruption is None):
            raise ValueError("give exactly one of corrupted_template or corruption")
        if self.corruption is not None:
            m = CORRUPTION_RE.match(self.corruption)
            if not m:
                raise ValueError(f"corruption {self.corruption!r}: the only named corruption is 'resample:SLOT' or 'resample:SLOT#k'")
            count = min(SLOT_RE.findall(v.template).count(m["slot"]) for v in self._raw_variants())
            if count < int(m["occ"] or 1) or m["slot"] not in self.slots:
                raise ValueError(
                    f"corruption {self.corruption!r}: the template has {count} occurrence(s) of [{m['slot']}]"
                    f"{'' if m['slot'] in self.slots else ' and slots has no pool for it'}; name a slot of the "
                    f"template (slots: {sorted(self.slots)})"
                )
        for v in self.variants:
            if not SLOT_RE.search(v.template):
                raise ValueError(
                    f"template{'' if self.templates is None else f' {v.name}'}: has no [S1]-style slot, so every prompt would be the same"
                )

    def _check_slot_pools(self) -> None:
        """Every slot named in the answers and the templates has a pool."""
        texts = [("correct", self.correct), ("incorrect", self.incorrect)]
        for i, v in enumerate(self.variants):
            where = "" if self.templates is None else f"templates[{i}] ({v.name}): "
            texts += [(f"{where}template", v.template), (f"{where}corrupted_template", v.corrupted_template)]
        for name, text in texts:
            for slot in SLOT_RE.findall(text):
                if slot not in self.slot_pools:
                    raise ValueError(
                        f"{name}: slot [{slot}] has no pool in 'slots' (known: {sorted(self.slots)}); add '{slot}: <pool>' to slots"
                    )

    def _check_corruptions(self) -> None:
        """Named ``corruptions``: a name, a template form per template, slots with pools, noise on existing slots."""
        names = [v.name for v in self.variants]
        for name, c in self.corruptions.items():
            if not NAME_RE.fullmatch(name):
                raise ValueError(f"corruptions: {name!r} is not a name (letters, digits, '_' or '-')")
            if isinstance(c.template, dict) and self.templates is None:
                raise ValueError(f"corruptions.{name}.template: a mapping is for a task with several `templates`; give one template")
            if isinstance(c.template, str) and self.templates is not None:
                raise ValueError(
                    f"corruptions.{name}.template: this task has several templates; map each to its form: "
                    f"{{{', '.join(f'{n}: ...' for n in names)}}}"
                )
            if isinstance(c.template, dict) and sorted(c.template) != sorted(names):
                raise ValueError(
                    f"corruptions.{name}.template: give a form for each template {names} and no other "
                    f"(missing {sorted(set(names) - set(c.template))}, unknown {sorted(set(c.template) - set(names))})"
                )
            for text in self.corruption_forms(name).values():
                for slot in SLOT_RE.findall(text):
                    if slot not in self.slot_pools:
                        raise ValueError(f"corruptions.{name}.template: slot [{slot}] has no pool in 'slots' (known: {sorted(self.slots)})")
            for v in self.variants if c.noise else []:
                template_slots = SLOT_RE.findall(v.template)
                for spec in c.noise:
                    m = NOISE_SLOT_RE.match(spec)
                    if template_slots.count(m["slot"]) < int(m["occ"] or 1):
                        which = "template" if self.templates is None else f"template {v.name}"
                        raise ValueError(
                            f"corruptions.{name}.noise: the {which} has {template_slots.count(m['slot'])} occurrence(s) of "
                            f"[{m['slot']}], so {spec!r} names no token; name a slot of the template"
                        )

    def _check_positions(self) -> None:
        """Named ``positions``: valid specs, naming slot occurrences every template has."""
        for name, spec in self.positions.items():
            m = POSITION_RE.match(spec)
            if not m:
                raise ValueError(f"positions.{name}: {spec!r} is not 'end', 'SLOT', 'SLOT#k' or those with +n/-n")
            for v in self.variants if m["slot"] else []:
                count = SLOT_RE.findall(v.template).count(m["slot"])
                occ = int(m["occ"] or 1)
                if occ > count:
                    which = "template" if self.templates is None else f"template {v.name}"
                    raise ValueError(f"positions.{name}: {which} has {count} occurrence(s) of [{m['slot']}], not {occ}")

    def _check_circuit_positions(self) -> None:
        """The circuit's per-head positions are named under ``positions``."""
        if self.circuit:
            for head, where in self.circuit.positions.items():
                unknown = [p for p in where if p not in self.positions]
                if unknown:
                    raise ValueError(f"circuit.positions.{head}: {unknown} are not named under positions (named: {sorted(self.positions)})")

    def check_model(self, n_layers: int, n_heads: int, model: str) -> None:
        """Check what refers to the model's shape (circuit heads, layer groups, top_k) against it, before any
        notebook runs; a ParamsError names the file, the field and the valid range."""
        where = f"{self.source}"
        problems = []
        if self.circuit:
            for role, hs in self.circuit.groups.items():
                for h in hs:
                    layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", h).groups())
                    if layer >= n_layers or head >= n_heads:
                        problems.append(
                            f"circuit.groups.{role}: head {h} is outside {model} ({n_layers} layers L0-L{n_layers - 1}, "
                            f"{n_heads} heads H0-H{n_heads - 1} per layer)"
                        )
        for name, layers in (self.analysis.layer_groups or {}).items():
            bad = [lay for lay in layers if not 0 <= lay < n_layers]
            if bad:
                problems.append(f"analysis.layer_groups.{name}: layers {bad} do not exist in {model} (layers 0-{n_layers - 1})")
        if self.analysis.top_k > n_layers * n_heads:
            problems.append(
                f"analysis.top_k: {self.analysis.top_k} is more than the {n_layers * n_heads} heads of {model}; "
                f"use at most {n_layers * n_heads}"
            )
        if problems:
            raise ParamsError("\n".join(f"{where}: {p}" for p in problems))

    def _check_templates(self) -> None:
        if self.corrupted_template is not None:
            raise ValueError("corrupted_template: with `templates`, give each template's corrupted_template in its entry")
        if not self.templates:
            raise ValueError("templates: list at least one {name, template, corrupted_template}")
        names = [v.name for v in self.templates]
        if len(set(names)) != len(names):
            raise ValueError(f"templates: names must differ, got {names}")
        missing = [v.name for v in self.templates if v.corrupted_template is None]
        if missing and self.corruption is None:
            raise ValueError(f"templates {missing}: no corrupted_template and no task-level `corruption` to derive it from")
        if self.n_prompts < len(self.templates):
            raise ValueError(f"n_prompts: {self.n_prompts} is fewer than the {len(self.templates)} templates; each template needs prompts")

    def _raw_variants(self) -> list[TemplateVariant]:
        if self.templates is not None:
            return self.templates
        return [TemplateVariant(name="template", template=self.template, corrupted_template=self.corrupted_template)]

    @property
    def variants(self) -> list[TemplateVariant]:
        """Every sentence template of the task with its corrupted form filled in (one, unless ``templates`` is given)."""
        return [
            v.model_copy(update={"corrupted_template": v.corrupted_template or self._derived_corruption(v.template)})
            for v in self._raw_variants()
        ]

    def _derived_corruption(self, template: str) -> str:
        m = CORRUPTION_RE.match(self.corruption or "")
        slot, occ = m["slot"], int(m["occ"] or 1)
        parts = template.split(f"[{slot}]")
        if occ >= len(parts):
            raise ValueError(f"corruption: template has fewer than {occ} occurrence(s) of [{slot}]")
        return f"[{slot}]".join(parts[:occ]) + f"[{slot}_corrupt]" + f"[{slot}]".join(parts[occ:])

    def corruption_forms(self, name: str) -> dict[str, str]:
        """Template name -> the rearranged prompt of extra corruption ``name`` (empty for a noise corruption)."""
        c = self.corruptions[name]
        if c.template is None:
            return {}
        return dict(c.template) if isinstance(c.template, dict) else {self.variants[0].name: c.template}

    @property
    def corrupted(self) -> str:
        """The corrupted form of the first template (``variants`` has every template's)."""
        return self.variants[0].corrupted_template

    @property
    def slot_pools(self) -> dict[str, str]:
        """Slot -> pool, including a derived ``SLOT_corrupt`` slot of a named corruption."""
        pools = dict(self.slots)
        m = CORRUPTION_RE.match(self.corruption or "")
        if m:
            pools[f"{m['slot']}_corrupt"] = self.slots[m["slot"]]
        return pools


def params_path(task_or_path: str | Path) -> Path:
    """``params/<task>.yaml`` for a task name, or the path itself when it names a file."""
    p = Path(task_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    if not NAME_RE.fullmatch(str(task_or_path)):
        raise ParamsError(
            f"{task_or_path!r}: not a task name (letters, digits, '_' or '-': params/<task>.yaml) nor an existing params file"
        )
    return PARAMS_DIR / f"{task_or_path}.yaml"


def read_text_file(path: Path, what: str, max_bytes: int) -> str:
    """The UTF-8 text of ``path``; a ParamsError naming the file and the fix when it is missing, too large,
    binary or not UTF-8 (checked before reading it whole)."""
    if not path.is_file():
        raise ParamsError(f"{path}: no such {what} (or it is not a file)")
    size = path.stat().st_size
    if size > max_bytes:
        raise ParamsError(f"{path}: {size:,} bytes is too large for a {what} (limit {max_bytes:,}); is it the right file?")
    data = path.read_bytes()
    if b"\x00" in data:
        raise ParamsError(f"{path}: is a binary file, not a {what}; save it as UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ParamsError(f"{path}: line {line}: not valid UTF-8 (byte {data[err.start]:#04x}); save the {what} as UTF-8") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys and anchors/aliases (a task file never needs them, and
    aliases allow 'billion laughs' expansions)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "anchors and aliases (&name / *name) are not allowed in params files; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key] + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _StrictLoader.construct_yaml_map)


def parse_yaml(path: Path, text: str) -> dict:
    """The top-level mapping of a params file (strict YAML: no duplicate keys, aliases or python tags)."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply to be a params file") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of fields at the top level (task: ..., template: ...), not {type(raw).__name__}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ParamsError(f"{path}: field names must be text, not {bad}")
    return raw


def load_params(task_or_path: str | Path, **overrides) -> TaskParams:
    """Read and validate a params file; ``overrides`` (not None) replace top-level fields.

    Raises ParamsError naming the file and field for any problem.
    """
    path = params_path(task_or_path)
    if not path.exists():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"{path}: no such params file; known tasks: {known}")
    raw = parse_yaml(path, read_text_file(path, "params file", MAX_PARAMS_BYTES))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        params = TaskParams.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(format_validation_error(path, err)) from None
    params._source = path
    return params


def format_validation_error(path: Path, err: ValidationError) -> str:
    """One line per problem: ``file: field: message``."""
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = f"required field is missing; add '{field}: ...' (see docs/params.md)"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown field; remove it or check its spelling (fields: {sorted(TaskParams.model_fields)})"
        lines.append(f"{path}: {field}: {msg}")
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m helpers.task.params FILES`: the command line lives in helpers.runner.cli
    from helpers.runner.cli import check_params

    sys.exit(check_params())
