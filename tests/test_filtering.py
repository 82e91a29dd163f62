"""Selection rules (hf_ches/filtering.py): hand-worked cuts, ties, NaN scores, groups, and kept + removed == input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from hf_ches.filtering import (
    DEFAULT_SCORE_COLUMN,
    FLAG_COLUMN,
    INDEX_COLUMN,
    PRESETS,
    REASON_COLUMN,
    SelectionRule,
    keep_mask,
    select_pairs,
    select_splits,
)


def pairs(scores: list[float], prompts: list | None = None) -> Dataset:
    n = len(scores)
    return Dataset.from_dict({
        "prompt": prompts if prompts is not None else [f"q{i}" for i in range(n)],
        "chosen": [f"good {i}" for i in range(n)],
        "rejected": [f"bad {i}" for i in range(n)],
        DEFAULT_SCORE_COLUMN: scores,
    })


# ---- the rule itself --------------------------------------------------------------------------------------------
def verdict() -> dict[str, str]:
    """The verdict line of docs/selection.md: ``**Verdict:** score `S`, rule `R`, <remove|flag>.``"""
    text = (Path(__file__).resolve().parents[1] / "docs" / "selection.md").read_text(encoding="utf-8")
    found = re.findall(r"^\*\*Verdict:\*\* score `([^`]+)`, rule `([^`]+)`, (remove|flag)", text, re.MULTILINE)
    assert len(found) == 1, "docs/selection.md must hold exactly one verdict line"
    return dict(zip(("score", "rule", "action"), found[0]))


def test_default_rule_is_the_verdict_of_the_selection_study():
    """The default selection is the one docs/selection.md reads from the study; the paper's is a preset."""
    rule, named = SelectionRule(), verdict()
    assert rule.score_column == DEFAULT_SCORE_COLUMN == named["score"]
    assert named["rule"] == (f"{rule.score_column} > {rule.threshold:g}" if rule.kind == "threshold"
                             else f"{rule.kind}={rule.value:g}")
    assert rule.flag_only == (named["action"] == "flag")
    assert PRESETS["default"] == rule
    assert PRESETS["sorry-bench"] == SelectionRule(score_column="ln_ches", keep_bottom=0.05)
    assert SelectionRule(remove_top=0.1).flag_only is False  # an explicit rule removes


def test_flag_only_keeps_every_scored_row_and_flags_the_rule_picks():
    sel = select_pairs(pairs([-2.0, 0.5, 0.0, float("nan"), 3.0]), SelectionRule(threshold=0.0, flag_only=True))
    assert list(sel.kept[INDEX_COLUMN]) == [0, 1, 2, 4] and list(sel.kept[FLAG_COLUMN]) == [False, True, False, True]
    assert list(sel.removed[REASON_COLUMN]) == ["nan_score"]  # unscorable rows go as under every rule
    assert (sel.report.num_flagged, sel.report.num_removed) == (2, 1)
    nothing = select_pairs(pairs([-2.0, -1.0]), SelectionRule())  # the default on pairs where nothing displaces
    assert (nothing.report.num_flagged, len(nothing.kept), len(nothing.removed)) == (0, 2, 0)
    assert SelectionRule(remove_top=0.2, flag_only=True).describe() == (
        f"flag the top 20% of pairs by {DEFAULT_SCORE_COLUMN} (remove none)")


