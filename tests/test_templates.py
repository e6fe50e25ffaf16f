"""Templates: jupytext pairs in sync, a parameters cell, no logic (def/class) in templates."""

from __future__ import annotations

import re

import jupytext
import pytest

from helpers import TEMPLATES_DIR

TEMPLATES = sorted(TEMPLATES_DIR.glob("*.py"))


def test_there_are_templates():
    assert any(p.stem == "circuit_expms" for p in TEMPLATES)


@pytest.mark.parametrize("py", TEMPLATES, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb} missing: run `make sync`"
    a, b = jupytext.read(py), jupytext.read(ipynb)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert cells(a) == cells(b), f"{py.name} and {ipynb.name} differ: run `make sync`"


@pytest.mark.parametrize("py", TEMPLATES, ids=lambda p: p.stem)
def test_template_structure(py):
    nb = jupytext.read(py)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert sum("parameters" in t for t in tags) == 1
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"^\s*(def|class)\s", code, re.M), "move logic into helpers/"
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "How it works" in md and "How to interpret" in md
    assert "colab.research.google.com" in md


@pytest.mark.parametrize("py", TEMPLATES, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(py):
    """``papermill --help-notebook`` and its parameter checks see every assignment of the parameters cell (a comment
    with ``=`` in it hides the line from papermill's parser, which then says "Unable to parse line")."""
    import nbformat
    from papermill.translators import PythonTranslator

    cell = next(c for c in jupytext.read(py).cells if "parameters" in c.metadata.get("tags", []))
    assigned = re.findall(r"^([A-Za-z_]\w*)\s*=", cell.source, re.M)
    found = [p.name for p in PythonTranslator.inspect(nbformat.v4.new_code_cell(cell.source))]
    assert found == assigned, f"{py.name}: papermill cannot read {sorted(set(assigned) - set(found))}"


def test_colab_badges_follow_the_configured_repo():
    from helpers.runner import badges

    repo = badges.configured_repo()
    assert badges.sync(check=True) == [], "badges differ from [tool.circuit-lab] github: run `make sync`"
    readme = (TEMPLATES_DIR.parent / "README.md").read_text()
    for py in TEMPLATES:
        first = jupytext.read(py).cells[0]
        assert first.cell_type == "markdown" and badges.badge(py.stem, repo) in first.source
        assert badges.badge(py.stem, repo) in jupytext.read(py.with_suffix(".ipynb")).cells[0].source
        assert badges.clone_url(repo) in py.read_text()
        assert badges.badge(py.stem, repo) in readme


def test_changing_the_repo_rewrites_every_badge(tmp_path):
    import shutil

    from helpers.runner import badges

    root = tmp_path / "repo"
    shutil.copytree(TEMPLATES_DIR, root / "nb_templates", ignore=shutil.ignore_patterns("*.ipynb"))
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(TEMPLATES_DIR.parent / name, root / name)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(re.sub(r'github = "[^"]+"', 'github = "someone/fork"', pyproject.read_text()))
    changed = badges.sync(root=root, templates_dir=root / "nb_templates")
    assert len(changed) == len(TEMPLATES) + 1
    assert badges.sync(check=True, root=root, templates_dir=root / "nb_templates") == []
    text = (root / "README.md").read_text() + "".join(p.read_text() for p in (root / "nb_templates").glob("*.py"))
    assert "circuit-lab/circuit-lab" not in text and text.count("github/someone/fork/blob/main/nb_templates/") == 2 * len(TEMPLATES)
    pyproject.write_text(pyproject.read_text().replace("someone/fork", "not a repo"))
    with pytest.raises(ValueError, match="owner/repo"):
        badges.configured_repo(pyproject)
