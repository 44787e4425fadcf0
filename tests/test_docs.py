"""The README's links reach their pages (MkDocs checks the links inside docs/ with --strict; the README lies
outside it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def relative_links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_of_the_readme_and_the_architecture_page_exists():
    for page in ("README.md", "ARCHITECTURE.md"):
        for target in relative_links((ROOT / page).read_text()):
            assert (ROOT / target.split("#")[0]).is_file(), f"{page} links to {target}, which does not exist"


def test_the_check_sees_a_missing_page():
    assert relative_links("see [x](docs/nope.md), [y](https://example.org) and [z](#here)") == ["docs/nope.md"]
