"""A researcher's annotations of an executed notebook survive a rerun.

Researchers annotate the executed notebooks in ``nb_outputs/``; a rerun (``--force``, other params, a new version
of the template) executes a fresh notebook. Before it is published (``helpers.runner.run``):

- **Edited notebooks are kept.** Every published notebook has a fingerprint next to it
  (``.<template>.ipynb.sha256``); if the notebook there no longer matches it (edited after it was written, or
  written before fingerprints existed), it is copied whole to ``edited/<template>-<UTC time>.ipynb`` first.
- **Notes are carried into the new notebook.** Every template cell is marked with a stable id in its metadata
  (``circuit_lab.cell``): the text of a "Your notes" cell (tag ``notes``, one per section) replaces the new
  notebook's cell of the same section; cells the researcher inserted (no such id) are inserted after the same
  template cell as before (code cells without their old outputs, tagged ``carried-over``: they were not
  re-executed). What has no place any more (a section renamed or removed) goes to the end, under a heading, never
  dropped.

Nothing here imports torch: the runner calls it for every run.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

NOTES_TAG = "notes"
CARRIED_TAG = "carried-over"
META = "circuit_lab"  # cell metadata key: {"cell": <stable id>} on every cell that comes from the template
ORPHANS_ID = "carried-over-heading"
EDITED_DIR = "edited"
HEADING = re.compile(r"^#{1,3}\s+(.+)$", re.MULTILINE)


@dataclass
class CarryReport:
    """What a rerun did with the previous notebook's annotations."""

    notes: list[str] = field(default_factory=list)  # ids of "Your notes" cells whose text was carried
    inserted: int = 0  # cells the researcher had inserted, carried after the same template cell
    orphaned: int = 0  # cells whose place is gone, carried to the end
    edited_copy: Path | None = None  # where the edited notebook was kept whole

    def message(self) -> str:
        """One line for the run summary ('' when there was nothing to carry)."""
        parts = []
        if self.notes or self.inserted or self.orphaned:
            parts.append(
                f"notes carried over ({len(self.notes)} notes cells, {self.inserted} inserted cells"
                + (f", {self.orphaned} at the end: their section is gone" if self.orphaned else "")
                + ")"
            )
        if self.edited_copy is not None:
            parts.append(f"edited notebook kept as {self.edited_copy}")
        return "; ".join(parts)


def section_id(title: str) -> str:
    """``"## 2. Minimality"`` -> ``"minimality"``: a section's notes keep their place when sections are renumbered."""
    words = re.sub(r"^[\d.\s]+", "", title).lower()
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "section"


