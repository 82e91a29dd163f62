"""Ranking accuracy: does a model's likelihood order responses the way people do?

Chen et al. 2024 ("Preference Learning Algorithms Do Not Learn Preference Rankings", arXiv 2405.19534) count a
pair as ranked correctly when the model gives the preferred response at least the likelihood of the other one
(Def. 2.3, so ties count as correct). This module holds that math and its variants. It works on arrays of
per-sequence log-probabilities: the sum of the completion-token log-probs, as `CHESScorer` and TRL's DPOTrainer
produce them.

- `ranking_accuracy`: pairs. With token counts it also gives the length-normalized accuracy, which uses the mean
  log-prob per token (Eq. 15).
- `idealized_ranking_accuracy`: takes rater agreement α and a reference model. It gives the accuracy a perfect DPO
  optimum would reach (Cor. 3.3), the alignment gap, DPO reward accuracy, and how hard each wrongly ranked pair is
  to flip (Thm. 4.1).
- `listwise_ranking_accuracy`: several responses per prompt. A prompt counts as correct only when the whole
  ranking matches exactly (Def. A.8).

Every accuracy comes with a seeded percentile-bootstrap confidence interval. This module does no I/O and does not
import `evaluate`; `hf_ches.metric` wraps these functions as an `evaluate` module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

DEFAULT_BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)  # β grid of the paper (Table 1)
ALPHA_EPSILON = 0.001  # α of 0 or 1 becomes ε or 1 - ε, as in the paper's code (docs/scores.md §4.4)
HUMAN_TIE_EPSILON = 0.01  # ε of Def. C.1 for pairs the raters split evenly on (α = 0.5)


@dataclass(frozen=True)
class RankingOptions:
    """Options of the ranking-accuracy functions. They are also the `compute()` keywords of the metric.

    Args:
        tie_margin: the model ties a pair when its two log-probs differ by at most this much (in nats; in nats per
            token for the length-normalized accuracy). A tie counts as correct, as the paper's `>=` does. The
            default 0 makes only exact equality a tie.
        human_tie_epsilon: a pair the raters split evenly on (α = 0.5) is correct when the model's two log-probs
            differ by less than this (Def. C.1). Used only by the idealized config.
        beta: one DPO β or several. Used only by the idealized config; the default is the paper's grid.
        return_per_example: also return per-example flags as lists, in input order, to join onto a dataset.
        n_resamples: number of bootstrap resamples behind each confidence interval.
        confidence_level: coverage of the percentile-bootstrap intervals.
        seed: seed of the bootstrap, so the same inputs always give the same intervals.

    >>> RankingOptions(beta=0.1).beta
    (0.1,)
    >>> RankingOptions(tie_margin=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: tie_margin: expected a finite number >= 0, found -1.0
    """

    tie_margin: float = 0.0
    human_tie_epsilon: float = HUMAN_TIE_EPSILON
    beta: float | Sequence[float] = DEFAULT_BETAS
    return_per_example: bool = False
    n_resamples: int = 1000
    confidence_level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tie_margin", "human_tie_epsilon"):
            value = getattr(self, name)
            if not (_is_number(value) and np.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, found {value!r}")
        betas = self.beta if isinstance(self.beta, (list, tuple, np.ndarray)) else [self.beta]
        if len(betas) == 0 or not all(_is_number(b) and np.isfinite(b) and b > 0 for b in betas):
            raise ValueError(f"beta: expected a number > 0 or a non-empty list of them, found {self.beta!r}")
        object.__setattr__(self, "beta", tuple(float(b) for b in betas))
        if not (isinstance(self.n_resamples, int) and not isinstance(self.n_resamples, bool) and self.n_resamples > 0):
            raise ValueError(f"n_resamples: expected an integer >= 1, found {self.n_resamples!r}")
        if not (_is_number(self.confidence_level) and 0 < self.confidence_level < 1):
            raise ValueError(f"confidence_level: expected a number between 0 and 1, found {self.confidence_level!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise ValueError(f"seed: expected an integer >= 0, found {self.seed!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks


def as_scores(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return `values` as a 1-D float64 array of finite numbers. Otherwise raise a ValueError naming `name` and the
    first bad index.

    evaluate hands a `None` in a float feature back as NaN, so a check for None alone would miss it. NaN and
    infinity are rejected here whatever their source.

    >>> as_scores("chosen_logps", [-1.5, -2])
    array([-1.5, -2. ])
    >>> as_scores("chosen_logps", [-1.5, None])
    Traceback (most recent call last):
    ...
    ValueError: chosen_logps[1]: expected a finite number, found nan (None or NaN); 1 such value(s) in all
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a list of numbers, found values that are not numbers ({err})") from None
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a flat list of numbers, found an array of shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: ranking accuracy needs at least one example")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        found = "nan (None or NaN)" if np.isnan(array[bad[0]]) else str(array[bad[0]])
        raise ValueError(f"{name}[{bad[0]}]: expected a finite number, found {found}; {bad.size} such value(s) in all")
    return array


def as_token_counts(name: str, values: Sequence[int] | np.ndarray) -> np.ndarray:
    """Return `values` as float64 token counts. Each must be a whole number >= 1.

    >>> as_token_counts("chosen_num_tokens", [3, 0])
    Traceback (most recent call last):
    ...
    ValueError: chosen_num_tokens[1]: expected a whole number of tokens >= 1, found 0.0
    """
    counts = as_scores(name, values)
    bad = np.flatnonzero((counts < 1) | (counts != np.floor(counts)))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}]: expected a whole number of tokens >= 1, found {counts[bad[0]]}")
    return counts


def as_probabilities(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return `values` as float64 shares in [0, 1].

    >>> as_probabilities("preference_probs", [0.75, 1.5])
    Traceback (most recent call last):
    ...
    ValueError: preference_probs[1]: expected a share of raters in [0, 1], found 1.5
    """
    shares = as_scores(name, values)
    bad = np.flatnonzero((shares < 0) | (shares > 1))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}]: expected a share of raters in [0, 1], found {shares[bad[0]]}")
    return shares


