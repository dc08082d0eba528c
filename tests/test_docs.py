"""The docs a newcomer reads: every relative link resolves, the README stays a user guide."""

import re

from conftest import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def doc_files() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "eval").rglob("*.md")),
            *sorted((REPO / "checkpoints").glob("*.md"))]


def relative_links(path) -> list[str]:
    """The markdown links and images of `path` that point into the repository (not URLs, not anchors)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold commands, not links
    return [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_in_the_docs_resolves():
    broken = [f"{p.relative_to(REPO)}: {t}" for p in doc_files() for t in relative_links(p)
              if t and not (p.parent / t).exists()]
    assert broken == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](nowhere.md) ![img](plots/x.png) [web](https://example.com) [a](#top)\n"
                    "```bash\n[not a link](missing.md)\n```\n")
    assert relative_links(page) == ["page.md", "nowhere.md", "plots/x.png"]


def test_the_readme_is_a_user_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "no dates in the README: measurements go in docs/results"


def test_no_code_comment_points_into_the_readme():
    code = [p for d in ("collapse_lab", "train", "eval", "benchmarks") for p in (REPO / d).rglob("*.py")]
    pointing = [f"{p.relative_to(REPO)}:{i}" for p in code for i, line in enumerate(p.read_text().splitlines(), 1)
                if re.search(r"\bREADME\b(?!\.md\b.*(write|read_text|open))", line) and "eval/README.md" not in line]
    assert pointing == []
