"""The front door stays a front door, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_readme_is_short_and_every_relative_link_resolves():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    pages = [readme, *sorted((REPO / "docs").glob("*.md"))]
    broken = [
        (page.name, target)
        for page in pages
        for target, _ in LINK.findall(page.read_text())
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()
    ]
    assert broken == []
    assert "make demo" in readme.read_text() and "make test" in readme.read_text()