def as_score_lists(name: str, rows: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a list of score lists into `(values [total], offsets [n + 1])`. Row `i` is
    `values[offsets[i]:offsets[i + 1]]`. Every value is checked as in `as_scores`.

    >>> as_score_lists("logps", [[-1.0, -2.0], [-3.0, -4.0, -5.0]])
    (array([-1., -2., -3., -4., -5.]), array([0, 2, 5]))
    >>> as_score_lists("logps", [[-1.0, -2.0], [-3.0, None]])
    Traceback (most recent call last):
    ...
    ValueError: logps[1][1]: expected a finite number, found nan (None or NaN)
    """
    if len(rows) == 0:
        raise ValueError(f"{name} is empty: ranking accuracy needs at least one example")
    try:
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))  # [n]
    except TypeError:
        index = next(i for i, row in enumerate(rows) if not hasattr(row, "__len__"))
        raise ValueError(f"{name}[{index}]: expected a list of numbers, found {rows[index]!r}") from None
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # [n + 1]
    try:
        values = np.asarray(list(chain.from_iterable(rows)), dtype=np.float64)  # [total]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected lists of numbers, found values that are not numbers ({err})") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        found = "nan (None or NaN)" if np.isnan(values[bad[0]]) else str(values[bad[0]])
        raise ValueError(f"{name}[{row}][{bad[0] - offsets[row]}]: expected a finite number, found {found}")
    return values, offsets


def check_same_length(arrays: dict[str, Sequence | np.ndarray]) -> int:
    """Return the common length of the named inputs. Raise a ValueError listing every length if they differ.

    >>> check_same_length({"chosen_logps": [1.0, 2.0], "rejected_logps": [1.0]})
    Traceback (most recent call last):
    ...
    ValueError: inputs differ in length: chosen_logps has 2 values, rejected_logps has 1 values
    """
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"{name} has {length} values" for name, length in lengths.items())
        raise ValueError(f"inputs differ in length: {found}")
    return next(iter(lengths.values()))


# ----------------------------------------------------------------------------------------------------------------------
# Scoring rules


def directed_correct(
    diff: np.ndarray,
    human_tie: np.ndarray | bool = False,
    *,
    tie_margin: float = 0.0,
    human_tie_epsilon: float = HUMAN_TIE_EPSILON,
    strict: bool = False,
) -> np.ndarray:
    """Flag which pairs are ranked correctly, from `diff` = score(preferred) - score(other).

    Where the raters prefer one response, a pair is correct when `diff >= -tie_margin`: model ties count as
    correct, as in Def. 2.3. With `strict=True` a pair is correct only when `diff > 0` (the idealized rule of
    Cor. 3.3, and DPO reward accuracy). Where the raters tie (`human_tie`, α = 0.5), a pair is correct when
    `|diff| < human_tie_epsilon` (Def. C.1).

    >>> directed_correct(np.array([1.0, 0.0, -0.5, 0.005]), np.array([False, False, False, True]))
    array([ True,  True, False,  True])
    >>> directed_correct(np.array([1.0, 0.0, -0.5]), strict=True)
    array([ True, False, False])
    """
    decided = diff > 0 if strict else diff >= -tie_margin
    return np.where(human_tie, np.abs(diff) < human_tie_epsilon, decided)


def rank_descending(values: np.ndarray) -> np.ndarray:
    """Rank each row from best (1) to worst; equal values share the best rank of their group ("1 1 3").

    This equals `n + 1 - scipy.stats.rankdata(row, method="max")`, the convention of the paper's code for model
    and human rankings alike (docs/scores.md §4.7): rank = 1 + the number of strictly larger values in the row.

    >>> rank_descending(np.array([[3.0, 1.0, 2.0], [5.0, 5.0, 1.0]]))
    array([[1, 3, 2],
           [1, 1, 3]])
    """
    return 1 + (values[:, None, :] > values[:, :, None]).sum(axis=2)  # [m, L]: 1 + #{j: x_j > x_i}


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_means(flags: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Column means of `n_resamples` bootstrap resamples of the rows of a boolean matrix: [n, k] -> [n_resamples, k].

    Resampling n rows with replacement only changes how many times each distinct row of flags is drawn, and
    those counts follow Multinomial(n, share of each distinct row). Drawing the counts directly gives exactly the
    bootstrap distribution of index resampling. It costs O(n_resamples * distinct rows) instead of
    O(n_resamples * n), and does not depend on row order, so the result is the same however the rows are split
    into batches or processes. Columns are resampled together, which keeps differences between them (for
    example the alignment gap) paired.

    >>> flags = np.array([[True], [False], [True], [True]])
    >>> samples = bootstrap_means(flags, n_resamples=5, seed=0)
    >>> samples.shape, bool(np.isin(samples, [0, 0.25, 0.5, 0.75, 1]).all())
    ((5, 1), True)
    """
    n = flags.shape[0]
    packed = np.packbits(flags, axis=1)  # [n, ceil(k / 8)] uint8
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()  # [n] one key per row
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)  # [P], [P]
    patterns = flags[first].astype(np.float64)  # [P, k] the distinct rows
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_resamples)  # [R, P]
    return draws @ patterns / n  # [R, k]


