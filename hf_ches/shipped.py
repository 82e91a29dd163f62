"""The preference pairs that ship with hf-ches: the default input of the score → filter → publish job.

Synthetic English pairs written by the hf-ches team (CC-BY-4.0; counts and details in the card,
``hf_ches/data/README.md``), in four categories of roughly equal size: ``helpful``, ``correctness``, ``safety``
(a refusal preferred over a non-operational compliance, the SORRY-Bench setting of Razin et al. 2024) and
``near_duplicate`` (chosen and rejected differ by one word or one sentence, the pairs CHES should rank highest).

A datasets table cannot mix string and message-list columns, so each TRL format is its own file and config, with
different rows in each:

* ``standard``: ``prompt``/``chosen``/``rejected`` are strings; every prompt ends with ``"\\n"`` so that
  ``prompt + chosen`` (what TRL tokenizes) reads cleanly, and answers have no leading space;
* ``conversational``: ``prompt`` is ``[{"role": "user", ...}]``, a few with a system message first; ``chosen`` and
  ``rejected`` are one ``{"role": "assistant", ...}`` message each.

Both carry ``id`` (``"<category>-NNN"``, unique over both files), ``category``, ``format``, ``near_duplicate`` and
``edit`` (``"word"`` or ``"sentence"`` on near-duplicates, else ``None``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import datasets

SHIPPED_DATA_DIR = Path(__file__).parent / "data"
SHIPPED_FILES = {
    "standard": SHIPPED_DATA_DIR / "pairs_standard.jsonl",
    "conversational": SHIPPED_DATA_DIR / "pairs_conversational.jsonl",
}

_METADATA = {
    "id": datasets.Value("string"),
    "category": datasets.Value("string"),
    "format": datasets.Value("string"),
    "near_duplicate": datasets.Value("bool"),
    "edit": datasets.Value("string"),
}
_MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
# Explicit features keep the column order and types fixed instead of inferred (``edit`` is mostly null).
SHIPPED_FEATURES = {
    "standard": datasets.Features(
        {**_METADATA, "prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
         "rejected": datasets.Value("string")}
    ),
    "conversational": datasets.Features(
        {**_METADATA, "prompt": _MESSAGES, "chosen": _MESSAGES, "rejected": _MESSAGES}
    ),
}


def load_shipped_pairs(
    fmt: Literal["standard", "conversational", "both"] = "both",
) -> datasets.Dataset | datasets.DatasetDict:
    """Load the shipped pairs with ``datasets.load_dataset("json", ...)`` (cached like any local dataset).

    Args:
        fmt: ``"standard"`` or ``"conversational"`` for that config as a ``Dataset``; ``"both"`` for a
            ``DatasetDict`` keyed by the two config names.

    Returns:
        The pairs, rows in file order (by category, then id).

    >>> pairs = load_shipped_pairs("standard")
    >>> pairs.column_names
    ['id', 'category', 'format', 'near_duplicate', 'edit', 'prompt', 'chosen', 'rejected']
    >>> row = pairs[0]
    >>> row["id"], row["prompt"]
    ('helpful-001', 'How do I keep my cast-iron skillet from rusting?\\n')
    >>> both = load_shipped_pairs()
    >>> sorted(both)
    ['conversational', 'standard']
    >>> [m["role"] for m in both["conversational"][0]["prompt"] + both["conversational"][0]["chosen"]]
    ['system', 'user', 'assistant']
    """
    if fmt == "both":
        return datasets.DatasetDict({name: load_shipped_pairs(name) for name in SHIPPED_FILES})
    if fmt not in SHIPPED_FILES:
        raise ValueError(f"fmt: expected one of 'standard', 'conversational', 'both', got {fmt!r}")
    return datasets.load_dataset(
        "json", data_files=str(SHIPPED_FILES[fmt]), features=SHIPPED_FEATURES[fmt], split="train"
    )

