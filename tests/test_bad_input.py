"""Bad preference rows give errors that name the row index and the column; nothing is dropped."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset

from hf_ches import CHESScorer
from hf_ches.pairs import LAYOUTS, PairError
from hf_ches.testing import synthetic_pairs


def score(tiny_model, rows, **options):
    return CHESScorer(tiny_model, **options).map(Dataset.from_list(rows) if isinstance(rows, list) else
                                                 Dataset.from_dict(rows), batch_size=4)


def assert_error(tiny_model, rows, row, column, words):
    with pytest.raises(PairError) as info:
        score(tiny_model, rows)
    assert (info.value.row, info.value.column) == (row, column)
    assert f"row {row}, column {column!r}" in str(info.value) and words in str(info.value)


def test_missing_column(tiny_model):
    assert_error(tiny_model, {"prompt": ["a"], "chosen": ["b"]}, 0, "rejected",
                 "no preference pair layout fits the columns ['chosen', 'prompt']")


def test_unknown_layout_gets_one_error_naming_the_columns_and_the_layouts(tiny_model):
    rows = {"question": ["a", "b"], "response_j": [" x", " y"], "response_k": [" z", " w"]}
    with pytest.raises(PairError) as info:
        score(tiny_model, rows)
    message = str(info.value)
    assert message.startswith("row 0, column 'chosen': no preference pair layout fits the columns ['question', "
                              "'response_j', 'response_k']")
    assert all(layout in message for layout in LAYOUTS) and "--chosen_column" in message
    with pytest.raises(PairError, match="row 0, column 'query': no preference pair layout"):  # a mapped name, absent
        score(tiny_model, rows, prompt_column="query", chosen_column="response_j", rejected_column="response_k")


def test_unknown_sharegpt_speaker(tiny_model):
    turn = {"from": "observation", "value": "42"}
    rows = [{"conversations": [{"from": "human", "value": "hi"}, turn], "chosen": {"from": "gpt", "value": "y"},
             "rejected": {"from": "gpt", "value": "n"}}]
    assert_error(tiny_model, rows, 0, "conversations", "ShareGPT speaker 'observation' is not one of")


def test_none_completion(tiny_model):
    rows = synthetic_pairs(6)
    rows["rejected"][5] = None
    assert_error(tiny_model, rows, 5, "rejected", "found None")


def test_non_string_completion(tiny_model):
    rows = synthetic_pairs(6)
    rows["chosen"] = list(range(6))  # an int column: Arrow cannot mix types, so a whole column is the real case
    assert_error(tiny_model, rows, 0, "chosen", "found int 0")
    from hf_ches.pairs import read_rows

    with pytest.raises(PairError, match=r"row 9, column 'chosen': expected a string or a non-empty list of messages, "
                                        r"found int 7"):
        read_rows({"prompt": ["q"], "chosen": [7], "rejected": ["r"]}, [9])


def test_conversational_row_without_assistant_turn(tiny_model):
    rows = synthetic_pairs(5, fmt="conversational")
    rows["chosen"][3] = [{"role": "user", "content": "no answer here"}]
    assert_error(tiny_model, rows, 3, "chosen", "without an assistant turn")


def test_empty_dataset(tiny_model):
    assert_error(tiny_model, {"prompt": [], "chosen": [], "rejected": []}, 0, "chosen", "empty")


def test_mixed_formats(tiny_model):
    conv = synthetic_pairs(5, fmt="conversational")
    rows = {"prompt": conv["prompt"], "chosen": conv["chosen"], "rejected": synthetic_pairs(5)["rejected"]}
    assert_error(tiny_model, rows, 0, "rejected", "must share one format")


def test_string_prompt_beside_messages_that_share_no_turn(tiny_model):
    """A string prompt beside message completions is ignored (TRL's maybe_extract_prompt); without a shared leading
    message there is no prompt at all, which TRL cannot render either."""
    conv = synthetic_pairs(5, fmt="conversational")
    rows = {"prompt": synthetic_pairs(5)["prompt"], "chosen": conv["chosen"], "rejected": conv["rejected"]}
    assert_error(tiny_model, rows, 0, "prompt", "share no leading message (the 'prompt' column, in another format")


def test_prompt_not_a_token_prefix_is_scored_as_trl_or_refused_when_strict(tiny_model):
    rows = synthetic_pairs(6)
    rows["prompt"][4], rows["chosen"][4] = "the answ", "er is good"  # BPE merges across the boundary
    scored = score(tiny_model, rows)
    assert len(scored) == 6 and all(math.isfinite(x) for x in scored["ches"])  # scored the way TRL trains on it
    assert [n > 0 for n in scored["prompt_tokens_shifted"]] == [i == 4 for i in range(6)]
    with pytest.raises(PairError) as info:
        score(tiny_model, rows, boundary="strict")
    assert (info.value.row, info.value.column) == (4, "prompt") and "not a prefix" in str(info.value)
    flagged = score(tiny_model, rows, boundary="strict", on_invalid="flag")
    assert len(flagged) == 6  # counts in == counts out
    assert flagged["ches_flag"][4].startswith("the tokenized prompt is not a prefix")
    assert all(flag == "" for i, flag in enumerate(flagged["ches_flag"]) if i != 4)
    assert flagged["ches"] == scored["ches"]  # flagged, and scored the same way
    rows["rejected"][1] = None  # an unreadable cell in the same batch: both rows flagged, each for its own reason
    flagged = score(tiny_model, rows, boundary="strict", on_invalid="flag")
    assert "found None" in flagged["ches_flag"][1] and "not a prefix" in flagged["ches_flag"][4]


def test_unscorable_row_is_flagged_with_nan_not_dropped(tiny_model):
    rows = synthetic_pairs(6, prompt_words=(3, 5))
    rows["prompt"][1] = " ".join(["the answer"] * 40)  # prompt alone longer than max_length
    with pytest.raises(PairError, match="row 1, column 'prompt'.*max_length"):
        score(tiny_model, rows, max_length=50)
    flagged = score(tiny_model, rows, max_length=50, on_invalid="flag")
    assert len(flagged) == 6 and math.isnan(flagged["ches"][1]) and "max_length" in flagged["ches_flag"][1]
    assert sum(math.isnan(x) for x in flagged["ches"]) == 1


def test_bare_map_without_indices_names_batch_position(tiny_model):
    rows = synthetic_pairs(6)
    rows["chosen"][5] = None
    with pytest.raises(PairError, match=r"row 1, column 'chosen'.*position in this map batch"):
        Dataset.from_dict(rows).map(CHESScorer(tiny_model), batched=True, batch_size=4)


def test_csv_rows_with_missing_values_are_all_named_or_all_flagged(tiny_model, tmp_path, capsys):
    """Issue 15: `--on_invalid flag` still raised on a CSV row with a missing value, and only the first bad row was
    named."""
    from hf_ches import cli
    from tests.plugins.output import error_line

    rows = synthetic_pairs(6, seed=2)
    rows["chosen"][1] = rows["rejected"][4] = None
    csv = tmp_path / "pairs.csv"
    Dataset.from_dict(rows).to_csv(str(csv), index=False)
    args = ["score", "--dataset_name", str(csv), "--model_name_or_path", tiny_model, "--batch_size", "3"]
    def error(*argv: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            cli.main(list(argv))
        return error_line(capsys.readouterr().err)

    missing = "expected a string or a non-empty list of messages, found None"
    assert error(*args, "--output_dir", str(tmp_path / "raise")) == (  # row 4 is in the second map batch
        f"hf-ches score: error: row 1, column 'chosen': {missing}")
    assert error(*args[:-2], "--batch_size", "6", "--output_dir", str(tmp_path / "raise")) == (
        f"hf-ches score: error: row 1, column 'chosen': {missing}; rows [4] cannot be read either (pass "
        "on_invalid='flag' to flag such rows and go on)")
    assert cli.main([*args, "--on_invalid", "flag", "--output_dir", str(tmp_path / "flag")]) == 0
    from datasets import load_from_disk

    scored = load_from_disk(str(tmp_path / "flag"))["train"]
    flags = scored["ches_flag"][:]
    assert [i for i, flag in enumerate(flags) if flag] == [1, 4]
    assert flags[1] == "column 'chosen': expected a string or a non-empty list of messages, found None"
    assert [i for i, value in enumerate(scored["ln_ches"][:]) if math.isnan(value)] == [1, 4]
