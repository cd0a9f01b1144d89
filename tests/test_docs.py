"""The user documentation: every relative link resolves (files and #anchors), and no page reads like a work log."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
# words of how the work was organised, and files outside the repository
LOG_WORDS = re.compile(
    r"\bsessions? \d+|\bsession-\d+|\bcalls? [A-F]\b|next GPU session|(?-i:METHODS\.md)|shared docs", re.IGNORECASE
)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    text = CODE_BLOCK.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_work_log_words(page: Path) -> None:
    hits = [
        f"line {i}: {m.group(0)!r}"
        for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for m in LOG_WORDS.finditer(line)
    ]
    assert not hits, f"{page.relative_to(ROOT)} reads like a work log: {hits}"


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = CODE_BLOCK.search(text)
    assert first and "make demo" in first.group(0) and "make test" in first.group(0)
    assert "<!-- supported-hybrids -->" in text


def test_slugs() -> None:
    assert _slug("9. The papers' training protocol") == "9-the-papers-training-protocol"
    assert _slug("Token cross-entropy (`ssmtune/ops/cross_entropy_fused.py`)") == (
        "token-cross-entropy-ssmtuneopscross_entropy_fusedpy"
    )
