"""Select which preference pairs to keep by a displacement score: the rules as one frozen ``SelectionRule``.

High CHES marks pairs whose preferred and dispreferred responses look alike to the model; DPO on such pairs tends to
*lower* the likelihood of the preferred response (likelihood displacement, Razin et al. 2024). The paper ranks every
pair by ``ln_ches`` over the whole dataset and trains on the low end: its SORRY-Bench recipe keeps only the lowest 5%
(preset ``"sorry-bench"``).

Without a choice, ``SelectionRule()`` is the default that hf-ches' selection study (``docs/selection.md``, from
``benchmarks/selection_study.py`` on two real models and two real datasets) supports: ``entk_w``, the exact
output-layer kernel term, ranked the change of log π(chosen) best beyond the completions' lengths, and its sign
``entk_w > 0`` is the first-order prediction that DPO on the pair lowers log π(chosen); since no removal rule beat
both removing pairs at random and the length baselines, the default **removes nothing and flags** those pairs
(column ``flagged``). Where no pair is predicted to displace, it flags none, and the card says so.

Rules, for each split (and within each ``group_by`` value when given):

* ``remove_top=f``: remove the ``round(f * n)`` highest-scoring rows; ``keep_bottom=f``: keep the ``round(f * n)``
  lowest (``n`` = rows with a score, ``round`` half up, so 5% of 370 rows keeps 19, as in the paper);
* ``threshold=t``: remove rows with ``score > t`` (rows equal to ``t`` are kept);
* ``flag_only=True`` with any of them: remove none of the rows the rule picks; keep them, ``flagged`` True.

Ties are broken by row order: rows are ranked by ``(score, original index)``, so equal scores at the cut keep the
earlier rows. Rows whose score is NaN (unscorable rows from ``CHESScorer(on_invalid="flag")``) are never kept and
never dropped silently: they go to ``removed`` with ``removal_reason="nan_score"`` and are counted apart in the report.

Both outputs keep every input column, add ``original_index`` (the row's index in the input split) and stay in input
order; ``removed`` also gets ``removal_reason`` (``"high_score"`` or ``"nan_score"``), and under ``flag_only`` every
output gets ``flagged``. ``kept + removed == input``.

>>> from datasets import Dataset
>>> ds = Dataset.from_dict({"prompt": list("abcde"), "ln_ches": [0.3, -1.0, 2.5, 0.3, float("nan")]})
>>> sel = select_pairs(ds, SelectionRule(score_column="ln_ches", remove_top=0.25))
>>> list(sel.kept["original_index"]), list(sel.removed["original_index"]), list(sel.removed["removal_reason"])
([0, 1, 3], [2, 4], ['high_score', 'nan_score'])
>>> sel = select_pairs(ds.rename_column("ln_ches", "entk_w"))  # the default: flag entk_w > 0, remove none
>>> list(sel.kept["flagged"]), list(sel.removed["removal_reason"])
([True, False, True, True], ['nan_score'])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Value

DEFAULT_SCORE_COLUMN = "entk_w"  # the verdict of docs/selection.md; tests/test_filtering.py pins the two together
DEFAULT_THRESHOLD = 0.0  # entk_w > 0: DPO on the pair alone lowers log π(chosen) at first order
SELECTION_DOC = "docs/selection.md"  # in the hf-ches repository: the study's tables and the verdict
SELECTION_EVIDENCE = (
    "on real pairs (HH-RLHF, LLaMA-Factory; SmolLM2-135M, Gemma 3 270M under the Gemma Terms of Use), entk_w ranked "
    "the one-step change of log π(chosen) best beyond the completions' lengths, and no removal rule beat both "
    "removing pairs at random and the length baselines, so the default flags the pairs with entk_w > 0 and removes "
    f"none (the tables: {SELECTION_DOC} in the hf-ches repository)")
INDEX_COLUMN = "original_index"
REASON_COLUMN = "removal_reason"
FLAG_COLUMN = "flagged"
HIGH_SCORE, NAN_SCORE = "high_score", "nan_score"
RULE_KINDS = ("remove_top", "keep_bottom", "threshold")


@dataclass(frozen=True)
class SelectionRule:
    """Which pairs to remove (with ``flag_only``: to flag), by one score column. Set at most one of ``remove_top``,
    ``keep_bottom``, ``threshold``; with none set the rule is the default (see the module docstring): ``entk_w``,
    ``threshold=0``, ``flag_only``. ``flag_only`` left unset is True for the default and False for a rule given.

    >>> SelectionRule().describe()
    'flag the pairs with entk_w > 0 (remove none)'
    >>> SelectionRule(remove_top=0.1, score_column="ln_ches").describe()
    'remove the top 10% of pairs by ln_ches'
    >>> SelectionRule.preset("sorry-bench").describe()
    'keep the lowest 5% of pairs by ln_ches'
    >>> SelectionRule(threshold=0.5, score_column="ches").describe()
    'remove pairs with ches > 0.5'
    >>> SelectionRule(remove_top=1.5)
    Traceback (most recent call last):
    ...
    ValueError: remove_top: expected a fraction in [0, 1], got 1.5
    """

    score_column: str = DEFAULT_SCORE_COLUMN
    remove_top: float | None = None  # fraction of rows (per split, per group) with the highest scores to remove
    keep_bottom: float | None = None  # fraction of rows with the lowest scores to keep
    threshold: float | None = None  # remove rows with score > threshold
    group_by: str | None = None  # rank within each value of this column (e.g. "prompt") instead of the whole split
    flag_only: bool | None = None  # keep the rows the rule picks, flagged; None: True for the default rule only

    def __post_init__(self) -> None:
        chosen = [kind for kind in RULE_KINDS if getattr(self, kind) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set only one of remove_top, keep_bottom, threshold; got {', '.join(chosen)}")
        if not chosen:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD)
        if self.flag_only is None:
            object.__setattr__(self, "flag_only", not chosen)
        for kind in ("remove_top", "keep_bottom"):
            value = getattr(self, kind)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value <= 1.0):
                raise ValueError(f"{kind}: expected a fraction in [0, 1], got {value!r}")
        threshold = self.threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise ValueError(f"threshold: expected a finite number, got {self.threshold!r}")
        if self.threshold is not None and self.group_by is not None:
            raise ValueError("group_by applies to remove_top / keep_bottom; a threshold is the same in every group")
        if not isinstance(self.score_column, str) or not self.score_column:
            raise ValueError(f"score_column: expected a column name, got {self.score_column!r}")

    @property
    def kind(self) -> str:
        """``"remove_top"``, ``"keep_bottom"`` or ``"threshold"``."""
        return next(kind for kind in RULE_KINDS if getattr(self, kind) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.kind)

    def describe(self) -> str:
        """The rule in words, for logs and the dataset card."""
        by = f"by {self.score_column}" + (f" within each {self.group_by!r} group" if self.group_by else "")
        if self.flag_only:
            picked = (f"the pairs with {self.score_column} > {self.threshold:g}" if self.kind == "threshold" else
                      f"the top {self.value * 100:g}% of pairs {by}" if self.kind == "remove_top" else
                      f"all but the lowest {self.value * 100:g}% of pairs {by}")
            return f"flag {picked} (remove none)"
        if self.kind == "threshold":
            return f"remove pairs with {self.score_column} > {self.threshold:g}"
        verb = "remove the top" if self.kind == "remove_top" else "keep the lowest"
        return f"{verb} {self.value * 100:g}% of pairs {by}"

    def why(self) -> str:
        """Why this score selects, for the card and the demo: the study's evidence (`SELECTION_EVIDENCE`), said of
        the default score, or of the default beside a score chosen for the run.

        >>> SelectionRule(score_column="ches", threshold=0.0).why()[:60]
        'chosen for this run; the default is entk_w: on real pairs (H'
        """
        if self.score_column == DEFAULT_SCORE_COLUMN:
            return SELECTION_EVIDENCE
        return f"chosen for this run; the default is {DEFAULT_SCORE_COLUMN}: {SELECTION_EVIDENCE}"

    @classmethod
    def preset(cls, name: str) -> "SelectionRule":
        """A named rule from ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown selection preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, SelectionRule] = {
    "default": SelectionRule(),  # flag the pairs with entk_w > 0, remove none (docs/selection.md)
    # Razin et al. 2024, Sec. 6: keep the lowest 5% by ln_ches
    "sorry-bench": SelectionRule(score_column="ln_ches", keep_bottom=0.05),
}


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """Nearest integer, halves up; products like 0.1 * 300 = 30.000000000000004 are first rounded to 9 decimals."""
    return np.floor(np.round(x, 9) + 0.5).astype(np.int64)


