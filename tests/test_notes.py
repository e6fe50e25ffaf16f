"""A researcher's notes survive a rerun; an edited notebook is never replaced without a copy."""

from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers.notebook import notes

PLACEHOLDER = "**Your notes.**"


def template(*extra_sections: str) -> nbformat.NotebookNode:
    cells = [new_markdown_cell("# Title"), new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    for title in ("1. Faithfulness", "2. Minimality", *extra_sections):
        cells += [
            new_markdown_cell(f"## {title}\n\nHow it works."),
            new_code_cell(f"print('{title}')"),
            new_markdown_cell(PLACEHOLDER, metadata={"tags": [notes.NOTES_TAG]}),
        ]
    return notes.mark_template_cells(new_notebook(cells=cells))


def executed(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """As papermill leaves it: an injected parameters cell after the parameters cell, outputs on code cells."""
    nb = nbformat.from_dict(nb)
    nb.cells.insert(2, new_code_cell("x = 2", metadata={"tags": ["injected-parameters"]}))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", text="out")]
    return nb


def test_notes_and_inserted_cells_keep_their_place():
    old = executed(template())
    ids = [notes.cell_id(c) for c in old.cells]
    assert "notes:faithfulness" in ids and "notes:minimality" in ids
    old.cells[ids.index("notes:minimality")].source = "L3H2 is the mover; check on gpt2-small"
    code_of_faithfulness = ids.index(notes.cell_id(template().cells[3]))
    old.cells.insert(code_of_faithfulness + 1, new_code_cell("my_check()", outputs=[nbformat.v4.new_output("stream", text="old")]))
    old.cells.insert(code_of_faithfulness + 2, new_markdown_cell("why is F > 1?"))

    new = executed(template())
    report = notes.carry_over(old, new)
    assert report.notes == ["notes:minimality"] and report.inserted == 2 and report.orphaned == 0
    sources = [c.source for c in new.cells]
    assert "L3H2 is the mover; check on gpt2-small" in sources
    at = sources.index("my_check()")
    assert sources[at - 1] == "print('1. Faithfulness')" and sources[at + 1] == "why is F > 1?"
    carried = new.cells[at]
    assert carried.outputs == [] and notes.CARRIED_TAG in carried.metadata["tags"]  # not re-executed: no stale output
    assert sources.count("x = 2") == 1  # papermill's injected cell is not the researcher's
    assert PLACEHOLDER in sources  # the untouched notes cell stays as the template has it

    again = executed(template())  # a second rerun carries the same, once
    notes.carry_over(new, again)
    assert [c.source for c in again.cells] == sources


def test_notes_whose_section_is_gone_go_to_the_end_not_away():
    old = executed(template("3. Backup heads"))
    for cell in old.cells:
        if notes.cell_id(cell) == "notes:backup-heads":
            cell.source = "backup notes"
    old.cells.append(new_markdown_cell("a note at the very end, after the backup section"))
    new = executed(template())  # the template lost its backup section
    report = notes.carry_over(old, new)
    assert report.orphaned == 2
    tail = [c.source for c in new.cells[-3:]]
    assert tail[0].startswith("## Notes carried over") and tail[1:] == ["backup notes", "a note at the very end, after the backup section"]
    again = executed(template())
    assert notes.carry_over(new, again).orphaned == 2 and [c.source for c in again.cells[-3:]] == tail  # stable


def test_renumbered_sections_keep_their_notes():
    assert notes.section_id("2. Minimality") == notes.section_id("3. Minimality") == "minimality"


def test_an_edited_notebook_is_kept_whole_and_an_untouched_one_is_not_copied(tmp_path):
    published = tmp_path / "t.ipynb"
    nbformat.write(executed(template()), published)
    notes.write_fingerprint(published)
    assert not notes.was_edited(published) and notes.keep_edited_copy(published) is None
    nb = nbformat.read(published, as_version=4)
    nb.cells[-1].source = "my notes"
    nbformat.write(nb, published)
    kept = notes.keep_edited_copy(published)
    assert kept.parent == tmp_path / notes.EDITED_DIR and nbformat.read(kept, as_version=4).cells[-1].source == "my notes"
    assert notes.keep_edited_copy(published) != kept  # a second copy never overwrites the first


def test_a_notebook_from_before_cell_ids_is_kept_whole_not_duplicated(tmp_path):
    old = executed(new_notebook(cells=[new_markdown_cell("## 1. A"), new_code_cell("y = 1")]))
    new = executed(template())
    assert notes.carry_over(old, new).inserted == 0 and len(new.cells) == len(executed(template()).cells)
    published = tmp_path / "t.ipynb"
    nbformat.write(old, published)  # no fingerprint: whether it was edited is unknown, so it is kept
    fresh = tmp_path / "fresh.ipynb"
    nbformat.write(new, fresh)
    assert notes.carry_into(published, fresh).edited_copy is not None
