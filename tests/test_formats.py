"""Every input format TRL 1.16's DPOTrainer accepts gives TRL's own token ids, checked against TRL itself.

(a) explicit standard strings; (b) conversational with a system message in the prompt; (c) conversational with an
implicit prompt; (d) a string ``prompt`` beside message lists that repeat the user turn (``HuggingFaceH4/
ultrafeedback_binarized``), which TRL reads through ``maybe_extract_prompt``; (e) the string implicit prompt
(``Anthropic/hh-rlhf``); (f) extra columns, which pass through the scorer untouched. Formats TRL refuses are refused
in ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer
from trl import maybe_extract_prompt

from hf_ches import CHESScorer
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import synthetic_pairs
from tests.plugins.models import trl_prepare

N = 24


def _messages(role: str, texts: list[str]) -> list[list[dict]]:
    return [[{"role": role, "content": text.strip()}] for text in texts]


def format_rows(name: str) -> dict[str, list]:
    """Rows of format ``name`` (module docstring), built from the same synthetic text."""
    std = synthetic_pairs(N, seed=3)
    conv = synthetic_pairs(N, "conversational", seed=3)
    if name == "a":
        return std
    if name == "b":
        system = _messages("system", [f"You answer in {n} words." for n in range(N)])
        return conv | {"prompt": [s + p for s, p in zip(system, conv["prompt"])]}
    if name == "c":
        return synthetic_pairs(N, "implicit", seed=3)
    if name == "d":
        return {"prompt": std["prompt"], "chosen": [p + c for p, c in zip(conv["prompt"], conv["chosen"])],
                "rejected": [p + r for p, r in zip(conv["prompt"], conv["rejected"])]}
    if name == "e":
        return {"chosen": [p + c for p, c in zip(std["prompt"], std["chosen"])],
                "rejected": [p + r for p, r in zip(std["prompt"], std["rejected"])]}
    if name == "f":
        return std | {"id": [f"row-{i}" for i in range(N)], "score_chosen": [8.5] * N, "score_rejected": [2.0] * N,
                      "messages": [p + c for p, c in zip(conv["prompt"], conv["chosen"])]}
    raise ValueError(name)


@pytest.mark.parametrize("name", list("abcdef"))
def test_token_ids_equal_trl(tiny_model, name):
    rows = format_rows(name)
    dataset = Dataset.from_dict(rows)
    # TRL's DPOTrainer itself extracts a prompt only when there is no prompt column; for (d) TRL's recipes map
    # maybe_extract_prompt first, which ignores a prompt whose format differs from the completions'.
    if name == "d":
        dataset = dataset.map(maybe_extract_prompt)
    if name == "f":
        # TRL's is_conversational reads one key popped from a set, so beside a `messages` column its add-EOS rule
        # depends on PYTHONHASHSEED (string hashing). We read prompt/chosen/rejected only: TRL's result whenever it
        # looks at one of them, which is what TRL gives on these rows without the extra column.
        dataset = dataset.remove_columns("messages")
    expected = trl_prepare(tiny_model, dataset)
    ours = tokenize_pairs(read_rows(rows, range(N)), AutoTokenizer.from_pretrained(tiny_model))
    assert [p.prompt_ids for p in ours] == expected["prompt_ids"]
    assert [p.chosen_ids for p in ours] == expected["chosen_ids"]
    assert [p.rejected_ids for p in ours] == expected["rejected_ids"]


def test_extra_columns_pass_through_untouched(tiny_model):
    rows = format_rows("f")
    scored = CHESScorer(tiny_model).map(Dataset.from_dict(rows).shuffle(seed=0), batch_size=5)
    for column in ("id", "score_chosen", "score_rejected", "messages", "prompt", "chosen", "rejected"):
        by_id = dict(zip(scored["id"], scored[column]))
        assert [by_id[i] for i in rows["id"]] == rows[column], column


def test_implicit_string_rows_with_a_word_split_at_the_boundary_are_scored(tiny_model):
    """(e) as in HH-RLHF: both answers start with the same letters, so the prompt ends inside a word and its last
    tokens move into the completion. Every row is scored; the shift is counted, as TRL trains it."""
    rows = {"chosen": ["Q: what is it? A: good answer", "Q: and this? A: that is all"],
            "rejected": ["Q: what is it? A: goo", "Q: and this? A: that was it"]}
    scored = CHESScorer(tiny_model).map(Dataset.from_dict(rows))
    assert len(scored) == 2 and all(s == s for s in scored["ches"])  # no NaN
    assert scored["prompt_tokens_shifted"][0] > 0