def percentile_interval(samples: np.ndarray, confidence_level: float) -> list:
    """Percentile interval over the first axis: [R, ...] -> nested list [..., 2] of [low, high].

    >>> percentile_interval(np.arange(101.0), 0.5)
    [25.0, 75.0]
    """
    tail = (1 - confidence_level) / 2
    bounds = np.quantile(samples, [tail, 1 - tail], axis=0)  # [2, ...]
    return np.moveaxis(bounds, 0, -1).tolist()


def _with_intervals(flags: np.ndarray, options: RankingOptions) -> tuple[list, list, np.ndarray]:
    """Accuracies [k], their intervals [k, 2] and bootstrap samples [R, k] of the boolean columns of flags [n, k]."""
    samples = bootstrap_means(flags, options.n_resamples, options.seed)
    return flags.mean(axis=0).tolist(), percentile_interval(samples, options.confidence_level), samples


# ----------------------------------------------------------------------------------------------------------------------
# Accuracies


def ranking_accuracy(
    chosen_logps: Sequence[float] | np.ndarray,
    rejected_logps: Sequence[float] | np.ndarray,
    chosen_num_tokens: Sequence[int] | np.ndarray | None = None,
    rejected_num_tokens: Sequence[int] | np.ndarray | None = None,
    options: RankingOptions = RankingOptions(),
) -> dict:
    """Share of pairs whose `chosen` response the model finds at least as likely as the `rejected` one (Def. 2.3).

    Args:
        chosen_logps, rejected_logps: per-sequence log-probs, i.e. the sum over completion tokens.
        chosen_num_tokens, rejected_num_tokens: completion lengths. Pass both to also get the length-normalized
            accuracy (Eq. 15), which compares mean log-probs per token.
        options: `tie_margin`, the bootstrap settings and `return_per_example` apply here.

    Returns:
        `ranking_accuracy`, `ranking_accuracy_ci` ([low, high]), `num_pairs` and `num_ties` (pairs within
        `tie_margin`, all of them counted correct). With token counts it also returns
        `length_normalized_ranking_accuracy`, `length_normalized_ranking_accuracy_ci` and
        `length_normalized_num_ties`. With `return_per_example` it adds the per-pair lists `correct` and `tie`,
        plus `length_normalized_correct` and `length_normalized_tie` when token counts are given.

    >>> result = ranking_accuracy([-10.0, -12.0, -9.0, -20.0], [-11.0, -12.0, -8.0, -25.0],
    ...                           chosen_num_tokens=[5, 4, 3, 10], rejected_num_tokens=[11, 4, 2, 20])
    >>> result["ranking_accuracy"], result["num_ties"], result["length_normalized_ranking_accuracy"]
    (0.75, 1, 0.5)
    """
    if (chosen_num_tokens is None) != (rejected_num_tokens is None):
        raise ValueError(
            "chosen_num_tokens and rejected_num_tokens: pass both for a length-normalized accuracy, or neither"
        )
    chosen = as_scores("chosen_logps", chosen_logps)
    rejected = as_scores("rejected_logps", rejected_logps)
    inputs = {"chosen_logps": chosen, "rejected_logps": rejected}
    if chosen_num_tokens is not None:
        inputs["chosen_num_tokens"] = as_token_counts("chosen_num_tokens", chosen_num_tokens)
        inputs["rejected_num_tokens"] = as_token_counts("rejected_num_tokens", rejected_num_tokens)
    num_pairs = check_same_length(inputs)
    diffs = {"": chosen - rejected}  # [n] chosen minus rejected, per output-name prefix
    if chosen_num_tokens is not None:  # [n] mean log-prob per token
        diffs["length_normalized_"] = chosen / inputs["chosen_num_tokens"] - rejected / inputs["rejected_num_tokens"]

    correct = np.stack([directed_correct(d, tie_margin=options.tie_margin) for d in diffs.values()], axis=1)  # [n, k]
    ties = np.stack([np.abs(d) <= options.tie_margin for d in diffs.values()], axis=1)  # [n, k]
    accuracies, intervals, _ = _with_intervals(correct, options)
    result: dict = {}
    for column, prefix in enumerate(diffs):
        result[f"{prefix}ranking_accuracy"] = accuracies[column]
        result[f"{prefix}ranking_accuracy_ci"] = intervals[column]
        result[f"{prefix}num_ties"] = int(ties[:, column].sum())
    result["num_pairs"] = num_pairs
    if options.return_per_example:
        for column, prefix in enumerate(diffs):
            result[f"{prefix}correct"] = correct[:, column].tolist()
            result[f"{prefix}tie"] = ties[:, column].tolist()
    return result


