"""The repository stands alone: no file points outside it, and every `docs/` section the files cite exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Names of documents that live outside the repository (internal specs). A citation of one of them, or of a folder
# above the checkout, is a reference no reader of the repository can follow. `docs/hub-protocol.md` is ours.
OUTSIDE = re.compile(
    r"\.\./shared|shared/spec|\b(?:papers|performance|style|ecosystem)\.md|(?<!docs/)\bhub-protocol\.md")
# `docs/scores.md §4.1`, ``docs/scores.md`` §5.1, `docs/scores.md` §4.1–4.6 (a range: both ends are checked)
CITATION = re.compile(r"docs/([\w-]+\.md)`{0,2}(?:\s*§\s*(\d+(?:\.\d+)*)(?:\s*[–-]\s*(\d+(?:\.\d+)*))?)?")
HEADING = re.compile(r"^#+ (\d+(?:\.\d+)*)\.? ", re.MULTILINE)


def repository_texts() -> dict[str, str]:
    """Tracked and new (not ignored) text files of the checkout, by path."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for path in listed:
        try:
            texts[path] = (ROOT / path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # deleted in the working tree, or binary
            continue
    return texts


def sections(markdown: str) -> set[str]:
    """The section numbers of a document's numbered headings.

    >>> sorted(sections("# Title\\n## 2. Scores\\n### 2.1 CHES\\n"))
    ['2', '2.1']
    """
    return set(HEADING.findall(markdown))


def test_no_file_cites_a_document_outside_the_repository():
    found = [f"{path}:{text.count(chr(10), 0, match.start()) + 1}: {match.group()}"
             for path, text in repository_texts().items() if path != "tests/test_repo.py"
             for match in OUTSIDE.finditer(text)]
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_every_cited_docs_section_exists():
    texts = repository_texts()
    cited = 0
    for path, text in texts.items():
        for match in CITATION.finditer(text):
            name, first, last = match.groups()
            where = f"{path}:{text.count(chr(10), 0, match.start()) + 1}"
            assert f"docs/{name}" in texts, f"{where}: cites docs/{name}, which does not exist"
            for number in filter(None, (first, last)):
                assert number in sections(texts[f"docs/{name}"]), f"{where}: docs/{name} has no section §{number}"
                cited += 1
    assert cited, "no file cites a docs/ section: is CITATION still right?"
