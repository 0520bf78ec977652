"""The user's manual holds together: every relative link in README.md and docs/ points at a file
that exists, the README stays a manual (<= 300 lines), and users' pages never cite design notes
outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    links = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        links.append(target.split("#", 1)[0])
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in _relative_links(page) if t and not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("[a](gone.md) [b](https://x.org/y) [c](#anchor) [d](p.md#top)\n")
    assert _relative_links(page) == ["gone.md", "p.md"]


def test_readme_is_a_manual_not_a_lab_notebook() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for page in PAGES:
        assert "DESIGN.md" not in page.read_text(encoding="utf-8"), page


PY_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _api_problems(code: str) -> list[str]:
    """What a Python example in the docs gets wrong about the API: names imported from
    dynaflip_adapt that do not exist, keywords its request dataclasses do not take."""
    import ast
    import dataclasses
    import importlib

    problems = []
    imported: dict[str, object] = {}
    tree = ast.parse(code)  # a syntax error fails the test here
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynaflip_adapt"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"{node.module} has no {alias.name}")
                else:
                    imported[alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            target = imported.get(node.func.id)
            if isinstance(target, type) and dataclasses.is_dataclass(target):
                fields = {f.name for f in dataclasses.fields(target)}
                problems += [
                    f"{node.func.id} takes no {k.arg}"
                    for k in node.keywords
                    if k.arg and k.arg not in fields
                ]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_use_the_api_as_it_is(page: Path) -> None:
    for block in PY_BLOCK.findall(page.read_text(encoding="utf-8")):
        assert not _api_problems(block), (page.name, _api_problems(block))


def test_example_checker_sees_a_wrong_name_and_keyword() -> None:
    code = "from dynaflip_adapt import AdaptRequest, adapt_sites\nAdaptRequest(logs=[], sites=1)\n"
    assert _api_problems(code) == [
        "dynaflip_adapt has no adapt_sites",
        "AdaptRequest takes no sites",
    ]
