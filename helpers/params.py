"""Task parameters: one YAML file per task in ``params/``, validated by a pydantic schema.

A task is a prompt template with ``[S1]…[Sn]`` slots (a slot may occur several times), the word pool that
feeds each slot, a corrupted template (or a named corruption), the correct and incorrect answer (literal
tokens like ``" 5"`` or slot references like ``" [S1]"``), named positions to analyse and analysis knobs.
Every error names the file, the field and the fix; ``python -m helpers.params FILE`` checks a file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

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

from . import PARAMS_DIR, POOLS_DIR

SLOT_RE = re.compile(r"\[([A-Za-z][A-Za-z0-9_]*)\]")
POSITION_RE = re.compile(r"^(?:(?P<end>end)|(?P<slot>[A-Za-z][A-Za-z0-9_]*)(?:#(?P<occ>[1-9][0-9]*))?)(?P<off>[+-][0-9]+)?$")
CORRUPTION_RE = re.compile(r"^resample:(?P<slot>[A-Za-z][A-Za-z0-9_]*)(?:#(?P<occ>[1-9][0-9]*))?$")


class ParamsError(ValueError):
    """A params file is invalid; the message names the file, the field and the fix."""


class Analysis(BaseModel):
    """Analysis knobs shared by the templates."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(5, ge=1, le=50, description="how many top heads to report, plot and hand on")
    layer_groups: dict[str, list[int]] | None = Field(
        None, description="named layer bands, e.g. {early: [0, 1], late: [2, 3]}; default: three equal bands"
    )


class CircuitSpec(BaseModel):
    """A hand-written circuit: heads grouped by role, and where each is kept (default: every position)."""

    model_config = ConfigDict(extra="forbid")
    groups: dict[str, list[str]] = Field(description="role -> heads, e.g. {mover: [L3H2]}")
    positions: dict[str, list[str]] = Field(default_factory=dict, description="head -> named positions where it is kept")

    @model_validator(mode="after")
    def _heads_and_positions(self) -> "CircuitSpec":
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
    seed: int = 0
    n_prompts: int = Field(32, ge=1, le=4096)
    template: str = Field(description="clean prompt with [S1]..[Sn] slots")
    corrupted_template: str | None = Field(None, description="corrupted prompt; same slots plus optional new ones")
    corruption: str | None = Field(None, description="named corruption instead of corrupted_template: 'resample:SLOT#k'")
    slots: dict[str, str] = Field(description="slot name -> word pool (params/pools/<pool>.txt)")
    correct: str = Field(description="correct answer token, literal (' 5') or slot reference (' [S1]')")
    incorrect: str = Field(description="incorrect answer token, literal or slot reference")
    positions: dict[str, str] = Field(
        default_factory=lambda: {"end": "end"},
        description="named positions: 'end', 'SLOT' (first occurrence), 'SLOT#k' (k-th), with optional +n/-n",
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
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("use letters, digits, '_' or '-' only (it becomes a folder name)")
        return v

    @field_validator("slots")
    @classmethod
    def _pools_exist(cls, v: dict[str, str]) -> dict[str, str]:
        for slot, pool in v.items():
            if not (POOLS_DIR / f"{pool}.txt").exists():
                available = sorted(p.stem for p in POOLS_DIR.glob("*.txt"))
                raise ValueError(f"slot {slot}: pool '{pool}' does not exist; use one of {available} or add params/pools/{pool}.txt")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskParams":
        if (self.corrupted_template is None) == (self.corruption is None):
            raise ValueError("give exactly one of corrupted_template or corruption")
        if self.corruption is not None and not CORRUPTION_RE.match(self.corruption):
            raise ValueError(f"corruption {self.corruption!r}: the only named corruption is 'resample:SLOT' or 'resample:SLOT#k'")
        for field in ("template", "corrupted", "correct", "incorrect"):
            text = self.corrupted if field == "corrupted" else getattr(self, field)
            for slot in SLOT_RE.findall(text):
                if slot not in self.slot_pools:
                    name = "corrupted_template" if field == "corrupted" else field
                    raise ValueError(f"{name}: slot [{slot}] has no pool in 'slots' (known: {sorted(self.slots)}); add '{slot}: <pool>' to slots")
        if not SLOT_RE.search(self.template):
            raise ValueError("template: has no [S1]-style slot, so every prompt would be the same")
        for name, spec in self.positions.items():
            m = POSITION_RE.match(spec)
            if not m:
                raise ValueError(f"positions.{name}: {spec!r} is not 'end', 'SLOT', 'SLOT#k' or those with +n/-n")
            if m["slot"]:
                count = SLOT_RE.findall(self.template).count(m["slot"])
                occ = int(m["occ"] or 1)
                if occ > count:
                    raise ValueError(f"positions.{name}: template has {count} occurrence(s) of [{m['slot']}], not {occ}")
        if self.circuit:
            for head, where in self.circuit.positions.items():
                unknown = [p for p in where if p not in self.positions]
                if unknown:
                    raise ValueError(f"circuit.positions.{head}: {unknown} are not named under positions (named: {sorted(self.positions)})")
        return self

    @property
    def corrupted(self) -> str:
        """The corrupted template, derived from ``corruption`` when that is given."""
        if self.corrupted_template is not None:
            return self.corrupted_template
        m = CORRUPTION_RE.match(self.corruption or "")
        slot, occ = m["slot"], int(m["occ"] or 1)
        parts = self.template.split(f"[{slot}]")
        if occ >= len(parts):
            raise ValueError(f"corruption: template has fewer than {occ} occurrence(s) of [{slot}]")
        return f"[{slot}]".join(parts[:occ]) + f"[{slot}_corrupt]" + f"[{slot}]".join(parts[occ:])

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
    return PARAMS_DIR / f"{task_or_path}.yaml"


def load_params(task_or_path: str | Path, **overrides) -> TaskParams:
    """Read and validate a params file; ``overrides`` (not None) replace top-level fields.

    Raises ParamsError naming the file and field for any problem.
    """
    path = params_path(task_or_path)
    if not path.exists():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise ParamsError(f"{path}: no such params file; known tasks: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of fields at the top level")
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
            msg = f"required field is missing; add '{field}: ...' (see README, 'params format')"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown field; remove it or check its spelling (fields: {sorted(TaskParams.model_fields)})"
        lines.append(f"{path}: {field}: {msg}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Validate params files; prints a summary or the errors, exit 1 on any error.

    ``--model NAME`` also builds every file's prompts with that model's tokenizer (single-token answers, equal
    lengths, pool words kept), as a run does before its first cell; GPT-2 hub names use the shipped tokenizer,
    so ``python -m helpers.params params/*.yaml --model gpt2-small`` works offline.
    """
    import argparse

    parser = argparse.ArgumentParser(description="Validate params files (schema; with --model, prompts too).")
    parser.add_argument("files", nargs="*")
    parser.add_argument("--model", default=None, help="check prompts with this model's tokenizer (default: schema only)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for f in args.files or sorted(str(p) for p in PARAMS_DIR.glob("*.yaml")):
        try:
            p = load_params(f, model=args.model)
            note = ""
            if args.model:
                from .models import load_tokenizer
                from .prompts import make_prompts

                ps = make_prompts(p, load_tokenizer(args.model), verbose=False)
                note = f", prompts of {ps.n_pos} tokens with {args.model}'s tokenizer"
            print(f"{f}: ok (task {p.task}, model {p.model}, {p.n_prompts} prompts{note})")
        except ParamsError as err:
            print(err, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
