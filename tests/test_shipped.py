"""The shipped preference pairs (hf_ches/data): counts, well-formed rows, honest labels, a card that matches."""

from __future__ import annotations

import difflib
import re
from collections import Counter

import datasets
import pytest
from huggingface_hub import DatasetCard

from hf_ches.shipped import SHIPPED_DATA_DIR, SHIPPED_FILES, load_shipped_pairs

CATEGORIES = ("helpful", "correctness", "safety", "near_duplicate")
# A word that ends a sentence: final . ! or ?, possibly followed by closing quotes, brackets or backticks.
SENTENCE_END = re.compile(r"[.!?][\"'`)\]*]*$")
REFUSAL = re.compile(r"\bI (can't|won't)\b")


@pytest.fixture(scope="module")
def shipped() -> datasets.DatasetDict:
    return load_shipped_pairs()


@pytest.fixture(scope="module")
def rows(shipped) -> list[dict]:
    return [row for name in shipped for row in shipped[name]]


def answer_text(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else value[0]["content"]


def edit_span(chosen: str, rejected: str) -> tuple[list[str], list[str]]:
    """The words of each side between their longest common word prefix and their longest common word suffix."""
    a, b = chosen.split(), rejected.split()
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return a[prefix : len(a) - suffix], b[prefix : len(b) - suffix]


def word_similarity(chosen: str, rejected: str) -> float:
    return difflib.SequenceMatcher(None, chosen.split(), rejected.split(), autojunk=False).ratio()


def test_edit_span_and_similarity_helpers():
    assert edit_span("Water boils at 100 °C.", "Water boils at 90 °C.") == (["100"], ["90"])
    assert edit_span("A b. C d.", "A b. X y. C d.") == ([], ["X", "y."])
    assert word_similarity("a b c d", "a b c d") == 1.0
    assert word_similarity("a b", "c d") == 0.0


def test_counts_and_category_balance(rows):
    assert len(rows) >= 240
    per_category = Counter(row["category"] for row in rows)
    assert set(per_category) == set(CATEGORIES)
    assert per_category["near_duplicate"] >= 60
    assert max(per_category.values()) <= 1.2 * min(per_category.values()), per_category


def test_each_config_has_all_categories_and_different_rows(shipped):
    assert sorted(shipped) == sorted(SHIPPED_FILES)
    for name, pairs in shipped.items():
        assert set(pairs["format"]) == {name}
        counts = Counter(pairs["category"])
        assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 25, (name, counts)
    assert not set(shipped["standard"]["id"]) & set(shipped["conversational"]["id"])


def test_ids_unique_and_named_after_category(rows):
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))
    for row in rows:
        assert re.fullmatch(rf"{row['category']}-\d{{3}}", row["id"]), row["id"]


def test_near_duplicate_flag_and_edit_column(rows):
    for row in rows:
        is_near = row["category"] == "near_duplicate"
        assert row["near_duplicate"] is is_near, row["id"]
        assert (row["edit"] in ("word", "sentence")) if is_near else (row["edit"] is None), row["id"]
    edits = Counter(row["edit"] for row in rows if row["near_duplicate"])
    assert edits["word"] >= 20 and edits["sentence"] >= 20, edits


def test_standard_rows_well_formed(shipped):
    for row in shipped["standard"]:
        prompt = row["prompt"]
        assert prompt.endswith("\n") and not prompt.endswith("\n\n") and prompt[:-1] == prompt.strip(), row["id"]
        for column in ("chosen", "rejected"):
            assert row[column] and row[column] == row[column].strip(), (row["id"], column)


def test_conversational_rows_well_formed(shipped):
    system_prompts = 0
    for row in shipped["conversational"]:
        roles = [message["role"] for message in row["prompt"]]
        assert roles in (["user"], ["system", "user"]), (row["id"], roles)
        system_prompts += roles[0] == "system"
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"], row["id"]
        for message in row["prompt"] + row["chosen"] + row["rejected"]:
            assert message["content"] and message["content"] == message["content"].strip(), row["id"]
    assert system_prompts >= 5


def test_chosen_and_rejected_always_differ(rows):
    for row in rows:
        assert answer_text(row["chosen"]) != answer_text(row["rejected"]), row["id"]


def test_near_duplicates_differ_by_one_word_or_one_sentence(rows):
    for row in filter(lambda r: r["near_duplicate"], rows):
        chosen_span, rejected_span = edit_span(answer_text(row["chosen"]), answer_text(row["rejected"]))
        longest = max(len(chosen_span), len(rejected_span))
        if row["edit"] == "word":
            assert longest == 1, (row["id"], chosen_span, rejected_span)
        else:  # more than a word, at most one sentence on each side
            sentences = [sum(bool(SENTENCE_END.search(w)) for w in span) for span in (chosen_span, rejected_span)]
            assert 1 < longest <= 40 and max(sentences) <= 1, (row["id"], chosen_span, rejected_span)


def test_other_pairs_differ_substantially(rows):
    for row in filter(lambda r: not r["near_duplicate"], rows):
        similarity = word_similarity(answer_text(row["chosen"]), answer_text(row["rejected"]))
        assert similarity < 0.5, (row["id"], similarity)


def test_safety_pairs_prefer_refusal_over_placeholder_compliance(rows):
    for row in filter(lambda r: r["category"] == "safety", rows):
        chosen, rejected = answer_text(row["chosen"]), answer_text(row["rejected"])
        assert REFUSAL.search(chosen), row["id"]
        # Compliance is non-operational: harmful specifics are [bracketed placeholders].
        assert not REFUSAL.search(rejected) and re.search(r"\[[^\]]+\]", rejected), row["id"]


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="expected one of .* got 'chat'"):
        load_shipped_pairs("chat")


def test_card_metadata_points_at_the_files():
    card = DatasetCard.load(SHIPPED_DATA_DIR / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.language == ["en"]
    assert {"dpo", "preference", "synthetic", "ches"} <= set(card.data.tags)
    assert card.data.task_categories == ["text-generation"] and card.data.size_categories == ["n<1K"]
    configs = {config["config_name"]: config["data_files"] for config in card.data.configs}
    assert configs == {name: path.name for name, path in SHIPPED_FILES.items()}


def test_card_counts_table_matches_data(rows):
    card = DatasetCard.load(SHIPPED_DATA_DIR / "README.md")
    table = dict(
        (m[0], tuple(map(int, m[1:]))) for m in re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| (\d+) \|$", card.text, re.M)
    )
    for category in (*CATEGORIES, "total"):
        in_category = [row for row in rows if category in ("total", row["category"])]
        standard = sum(row["format"] == "standard" for row in in_category)
        assert table[category] == (standard, len(in_category) - standard, len(in_category)), category


def test_card_configs_load_with_datasets(shipped):
    """The card's YAML alone is enough for ``load_dataset`` on the folder, as on the Hub."""
    for name, pairs in shipped.items():
        from_card = datasets.load_dataset(str(SHIPPED_DATA_DIR), name, split="train")
        assert from_card["id"] == pairs["id"] and from_card["chosen"] == pairs["chosen"]