@pytest.mark.parametrize("kwargs, message", [
    ({"remove_top": 1.5}, "remove_top: expected a fraction in [0, 1], got 1.5"),
    ({"keep_bottom": -0.1}, "keep_bottom: expected a fraction in [0, 1], got -0.1"),
    ({"keep_bottom": math.nan}, "keep_bottom: expected a fraction in [0, 1], got nan"),
    ({"remove_top": True}, "remove_top: expected a fraction in [0, 1], got True"),
    ({"threshold": math.inf}, "threshold: expected a finite number, got inf"),
    ({"remove_top": 0.1, "threshold": 2.0}, "set only one of remove_top, keep_bottom, threshold; got remove_top, threshold"),
    ({"threshold": 0.0, "group_by": "prompt"}, "group_by applies to remove_top / keep_bottom"),
    ({"score_column": ""}, "score_column: expected a column name"),
])
def test_bad_rules_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError) as error:
        SelectionRule(**kwargs)
    assert message in str(error.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown selection preset 'paper'; expected one of \['default', 'sorry-bench'\]"):
        SelectionRule.preset("paper")


# ---- keep_mask: worked by hand ----------------------------------------------------------------------------------
def test_fraction_rules_by_hand():
    scores = np.array([5.0, 1.0, 3.0, 2.0, 4.0])  # ranks: 1 < 2 < 3 < 4 < 5 at rows 1, 3, 2, 4, 0
    assert keep_mask(scores, SelectionRule(remove_top=0.4)).tolist() == [False, True, True, True, False]
    assert keep_mask(scores, SelectionRule(keep_bottom=0.4)).tolist() == [False, True, False, True, False]
    assert keep_mask(scores, SelectionRule(threshold=3.0)).tolist() == [False, True, True, True, False]
    assert keep_mask(scores, SelectionRule(remove_top=0.0)).all()
    assert not keep_mask(scores, SelectionRule(keep_bottom=0.0)).any()
    assert keep_mask(scores, SelectionRule(keep_bottom=1.0)).all()


def test_counts_round_half_up_and_ignore_float_noise():
    # The paper keeps 19 of ~370 SORRY-Bench pairs with "5%": 0.05 * 370 = 18.5 -> 19.
    assert keep_mask(np.arange(370.0), SelectionRule(keep_bottom=0.05)).sum() == 19
    # 0.1 * 300 is 30.000000000000004 in floating point: still 30 removed, not 31.
    assert (~keep_mask(np.arange(300.0), SelectionRule(remove_top=0.1))).sum() == 30
    assert (~keep_mask(np.arange(7.0), SelectionRule(remove_top=0.1))).sum() == 1  # 0.7 -> 1


def test_ties_are_broken_by_row_order():
    scores = np.array([1.0, 2.0, 2.0, 2.0, 2.0, 0.0])
    assert keep_mask(scores, SelectionRule(keep_bottom=0.5)).tolist() == [True, True, False, False, False, True]
    assert keep_mask(scores, SelectionRule(remove_top=0.5)).tolist() == [True, True, False, False, False, True]
    # all equal: the earlier rows are kept
    assert keep_mask(np.zeros(4), SelectionRule(remove_top=0.5)).tolist() == [True, True, False, False]


def test_nan_scores_are_never_kept_and_do_not_count_in_the_fraction():
    scores = np.array([np.nan, 1.0, 2.0, np.nan, 3.0, 4.0])
    assert keep_mask(scores, SelectionRule(remove_top=0.5)).tolist() == [False, True, True, False, False, False]
    assert keep_mask(scores, SelectionRule(threshold=100.0)).tolist() == [False, True, True, False, True, True]
    assert not keep_mask(np.full(3, np.nan), SelectionRule(keep_bottom=1.0)).any()


def test_groups_are_cut_separately():
    scores = np.array([9.0, 8.0, 1.0, 3.0, 7.0, 2.0])
    groups = np.array([0, 0, 0, 1, 1, 1])  # group 0: 9 > 8 > 1; group 1: 7 > 3 > 2
    assert keep_mask(scores, SelectionRule(remove_top=1 / 3), groups).tolist() == [False, True, True, True, False, True]
    assert keep_mask(scores, SelectionRule(remove_top=1 / 3)).tolist() == [False, False, True, True, True, True]
    assert keep_mask(scores, SelectionRule(keep_bottom=1 / 3), groups).tolist() == [False, False, True, False, False, True]


# ---- select_pairs / select_splits on datasets -------------------------------------------------------------------
def assert_partition(sel, source: Dataset) -> None:
    """kept + removed is the input, row for row, each with its original_index; kept and removed in input order."""
    kept, removed = sel.kept.to_list(), sel.removed.to_list()
    idx_kept, idx_removed = [r[INDEX_COLUMN] for r in kept], [r[INDEX_COLUMN] for r in removed]
    assert idx_kept == sorted(idx_kept) and idx_removed == sorted(idx_removed)
    assert sorted(idx_kept + idx_removed) == list(range(len(source)))
    original = source.to_list()
    for row in kept + removed:
        expected = original[row[INDEX_COLUMN]]
        for column, value in expected.items():
            same = value == row[column] or (isinstance(value, float) and math.isnan(value) and math.isnan(row[column]))
            assert same, (row[INDEX_COLUMN], column)
    assert REASON_COLUMN not in sel.kept.column_names and REASON_COLUMN in sel.removed.column_names
    assert (sel.report.num_rows, sel.report.num_kept, sel.report.num_removed) == (len(source), len(kept), len(removed))
    assert sel.scored is source


@pytest.mark.parametrize("rule", [
    SelectionRule(), SelectionRule(keep_bottom=0.05), SelectionRule(remove_top=0.37), SelectionRule(threshold=0.0),
    SelectionRule(remove_top=0.25, group_by="prompt"), SelectionRule(keep_bottom=0.5, group_by="prompt"),
    SelectionRule(remove_top=1.0), SelectionRule(keep_bottom=1.0),
], ids=lambda r: r.describe())
def test_kept_plus_removed_is_the_input_for_every_rule(rule):
    rng = np.random.default_rng(0)
    scores = rng.integers(-3, 4, size=120).astype(float)  # many ties
    scores[rng.choice(120, size=7, replace=False)] = np.nan
    prompts = [f"prompt {i % 13}" for i in range(120)]  # groups of 9-10 rows
    train, test = pairs(scores.tolist(), prompts), pairs(scores[:41].tolist(), prompts[:41])
    selections = select_splits(DatasetDict({"train": train, "test": test}), rule)
    assert list(selections) == ["train", "test"]
    for split, source in (("train", train), ("test", test)):
        sel = selections[split]
        assert_partition(sel, source)
        assert sel.report.split == split
        assert sel.report.num_unscorable == int(np.isnan(np.array(source[DEFAULT_SCORE_COLUMN], dtype=float)).sum())
        reasons = dict(zip(sel.removed[INDEX_COLUMN], sel.removed[REASON_COLUMN]))
        for index, reason in reasons.items():
            assert reason == ("nan_score" if math.isnan(source[index][DEFAULT_SCORE_COLUMN]) else "high_score")


def test_removed_scores_are_above_kept_scores_and_cutoff_is_reported():
    sel = select_pairs(pairs([0.5, 3.0, -1.0, 3.0, 2.0, 0.5, 7.0, -2.0, 1.0, 3.0]), SelectionRule(remove_top=0.3))
    # sorted: -2, -1, .5, .5, 1, 2, 3(1), 3(3), 3(9), 7 -> remove 3 rows: 7 and the two *later* 3.0 ties
    assert list(sel.removed[INDEX_COLUMN]) == [3, 6, 9]
    assert list(sel.kept[INDEX_COLUMN]) == [0, 1, 2, 4, 5, 7, 8]
    assert sel.report.cutoff == 3.0
    assert sel.report.summary["count"] == 10 and sel.report.summary["max"] == 7.0
    assert select_pairs(pairs([1.0, 2.0]), SelectionRule(threshold=1.5)).report.cutoff == 1.5
    assert select_pairs(pairs([1.0, 2.0]), SelectionRule(keep_bottom=0.0)).report.cutoff is None
    assert select_pairs(pairs([1.0, 2.0]), SelectionRule(remove_top=0.5, group_by="prompt")).report.cutoff is None


def test_group_by_conversational_prompts():
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    ds = pairs([1.0, 5.0, 2.0, 6.0], prompts=[user("a"), user("a"), user("b"), user("b")])
    sel = select_pairs(ds, SelectionRule(remove_top=0.5, group_by="prompt"))
    assert list(sel.kept[INDEX_COLUMN]) == [0, 2] and list(sel.removed[INDEX_COLUMN]) == [1, 3]


def test_null_scores_count_as_unscorable():
    sel = select_pairs(pairs([1.0, None, 3.0]), SelectionRule(threshold=10.0))
    assert list(sel.removed[REASON_COLUMN]) == ["nan_score"] and sel.report.num_unscorable == 1


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError) as missing:
        select_pairs(pairs([1.0]).remove_columns(DEFAULT_SCORE_COLUMN), SelectionRule(), split="train")
    assert str(missing.value).startswith(
        f"split 'train': score column '{DEFAULT_SCORE_COLUMN}' not found; columns: ['prompt', 'chosen', 'rejected']")
    with pytest.raises(ValueError, match="split 'test' has no rows"):
        select_splits(DatasetDict({"train": pairs([1.0]), "test": pairs([1.0]).select([])}))
    with pytest.raises(ValueError, match="score column 'prompt' must be numeric, found Value"):
        select_pairs(pairs([1.0]), SelectionRule(score_column="prompt"))
    with pytest.raises(ValueError, match="group_by column 'topic' not found"):
        select_pairs(pairs([1.0]), SelectionRule(remove_top=0.1, group_by="topic"))
    again = select_pairs(pairs([1.0, 2.0]), SelectionRule(remove_top=0.5)).kept
    with pytest.raises(ValueError, match=r"already has column\(s\) \['original_index'\]"):
        select_pairs(again, SelectionRule())
