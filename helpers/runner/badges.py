"""Colab badges from one configured value: ``[tool.circuit-lab] github`` (``owner/repo``) in pyproject.toml.

``python -m helpers.runner.badges`` rewrites the badge in the first cell of every template, the URL its Colab cell
clones, and the badge column of README's template table; ``--check`` only reports what disagrees (exit 1).
``make sync`` runs it before pairing the ``.ipynb`` files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

from helpers import PROJECT_ROOT, TEMPLATES_DIR

BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_RE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
CLONE_RE = re.compile(r'"https://github\.com/[^"/]+/[^"/]+"')


def configured_repo(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> str:
    """The ``owner/repo`` every badge points to."""
    repo = tomllib.loads(pyproject.read_text())["tool"]["circuit-lab"]["github"]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"{pyproject}: [tool.circuit-lab] github: expected 'owner/repo', got {repo!r}")
    return repo


def colab_url(template: str, repo: str, branch: str = "main") -> str:
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/nb_templates/{template}.ipynb"


def badge(template: str, repo: str) -> str:
    """The markdown of a template's Open-in-Colab badge."""
    return f"[![Open In Colab]({BADGE_SVG})]({colab_url(template, repo)})"


def clone_url(repo: str) -> str:
    return f'"https://github.com/{repo}"'


def template_text(py: Path, repo: str) -> str:
    """The template's jupytext source with its (first) badge and its clone URL set from ``repo``."""
    text = BADGE_RE.sub(lambda _: badge(py.stem, repo), py.read_text(), count=1)
    return CLONE_RE.sub(lambda _: clone_url(repo), text)


def readme_text(readme: Path, templates: list[str], repo: str) -> str:
    """README with each template table row's badge set from ``repo``; a template without a row is an error."""
    lines = readme.read_text().splitlines(keepends=True)
    for template in templates:
        rows = [i for i, line in enumerate(lines) if line.startswith(f"| `{template}` |")]
        if not rows:
            raise ValueError(
                f"{readme}: the template table has no row for `{template}`: add "
                f"'| `{template}` | what it does | badge |' (the badge is filled in by `make sync`)"
            )
        for i in rows:
            cells = lines[i].rstrip("\n").rstrip().rstrip("|").split(" | ")
            lines[i] = " | ".join(cells[:-1] + [badge(template, repo)]) + " |\n"
    return "".join(lines)


def sync(check: bool = False, root: Path = PROJECT_ROOT, templates_dir: Path = TEMPLATES_DIR) -> list[Path]:
    """Files whose badges disagree with the configured repo; rewritten unless ``check``."""
    repo = configured_repo(root / "pyproject.toml")
    py_files = sorted(templates_dir.glob("*.py"))
    wanted = {py: template_text(py, repo) for py in py_files}
    wanted[root / "README.md"] = readme_text(root / "README.md", [p.stem for p in py_files], repo)
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    if not check:
        for path in stale:
            path.write_text(wanted[path])
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report disagreeing files, change nothing")
    args = parser.parse_args(argv)
    stale = sync(check=args.check)
    for path in stale:
        print(f"{'differs' if args.check else 'updated'}: {path.relative_to(PROJECT_ROOT)}")
    if args.check and stale:
        print("run `make sync`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
