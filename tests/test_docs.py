"""The documentation tells the truth about the code: the config reference is the schema's, and every link resolves."""

from __future__ import annotations

import re

import pytest

from slm.core.config_reference import reference

from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_config_reference_is_generated_from_the_schema():
    """A field added, renamed, retyped or documented anew in slm/core/config.py without `make docs` fails here."""
    assert (REPO / "docs" / "config.md").read_text() == reference(), "docs/config.md is out of date: run `make docs`"
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 40 and not [row for row in rows if row.endswith("|  |")], "a field without documentation"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):  # a web address or an anchor of the page
            continue
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to what does not exist: {broken}"