def idealized_ranking_accuracy(
    chosen_logps: Sequence[float] | np.ndarray,
    rejected_logps: Sequence[float] | np.ndarray,
    ref_chosen_logps: Sequence[float] | np.ndarray,
    ref_rejected_logps: Sequence[float] | np.ndarray,
    preference_probs: Sequence[float] | np.ndarray,
    options: RankingOptions = RankingOptions(),
) -> dict:
    """Compare the observed ranking accuracy of a tuned policy with the idealized accuracy of a perfect DPO optimum.

    `preference_probs` is α, the share of raters who prefer `chosen`. The raters' preference sets the direction:
    when α < 0.5 they prefer `rejected`, so a pair is correct when the model favours `rejected`. α = 0.5 is a human
    tie, correct when the two log-probs differ by less than `human_tie_epsilon` (Def. C.1, compared in
    log-probs). With yw the response the raters prefer, yl the other, and α' = max(α, 1 - α) capped at
    1 - ε (ε = 0.001, so α = 0 or 1 counts as ε or 1 - ε, as in the paper's code):

    - observed: `log π(yw) - log π(yl) >= -tie_margin` (Def. 2.3).
    - idealized, per β: `log πref(yw) - log πref(yl) + (1/β) log(α'/(1 - α')) > 0` (Cor. 3.3, strict).
    - reward accuracy, per β: the DPO implicit reward `β (log π - log πref)` is strictly higher for yw, as TRL's
      `rewards/accuracies` and reward-bench count it. β > 0 does not change its sign, so the values differ across
      β only on human ties, where `|reward gap| < human_tie_epsilon` decides.
    - flip difficulty (Thm. 4.1): `c = log πref(yl) - log πref(yw)`. Where the reference ranks a pair wrongly
      (c > tie_margin, human ties excluded), DPO must bring that pair's loss below `softplus(-β c)` to flip it.

    Returns:
        `ranking_accuracy` (+ `_ci`), `num_pairs`, `num_ties` (model ties within `tie_margin`), `num_human_ties`
        (α = 0.5), `beta` (list), `idealized_ranking_accuracy` (+ `_ci`; one per β), `idealized_ranking_accuracy_min`,
        `..._median` and `..._max` over β, `alignment_gap` (median idealized minus observed, + `_ci`),
        `reward_accuracy` (+ `_ci`; one per β), `num_reference_wrong`, and `flip_loss_threshold_mean`, `_q25`,
        `_median` and `_q75` (one per β over the wrongly ranked pairs; None if there are none).
        With `return_per_example` it adds `correct`, `tie`, `human_tie`, `idealized_correct` and `reward_correct`
        ([β][pair]), `reference_log_ratio` (c; human ties use yw = chosen) and `reference_wrong`.

    >>> result = idealized_ranking_accuracy(
    ...     chosen_logps=[-10.0, -5.0], rejected_logps=[-9.0, -6.0],
    ...     ref_chosen_logps=[-11.0, -5.0], ref_rejected_logps=[-9.0, -6.0],
    ...     preference_probs=[1.0, 0.75], options=RankingOptions(beta=[0.1, 10.0]))
    >>> result["ranking_accuracy"], result["idealized_ranking_accuracy"], result["alignment_gap"]
    (0.5, [1.0, 0.5], 0.25)
    """
    chosen = as_scores("chosen_logps", chosen_logps)
    rejected = as_scores("rejected_logps", rejected_logps)
    ref_chosen = as_scores("ref_chosen_logps", ref_chosen_logps)
    ref_rejected = as_scores("ref_rejected_logps", ref_rejected_logps)
    alpha = as_probabilities("preference_probs", preference_probs)
    num_pairs = check_same_length(
        {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": ref_chosen,
         "ref_rejected_logps": ref_rejected, "preference_probs": alpha}
    )
    betas = np.asarray(options.beta)[:, None]  # [B, 1]
    num_betas = betas.shape[0]

    human_tie = alpha == 0.5  # [n]
    sign = np.where(alpha >= 0.5, 1.0, -1.0)  # [n] +1 where raters prefer `chosen`: yw = chosen
    alpha_preferred = np.minimum(np.maximum(alpha, 1 - alpha), 1 - ALPHA_EPSILON)  # [n] α' in [0.5, 1 - ε]
    log_odds = np.log(alpha_preferred / (1 - alpha_preferred))  # [n] log(α'/(1-α')) >= 0
    policy_gap = sign * (chosen - rejected)  # [n] log π(yw) - log π(yl)
    reference_gap = sign * (ref_chosen - ref_rejected)  # [n] log πref(yw) - log πref(yl) = -c
    reward_gap = betas * sign * ((chosen - ref_chosen) - (rejected - ref_rejected))  # [B, n] r(yw) - r(yl)

    def judge(diff: np.ndarray, strict: bool = False) -> np.ndarray:
        return directed_correct(diff, human_tie, tie_margin=options.tie_margin,
                                human_tie_epsilon=options.human_tie_epsilon, strict=strict)

    observed = judge(policy_gap)  # [n]
    ties = np.abs(chosen - rejected) <= options.tie_margin  # [n] model ties, whatever the raters say
    idealized = judge(reference_gap + log_odds / betas, strict=True)  # [B, n]
    reward = judge(reward_gap, strict=True)  # [B, n]
    reference_wrong = ~human_tie & ~judge(reference_gap)  # [n] c > tie_margin
    thresholds = np.logaddexp(0.0, betas * reference_gap[reference_wrong])  # [B, w] softplus(-β c)

    flags = np.concatenate([observed[None], idealized, reward]).T  # [n, 1 + 2B]
    accuracies, intervals, samples = _with_intervals(flags, options)
    ideal, ideal_samples = np.asarray(accuracies[1 : 1 + num_betas]), samples[:, 1 : 1 + num_betas]
    gap_samples = np.median(ideal_samples, axis=1) - samples[:, 0]  # [R]
    quantiles = (
        np.quantile(thresholds, [0.25, 0.5, 0.75], axis=1).tolist()  # [3][B]
        if thresholds.size
        else [[None] * num_betas for _ in range(3)]
    )
    result = {
        "ranking_accuracy": accuracies[0],
        "ranking_accuracy_ci": intervals[0],
        "num_pairs": num_pairs,
        "num_ties": int(ties.sum()),
        "num_human_ties": int(human_tie.sum()),
        "beta": list(options.beta),
        "idealized_ranking_accuracy": ideal.tolist(),
        "idealized_ranking_accuracy_ci": intervals[1 : 1 + num_betas],
        "idealized_ranking_accuracy_min": float(ideal.min()),
        "idealized_ranking_accuracy_median": float(np.median(ideal)),
        "idealized_ranking_accuracy_max": float(ideal.max()),
        "alignment_gap": float(np.median(ideal)) - accuracies[0],
        "alignment_gap_ci": percentile_interval(gap_samples, options.confidence_level),
        "reward_accuracy": accuracies[1 + num_betas :],
        "reward_accuracy_ci": intervals[1 + num_betas :],
        "num_reference_wrong": int(reference_wrong.sum()),
        "flip_loss_threshold_mean": thresholds.mean(axis=1).tolist() if thresholds.size else [None] * num_betas,
        "flip_loss_threshold_q25": quantiles[0],
        "flip_loss_threshold_median": quantiles[1],
        "flip_loss_threshold_q75": quantiles[2],
    }
    if options.return_per_example:
        result |= {
            "correct": observed.tolist(),
            "tie": ties.tolist(),
            "human_tie": human_tie.tolist(),
            "idealized_correct": idealized.tolist(),
            "reward_correct": reward.tolist(),
            "reference_log_ratio": (-reference_gap).tolist(),
            "reference_wrong": reference_wrong.tolist(),
        }
    return result


