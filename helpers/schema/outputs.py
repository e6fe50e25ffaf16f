"""Where results live, and how a run puts them there safely.

Layout: ``<outputs>/<task>/<model folder>/`` holds each template's notebook, HTML, JSON and figures; a template
that does not depend on the task (``scope: model`` in its notebook metadata, e.g. ``induction_checks``) runs once
per model into ``<outputs>/_models/<model folder>/``. A run executes into
``<outputs>/.staging-<task>-<model>-<template>-<pid>-*`` and only then publishes.

Guarantees (tested by killing runners mid-publish and racing two runs):

- **Names never escape.** Task, model and template names become one plain folder or file name each, and
  every resolved path is checked to lie inside the outputs folder.
- **One run at a time per task × model × template**: an OS file lock (``fcntl.flock``, released by the kernel
  when the process dies) held from staging to publish; a second run is refused at once with a message.
- **Atomic per run.** ``publish`` writes a journal, moves each old item aside, moves each new item in, and
  commits by deleting the journal. A run killed before the commit is rolled back by the next run of the same
  template (or by ``recover``): the previous result comes back complete. After the commit, only leftovers are
  cleaned. Staging folders of dead runs are removed by the next run.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from helpers import OUTPUTS_DIR, TEMPLATES_DIR

FOLDER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MODEL_SCOPE = "_models"  # folder of the per-model runs; not a valid task name, so no task can collide with it
JOURNAL = ".publish-{template}"  # folder in the run folder: journal.json and prev/ (the items being replaced)


class OutputsError(RuntimeError):
    """Outputs cannot be written safely (not writable, a name that escapes, another run in progress)."""


def safe_name(value: str, what: str) -> str:
    """``value`` when it is one plain folder/file name (letters, digits, ``._-``; not ``.``/``..``)."""
    if not FOLDER_RE.fullmatch(value) or value in (".", "..") or len(value) > 100:
        raise OutputsError(f"{what} {value!r}: cannot be used as a folder name; use letters, digits, '.', '_' or '-'")
    return value


def model_folder_name(model_name: str) -> str:
    """Folder name of a model under ``<outputs>/<task>/``: a bundled or hub name as it is (``org/name`` gives
    ``name``), a local folder its own name (``..`` resolved first). Raises OutputsError when that would not be
    one plain folder name."""
    path = Path(model_name)
    name = path.resolve().name if path.is_dir() else path.name if "/" in model_name else model_name
    return safe_name(name, f"model {model_name!r}: folder")


def display_model(model_name: str) -> str:
    """``model_folder_name`` for tables, falling back to the raw name (bad-input rows)."""
    try:
        return model_folder_name(model_name)
    except OutputsError:
        return model_name


def templates_dir() -> Path:
    """Where templates are read from: ``$CIRCUIT_LAB_TEMPLATES`` or ``nb_templates/``."""
    return Path(os.environ.get("CIRCUIT_LAB_TEMPLATES") or TEMPLATES_DIR)


def outputs_dir() -> Path:
    """Where results are published: ``$CIRCUIT_LAB_OUTPUTS`` or ``nb_outputs/`` (seen by Dask worker processes too)."""
    return Path(os.environ.get("CIRCUIT_LAB_OUTPUTS") or OUTPUTS_DIR)


def available_templates() -> list[str]:
    """Template names (``<templates dir>/*.py``)."""
    return sorted(p.stem for p in templates_dir().glob("*.py"))


def scope_of(template: str) -> str:
    """``"model"`` for a template that runs once per model (see ``template_scope``), else ``"task"`` (also
    for a name that is not a template here, e.g. a renamed copy)."""
    source = templates_dir() / f"{template}.py"
    return template_scope(source) if source.is_file() else "task"


def template_scope(template_source: Path) -> str:
    """``"model"`` when a template (its jupytext ``.py``) declares ``circuit_lab: {scope: model}`` in its notebook
    metadata (its results do not depend on the task: it runs once per model), else ``"task"``. The file is parsed
    once per version (a batch asks for every run and every run it reads)."""
    return _scope_of(Path(template_source), Path(template_source).stat().st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _scope_of(template_source: Path, mtime_ns: int) -> str:
    scope = (notebook_metadata(template_source).get("circuit_lab") or {}).get("scope", "task")
    if scope not in ("task", "model"):
        raise ValueError(f"{template_source}: circuit_lab.scope must be 'task' or 'model', not {scope!r}")
    return scope


def notebook_metadata(template_source: Path) -> dict:
    """The notebook metadata in a jupytext percent file's header (the commented YAML between ``# ---`` lines,
    under ``jupyter:``), read without importing jupytext: every notebook's kernel asks for its own template's
    scope, and jupytext's import alone costs most of a second. A test compares it with ``jupytext.read``."""
    lines = Path(template_source).read_text().splitlines()
    if not lines or lines[0].strip() != "# ---":
        return {}
    header = []
    for line in lines[1:]:
        if line.strip() == "# ---":
            break
        header.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    else:
        return {}
    return (yaml.safe_load("\n".join(header)) or {}).get("jupyter") or {}


def owner(task: str, scope: str) -> str:
    """The first folder level of a run: the task, or ``MODEL_SCOPE`` for a per-model template."""
    return MODEL_SCOPE if scope == "model" else task


def run_folder(root: Path, task: str, model_name: str) -> Path:
    """``<root>/<task>/<model folder>`` (``task`` may be ``MODEL_SCOPE``), checked to resolve inside ``root``."""
    folder = root / (task if task == MODEL_SCOPE else safe_name(task, "task")) / model_folder_name(model_name)
    inside(root, folder)
    return folder


def inside(root: Path, path: Path) -> Path:
    """``path``, after checking that it resolves inside ``root`` (symlinks included)."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise OutputsError(f"{path} resolves to {real}, outside {real_root}; refusing to write there")
    return path


def check_writable(root: Path, folder: Path) -> None:
    """Raise OutputsError (saying what to fix) unless the outputs root and ``folder`` (or the nearest existing
    parent inside the root) can be written, so that a run fails before it executes rather than at publish."""
    for path in (root, folder):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            raise OutputsError(
                f"{probe} is not writable (needed for {path}); fix its permissions "
                f"(chmod u+w {probe}) or write elsewhere with --outputs-dir"
            )


def staging_prefix(task: str, model_name: str, template: str) -> str:
    return f".staging-{task}-{model_folder_name(model_name)}-{template}-"


def new_staging(root: Path, task: str, model_name: str, template: str) -> Path:
    """A fresh staging folder for one run (its name carries the owner's PID, for clean-up of dead runs)."""
    return Path(tempfile.mkdtemp(prefix=f"{staging_prefix(task, model_name, template)}{os.getpid()}-", dir=root))


def remove_stale_staging(root: Path, task: str, model_name: str, template: str) -> list[Path]:
    """Remove staging folders of this task × model × template left by runs that died (call with the run lock
    held, so no live run owns them)."""
    removed = []
    for path in Path(root).glob(staging_prefix(task, model_name, template) + "*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextmanager
def run_lock(root: Path, task: str, model_name: str, template: str):
    """Hold the lock of one task × model × template, or raise OutputsError at once if another run holds it."""
    locks = Path(root) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{task}--{model_folder_name(model_name)}--{template}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputsError(
                f"another run of {task}/{model_folder_name(model_name)}/{template} is in progress "
                f"(pid {owner}); wait for it to finish, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock (the kernel does the same if the process dies)


def publish(staging: Path, final: Path, template: str) -> None:
    """Move every item of ``staging`` into ``final``, replacing the items of the same names, atomically as a set:
    a kill at any point leaves either the previous set (restored by ``recover``) or the new one."""
    final.mkdir(parents=True, exist_ok=True)
    recover(final, template)
    work = final / JOURNAL.format(template=template)
    prev = work / "prev"
    prev.mkdir(parents=True)
    items = sorted(p.name for p in staging.iterdir())
    journal = work / "journal.json"
    tmp = work / "journal.tmp"
    tmp.write_text(json.dumps({"staging": str(staging), "items": items}))
    os.replace(tmp, journal)  # from here until the journal is deleted, recover() rolls back
    for name in items:
        if (final / name).exists() or (final / name).is_symlink():
            os.replace(final / name, prev / name)
        os.replace(staging / name, final / name)
    journal.unlink()  # the commit point
    shutil.rmtree(work, ignore_errors=True)


def recover(final: Path, template: str) -> bool:
    """Roll back a publish of ``template`` into ``final`` that was interrupted before its commit; clean up
    after one interrupted after it. Returns whether a rollback happened."""
    work = final / JOURNAL.format(template=template)
    if not work.exists():
        return False
    journal = work / "journal.json"
    rolled_back = False
    if journal.exists():
        record = json.loads(journal.read_text())
        staging, prev = Path(record["staging"]), work / "prev"
        for name in record["items"]:
            new = final / name
            if (prev / name).exists():  # the old item was moved aside: drop whatever is in its place, put it back
                _remove(new)
                os.replace(prev / name, new)
            elif staging.exists() and not (staging / name).exists():  # a new item that had no predecessor
                _remove(new)
        rolled_back = True
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return rolled_back


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