def mark_template_cells(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Give every cell of a template notebook a stable id (``metadata.circuit_lab.cell``): ``notes:<section>`` for
    a notes cell (its section: the nearest heading above it), else a hash of its type and source (``-2``, ``-3`` …
    for repeats). Ids do not depend on cell order, so an anchor survives cells added elsewhere."""
    seen: dict[str, int] = {}
    section = "top"
    for cell in nb.cells:
        if cell.cell_type == "markdown" and NOTES_TAG not in cell.metadata.get("tags", []):
            found = HEADING.search(cell.source)
            if found:
                section = section_id(found.group(1))
        if NOTES_TAG in cell.metadata.get("tags", []):
            base = f"notes:{section}"
        else:
            base = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:12]
        seen[base] = seen.get(base, 0) + 1
        cell.metadata[META] = {"cell": base if seen[base] == 1 else f"{base}-{seen[base]}"}
    return nb


def cell_id(cell) -> str | None:
    """The stable id of a template cell; None for a cell the researcher (or papermill) added."""
    return (cell.metadata.get(META) or {}).get("cell")


def _is_users(cell) -> bool:
    return cell_id(cell) is None and "injected-parameters" not in cell.metadata.get("tags", [])


def fingerprint_path(notebook: Path) -> Path:
    return notebook.with_name(f".{notebook.name}.sha256")


def fingerprint(notebook: Path) -> str:
    return hashlib.sha256(notebook.read_bytes()).hexdigest()


def write_fingerprint(notebook: Path) -> Path:
    """Record the notebook as written (next to it), so a later edit can be told from it."""
    path = fingerprint_path(notebook)
    path.write_text(fingerprint(notebook) + "\n")
    return path


def was_edited(notebook: Path) -> bool:
    """Whether a published notebook differs from what the runner wrote (True when that is unknown)."""
    stamp = fingerprint_path(notebook)
    return not stamp.exists() or stamp.read_text().strip() != fingerprint(notebook)


def keep_edited_copy(notebook: Path) -> Path | None:
    """Copy an edited published notebook to ``<its folder>/edited/<name>-<UTC time>.ipynb``; None if not edited."""
    if not notebook.exists() or not was_edited(notebook):
        return None
    folder = notebook.parent / EDITED_DIR
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(notebook.stat().st_mtime))
    dest = folder / f"{notebook.stem}-{stamp}.ipynb"
    n = 2
    while dest.exists():
        dest = folder / f"{notebook.stem}-{stamp}-{n}.ipynb"
        n += 1
    shutil.copy2(notebook, dest)
    return dest


def carry_over(old: nbformat.NotebookNode, new: nbformat.NotebookNode) -> CarryReport:
    """Put the researcher's notes and inserted cells of ``old`` into ``new`` (in place; see the module docstring)."""
    report = CarryReport()
    if not any(cell_id(c) for c in old.cells):  # written before cells had ids: no place is known (kept whole instead)
        return report
    index = {cell_id(c): i for i, c in enumerate(new.cells) if cell_id(c)}
    after: dict[str, list] = {}  # anchor id in new -> the researcher's cells to insert after it, in order
    orphans: list = []
    anchor = None
    for cell in old.cells:
        cid = cell_id(cell)
        if cid is not None and cid.startswith("notes:"):
            if cid in index:
                target = new.cells[index[cid]]
                if cell.source.strip() != target.source.strip():
                    target.source = cell.source
                    report.notes.append(cid)
            elif cell.source.strip():
                orphans.append(_carried(cell))
            anchor = cid
        elif cid is not None:  # a template cell (or the heading of earlier orphans: what follows it stays at the end)
            anchor = cid
        elif cid is None and _is_users(cell):
            if anchor in index:
                after.setdefault(anchor, []).append(_carried(cell))
                report.inserted += 1
            else:
                orphans.append(_carried(cell))
    cells = []
    for cell in new.cells:
        cells.append(cell)
        cells.extend(after.get(cell_id(cell), []))
    if orphans:
        heading = nbformat.v4.new_markdown_cell(
            "## Notes carried over from an earlier run\n\nTheir section is no longer in this template (renamed or removed): "
            "kept here rather than dropped."
        )
        heading.metadata[META] = {"cell": ORPHANS_ID}
        cells += [heading, *orphans]
        report.orphaned = len(orphans)
    new.cells = cells
    return report


def _carried(cell) -> nbformat.NotebookNode:
    """A copy of the researcher's cell for the new notebook: a code cell loses its old outputs (not re-executed)."""
    copy = nbformat.from_dict(dict(cell))  # keeps its cell id (random, so distinct from the new notebook's)
    if copy.cell_type == "code":
        copy.outputs, copy.execution_count = [], None
        tags = copy.metadata.setdefault("tags", [])
        if CARRIED_TAG not in tags:
            tags.append(CARRIED_TAG)
    if cell_id(copy) is not None:  # an orphaned notes cell: a plain researcher's cell from now on
        copy.metadata.pop(META)
    return copy


def carry_into(published: Path, fresh: Path) -> CarryReport:
    """Before ``fresh`` replaces ``published``: keep an edited ``published`` whole (``keep_edited_copy``) and carry its
    notes into ``fresh`` (rewritten in place). Nothing happens when nothing was published before."""
    if not published.exists():
        return CarryReport()
    edited_copy = keep_edited_copy(published)
    old = nbformat.read(published, as_version=4)
    new = nbformat.read(fresh, as_version=4)
    report = carry_over(old, new)
    report.edited_copy = edited_copy
    if report.notes or report.inserted or report.orphaned:
        nbformat.write(new, fresh)
    return report


__all__ = [
    "CarryReport",
    "mark_template_cells",
    "carry_over",
    "carry_into",
    "keep_edited_copy",
    "was_edited",
    "write_fingerprint",
    "fingerprint_path",
    "section_id",
    "NOTES_TAG",
    "CARRIED_TAG",
    "EDITED_DIR",
]