def listwise_ranking_accuracy(
    logps: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    options: RankingOptions = RankingOptions(),
) -> dict:
    """Share of prompts whose responses the model ranks exactly as the human scores do (Def. A.8, n >= 2).

    Both rankings use the paper code's convention (see `rank_descending`): equal human scores share a rank. The
    model must then give those responses exactly equal log-probs, which almost never happens, so lists with
    human ties are nearly always wrong. This explains the 1–3% accuracies on UltraFeedback in the paper.
    `tie_margin` does not apply here. Lists may differ in length from prompt to prompt, but each list of `logps`
    must match its list of `scores` in length.

    Returns:
        `ranking_accuracy` (+ `_ci`), `num_lists` and `num_human_ties` (lists with at least two equal human
        scores). With `return_per_example` it adds the per-list lists `correct` and `human_tie`.

    >>> result = listwise_ranking_accuracy(
    ...     logps=[[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [-2.0, -1.0]],
    ...     scores=[[9.0, 5.0, 1.0], [9.0, 9.0, 1.0], [1.0, 2.0]])
    >>> result["ranking_accuracy"], result["num_human_ties"]
    (0.6666666666666666, 1)
    """
    model, offsets = as_score_lists("logps", logps)
    human, human_offsets = as_score_lists("scores", scores)
    num_lists = check_same_length({"logps": logps, "scores": scores})
    lengths = np.diff(offsets)  # [n]
    mismatch = np.flatnonzero(lengths != np.diff(human_offsets))
    if mismatch.size:
        row = mismatch[0]
        found = human_offsets[row + 1] - human_offsets[row]
        raise ValueError(f"row {row}: logps[{row}] has {lengths[row]} values but scores[{row}] has {found}")
    too_short = np.flatnonzero(lengths < 2)
    if too_short.size:
        raise ValueError(f"logps[{too_short[0]}]: expected at least 2 responses to rank, found {lengths[too_short[0]]}")

    correct = np.empty(num_lists, dtype=bool)  # [n]
    human_tie = np.empty(num_lists, dtype=bool)  # [n]
    for length in np.unique(lengths):  # rows of one length stack into a matrix
        rows = np.flatnonzero(lengths == length)  # [m]
        index = offsets[rows, None] + np.arange(length)  # [m, L] positions in the flat arrays
        human_ranks = rank_descending(human[index])  # [m, L]
        correct[rows] = (rank_descending(model[index]) == human_ranks).all(axis=1)
        human_tie[rows] = human_ranks.sum(axis=1) != length * (length + 1) // 2  # shared ranks lower the sum
    accuracies, intervals, _ = _with_intervals(correct[:, None], options)
    result = {
        "ranking_accuracy": accuracies[0],
        "ranking_accuracy_ci": intervals[0],
        "num_lists": num_lists,
        "num_human_ties": int(human_tie.sum()),
    }
    if options.return_per_example:
        result |= {"correct": correct.tolist(), "human_tie": human_tie.tolist()}
    return result
