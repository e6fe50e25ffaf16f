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