def keep_mask(scores: np.ndarray, rule: SelectionRule, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the rows ``rule`` keeps; ``groups`` holds one integer group code per row (or None).

    Rows are ranked by ``(group, score, row index)``; NaN scores are never kept.

    >>> scores = np.array([0.3, -1.0, 2.5, 0.3, np.nan])
    >>> keep_mask(scores, SelectionRule(keep_bottom=0.5)).tolist()  # 2 of the 4 scored rows; the tie keeps row 0
    [True, True, False, False, False]
    >>> keep_mask(scores, SelectionRule(threshold=0.3)).tolist()
    [True, True, False, True, False]
    >>> keep_mask(scores, SelectionRule(remove_top=0.5), groups=np.array([0, 0, 1, 1, 1])).tolist()
    [False, True, False, True, False]
    """
    scores = np.asarray(scores, dtype=np.float64)  # [n]
    valid = ~np.isnan(scores)
    if rule.kind == "threshold":
        return valid & (scores <= rule.threshold)
    groups = np.zeros(len(scores), dtype=np.int64) if groups is None else np.asarray(groups)
    rows = np.flatnonzero(valid)  # [m] scored rows, ascending index
    order = rows[np.lexsort((rows, scores[rows], groups[rows]))]  # [m] by group, then score, then index
    _, first, sizes = np.unique(groups[order], return_index=True, return_counts=True)  # groups[order] is sorted
    rank = np.arange(len(order)) - np.repeat(first, sizes)  # [m] 0-based rank inside the row's group
    size = np.repeat(sizes, sizes)  # [m] size of the row's group
    n_keep = _round_half_up(rule.keep_bottom * size) if rule.kind == "keep_bottom" else size - _round_half_up(
        rule.remove_top * size)
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[rank < n_keep]] = True
    return keep


def score_summary(scores: np.ndarray) -> dict[str, float | int | None]:
    """Count, NaN count, mean, std and quantiles of a score column (6 significant digits), for cards and logs.

    >>> score_summary(np.array([1.0, 2.0, 3.0, np.nan]))["p50"]
    2.0
    """
    scores = np.asarray(scores, dtype=np.float64)
    finite = scores[~np.isnan(scores)]
    out: dict[str, float | int | None] = {"count": int(finite.size), "nan_count": int(scores.size - finite.size)}
    stats = {"mean": np.mean, "std": np.std, "min": np.min, "max": np.max}
    quantiles = {"p10": 10, "p25": 25, "p50": 50, "p75": 75, "p90": 90}
    for name, fn in stats.items():
        out[name] = float(f"{fn(finite):.6g}") if finite.size else None
    for name, q in quantiles.items():
        out[name] = float(f"{np.percentile(finite, q):.6g}") if finite.size else None
    return out


@dataclass(frozen=True)
class SplitReport:
    """Counts and score statistics of one split's selection (what the card and the run JSON show).

    ``cutoff``: the rows the rule leaves (kept, not flagged) score at most this (the threshold, or their highest
    score under a fraction rule); None with ``group_by`` (one cut per group) or when the rule leaves none.
    """

    split: str
    num_rows: int
    num_kept: int
    num_removed: int  # all removed rows, unscorable ones included
    num_unscorable: int  # removed because the score is NaN
    cutoff: float | None
    summary: dict = field(default_factory=dict)
    num_flagged: int = 0  # kept rows the rule picks, under ``flag_only``


@dataclass(frozen=True)
class Selection:
    """The rows of one split that a rule keeps and removes; ``kept + removed`` is ``scored`` (the input), row for
    row."""

    scored: Dataset
    kept: Dataset
    removed: Dataset
    report: SplitReport


def check_selectable(dataset: Dataset, rule: SelectionRule, split: str = "train", require_score: bool = True) -> None:
    """Raise a clear ``ValueError`` if ``rule`` cannot run on ``dataset`` (cheap: reads the schema only).

    Checks: the split has rows; the score column exists and is numeric (unless ``require_score`` is False, for
    data that is still to be scored); ``group_by`` exists; the output columns are not taken.

    >>> check_selectable(Dataset.from_dict({"ches": [1.0]}), SelectionRule(), "test")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: split 'test': score column 'entk_w' not found; columns: ['ches']. Score the pairs first ...
    """
    where = f"split {split!r}"
    if len(dataset) == 0:
        raise ValueError(f"{where} has no rows; there is nothing to select from")
    columns = dataset.column_names
    if rule.score_column in columns:
        dtype = getattr(dataset.features[rule.score_column], "dtype", None)
        if dtype is None or not (dtype.startswith(("float", "int", "uint")) or dtype in ("double", "null")):
            raise ValueError(f"{where}: score column {rule.score_column!r} must be numeric, found "
                             f"{dataset.features[rule.score_column]}")
    elif require_score:
        raise ValueError(f"{where}: score column {rule.score_column!r} not found; columns: {columns}. Score the pairs "
                         "first (CHESScorer, or --model_name_or_path) or choose another --score_column.")
    if rule.group_by is not None and rule.group_by not in columns:
        raise ValueError(f"{where}: group_by column {rule.group_by!r} not found; columns: {columns}")
    taken = [name for name in (INDEX_COLUMN, REASON_COLUMN, FLAG_COLUMN) if name in columns]
    if taken:
        raise ValueError(f"{where} already has column(s) {taken}, which the selection adds (is this the output of an "
                         "earlier selection? select from its 'scored' config instead, or drop those columns)")


def _group_codes(values: list[Any]) -> np.ndarray:
    """One integer per row, equal for equal values (lists of messages are compared by their JSON)."""
    codes: dict[Any, int] = {}
    keys = (json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v for v in values)
    return np.array([codes.setdefault(key, len(codes)) for key in keys], dtype=np.int64)


def select_pairs(dataset: Dataset, rule: SelectionRule = SelectionRule(), split: str = "train") -> Selection:
    """Split one ``Dataset`` into the rows ``rule`` keeps and removes (see the module docstring for the rules)."""
    check_selectable(dataset, rule, split)
    scores = np.asarray(dataset.with_format("numpy")[rule.score_column], dtype=np.float64)  # [n]; null -> NaN
    groups = _group_codes(dataset[rule.group_by]) if rule.group_by else None
    keep = keep_mask(scores, rule, groups)  # [n]
    flagged = np.zeros(len(scores), dtype=bool)  # [n]
    if rule.flag_only:  # the rule's picks stay, flagged; unscorable rows are removed as under every rule
        flagged, keep = ~keep & ~np.isnan(scores), ~np.isnan(scores)
    kept_idx, removed_idx = np.flatnonzero(keep), np.flatnonzero(~keep)
    indexed = dataset.add_column(INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64))
    if rule.flag_only:
        indexed = indexed.add_column(FLAG_COLUMN, flagged.tolist(), feature=Value("bool"))
    reasons = [None if k else NAN_SCORE if np.isnan(x) else HIGH_SCORE for k, x in zip(keep, scores)]
    removed = indexed.add_column(REASON_COLUMN, reasons, feature=Value("string")).select(removed_idx)
    cutoff = None
    if rule.kind == "threshold":
        cutoff = float(rule.threshold)
    elif rule.group_by is None and (picked := np.flatnonzero(keep & ~flagged)).size:
        cutoff = float(scores[picked].max())
    report = SplitReport(split=split, num_rows=len(dataset), num_kept=int(kept_idx.size),
                         num_removed=int(removed_idx.size), num_unscorable=int(np.isnan(scores).sum()),
                         cutoff=cutoff, summary=score_summary(scores), num_flagged=int(flagged.sum()))
    return Selection(scored=dataset, kept=indexed.select(kept_idx), removed=removed, report=report)


def select_splits(dataset: DatasetDict, rule: SelectionRule = SelectionRule()) -> dict[str, Selection]:
    """``select_pairs`` on every split of a ``DatasetDict``; all splits are checked before any is processed.

    >>> empty = Dataset.from_dict({"entk_w": []})
    >>> select_splits(DatasetDict({"train": Dataset.from_dict({"entk_w": [1.0, 2.0]}), "test": empty}))
    Traceback (most recent call last):
    ...
    ValueError: split 'test' has no rows; there is nothing to select from
    """
    for split, ds in dataset.items():
        check_selectable(ds, rule, split)
    return {split: select_pairs(ds, rule, split) for split, ds in dataset.items()}
