"""The repository stands alone: no file points outside it, every `docs/` section the files cite exists, and neither
the repository nor the wheel holds third-party data."""

from __future__ import annotations

import re
import subprocess
import sys
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


def tracked_files() -> list[str]:
    """Tracked and new (not ignored) files of the checkout that exist in the working tree (``git ls-files``)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [path for path in listed if (ROOT / path).is_file()]


def repository_texts() -> dict[str, str]:
    """Tracked and new (not ignored) text files of the checkout, by path."""
    texts = {}
    for path in tracked_files():
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


# Data files the repository may hold: our own synthetic pairs, and benchmark results (figures, row indices, counts).
OUR_DATA = re.compile(r"hf_ches/data/pairs_[a-z]+\.jsonl|benchmarks/results/[\w./-]+")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow", ".gz", ".zip", ".tar")


def _words(text: str, n: int = 10) -> set[str]:
    """Every run of ``n`` consecutive words of ``text`` (lower case, punctuation and spacing ignored): a quoted
    sentence shows up whatever table or markup it was pasted into.

    >>> sorted(_words("A b, C d!", n=3))
    ['a b c', 'b c d']
    """
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_no_third_party_data_is_tracked():
    import pyarrow.parquet as pq

    data = [path for path in tracked_files() if path.endswith(DATA_SUFFIXES)]
    assert data and not [path for path in data if not OUR_DATA.fullmatch(path)]
    for path in (p for p in data if p.endswith(".parquet")):  # result tables: numbers only, no text column
        schema = pq.read_schema(ROOT / path)
        assert all(schema.field(name).type != "string" for name in schema.names), (path, schema.names)


def test_no_file_quotes_the_real_data():
    """No tracked text (README, docs, docstrings, results, our own pairs) holds ten words in a row of the real
    third-party files the tests read."""
    from hf_ches.testing import HH_RLHF_SAMPLE, LLAMAFACTORY_DPO
    from tests.plugins.real_data import real_file

    real = set()
    for name in (HH_RLHF_SAMPLE, *LLAMAFACTORY_DPO):
        real |= _words(real_file(name).read_text(encoding="utf-8"))
    quoted = {path: sorted(found)[:3] for path, text in repository_texts().items() if (found := _words(text) & real)}
    assert not quoted, quoted


def test_the_wheel_holds_no_third_party_data(tmp_path):
    """The wheel built from the tracked files holds the package's code, its own synthetic pairs and their card."""
    import zipfile

    source = tmp_path / "source"
    for path in tracked_files():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes((ROOT / path).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("hf_ches-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    allowed = re.compile(r"hf_ches/[\w/]+\.py|hf_ches/data/(README\.md|pairs_[a-z]+\.jsonl)|hf_ches/templates/\w+\.md|hf_ches-[\w.]+\.dist-info/\w+(\.txt)?")
    assert "hf_ches/data/pairs_standard.jsonl" in names and "hf_ches/templates/dataset_card.md" in names
    assert not [name for name in names if not allowed.fullmatch(name)]


# The commands, side by side on one floor: each reads its pairs through `hf_ches.sources`, writes through
# `hf_ches.outputs` and prints through `hf_ches.console`, never through another command. The demo alone stands one
# floor up: it is a tour of the publish command, and runs it.
COMMAND_MODULES = {"hf_ches.pipeline", "hf_ches.report", "hf_ches.validate", "hf_ches.demo"}
FRONT_DOORS = {"hf_ches.cli": COMMAND_MODULES, "hf_ches.demo": {"hf_ches.pipeline"}}


def imported_modules(path: Path) -> set[str]:
    """The ``hf_ches`` modules that the file at ``path`` imports, anywhere in it (in functions too).

    >>> sorted(imported_modules(ROOT / "hf_ches" / "cli.py"))
    ['hf_ches.pipeline']
    """
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if node.module == "hf_ches" else node.module
                      for alias in node.names}
    return {name for name in found if name.startswith("hf_ches.")}


def test_no_command_imports_another_command():
    modules = {f"hf_ches.{path.stem}": path for path in (ROOT / "hf_ches").glob("*.py")}
    assert COMMAND_MODULES <= set(modules)
    crossing = {name: sorted((imported_modules(path) & COMMAND_MODULES) - {name} - FRONT_DOORS.get(name, set()))
                for name, path in modules.items()}
    assert not {name: found for name, found in crossing.items() if found}, crossing
