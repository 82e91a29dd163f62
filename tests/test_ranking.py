"""hf_ches.ranking: ranking accuracy math, with expected numbers worked out by hand."""

import math

import numpy as np
import pytest

from hf_ches.ranking import (
    RankingOptions,
    as_score_lists,
    as_scores,
    bootstrap_means,
    idealized_ranking_accuracy,
    listwise_ranking_accuracy,
    rank_descending,
    ranking_accuracy,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------------------
# Pairs


def test_ties_count_as_correct_and_tie_margin_widens_them():
    chosen = [-1.0, -2.0, -3.0, -4.0]
    rejected = [-2.0, -2.0, -2.5, -4.2]  # chosen - rejected: 1, 0 (tie), -0.5 (wrong), 0.2
    result = ranking_accuracy(chosen, rejected, options=RankingOptions(return_per_example=True))
    assert result["ranking_accuracy"] == 0.75
    assert (result["num_pairs"], result["num_ties"]) == (4, 1)
    assert result["correct"] == [True, True, False, True]
    assert result["tie"] == [False, True, False, False]

    within = ranking_accuracy(chosen, rejected, options=RankingOptions(tie_margin=0.5, return_per_example=True))
    assert within["ranking_accuracy"] == 1.0  # |-0.5| <= 0.5: a tie, so correct
    assert within["tie"] == [False, True, True, True]

    narrower = ranking_accuracy(chosen, rejected, options=RankingOptions(tie_margin=0.4))
    assert (narrower["ranking_accuracy"], narrower["num_ties"]) == (0.75, 2)


def test_length_normalized_compares_mean_logprob_per_token():
    result = ranking_accuracy(
        chosen_logps=[-10.0, -12.0, -9.0, -20.0],
        rejected_logps=[-11.0, -12.0, -8.0, -25.0],
        chosen_num_tokens=[5, 4, 3, 10],  # means: -2, -3, -3, -2
        rejected_num_tokens=[11, 4, 2, 20],  # means: -1, -3, -4, -1.25
        options=RankingOptions(return_per_example=True),
    )
    assert result["ranking_accuracy"] == 0.75  # sums: 1, 0, -1, 5
    assert result["length_normalized_ranking_accuracy"] == 0.5  # means: -1, 0, 1, -0.75
    assert result["length_normalized_correct"] == [False, True, True, False]
    assert result["length_normalized_num_ties"] == 1
    low, high = result["length_normalized_ranking_accuracy_ci"]
    assert 0 <= low <= 0.5 <= high <= 1


def test_confidence_interval_is_seeded_and_brackets_the_accuracy():
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(size=(2, 200))
    first = ranking_accuracy(chosen, rejected, options=RankingOptions(seed=3))
    again = ranking_accuracy(chosen, rejected, options=RankingOptions(seed=3))
    other = ranking_accuracy(chosen, rejected, options=RankingOptions(seed=4))
    assert first == again
    assert first["ranking_accuracy_ci"] != other["ranking_accuracy_ci"]
    low, high = first["ranking_accuracy_ci"]
    assert low < first["ranking_accuracy"] < high
    # The normal approximation of a proportion's 95% interval is ±1.96·sqrt(p(1-p)/n) ≈ ±0.069 here.
    assert 0.1 < high - low < 0.18


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([-1.0, -2.0, None], r"chosen_logps\[2\]: expected a finite number, found nan \(None or NaN\)"),
        ([-1.0, float("nan"), -3.0], r"chosen_logps\[1\]: expected a finite number, found nan"),
        ([float("-inf"), -2.0, -3.0], r"chosen_logps\[0\]: expected a finite number, found -inf"),
        (["a", -2.0, -3.0], r"chosen_logps: expected a list of numbers"),
        ([[-1.0], [-2.0], [-3.0]], r"chosen_logps: expected a flat list of numbers, found an array of shape \(3, 1\)"),
    ],
)
def test_bad_values_name_the_input_and_index(values, message):
    with pytest.raises(ValueError, match=message):
        ranking_accuracy(values, [-1.0, -1.0, -1.0])


def test_length_mismatch_and_empty_input_raise():
    with pytest.raises(ValueError, match="inputs differ in length: chosen_logps has 2 values, rejected_logps has 3"):
        ranking_accuracy([-1.0, -2.0], [-1.0, -2.0, -3.0])
    with pytest.raises(ValueError, match="chosen_logps is empty"):
        ranking_accuracy([], [])
    with pytest.raises(ValueError, match="rejected_num_tokens has 1 values"):
        ranking_accuracy([-1.0, -2.0], [-1.0, -2.0], [1, 2], [1])


@pytest.mark.parametrize(
    ("chosen_tokens", "rejected_tokens", "message"),
    [
        ([3, 0], [1, 1], r"chosen_num_tokens\[1\]: expected a whole number of tokens >= 1, found 0.0"),
        ([3, 2], [1.5, 1], r"rejected_num_tokens\[0\]: expected a whole number of tokens >= 1, found 1.5"),
        ([3, None], [1, 1], r"chosen_num_tokens\[1\]: expected a finite number, found nan"),
        ([3, 2], None, "pass both"),
    ],
)
def test_bad_token_counts_raise(chosen_tokens, rejected_tokens, message):
    with pytest.raises(ValueError, match=message):
        ranking_accuracy([-1.0, -2.0], [-1.0, -2.0], chosen_tokens, rejected_tokens)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": 0}, "beta: expected a number > 0"),
        ({"beta": []}, "beta: expected a number > 0"),
        ({"beta": [1.0, float("inf")]}, "beta: expected a number > 0"),
        ({"tie_margin": float("nan")}, "tie_margin: expected a finite number >= 0"),
        ({"human_tie_epsilon": -0.1}, "human_tie_epsilon: expected a finite number >= 0"),
        ({"n_resamples": 0}, "n_resamples: expected an integer >= 1"),
        ({"confidence_level": 1.0}, "confidence_level: expected a number between 0 and 1"),
        ({"seed": -1}, "seed: expected an integer >= 0"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        RankingOptions(**options)


# ---------------------------------------------------------------------------------------------------------------------
# Idealized ranking accuracy, reward accuracy, flip difficulty
#
# Four pairs, β in {1, 10}. log(999) = 6.9068 is the log-odds of α = 0 or 1 after clipping to 0.001 / 0.999.
#   A: α = 1. Policy gap +2 (correct). Reference gap -6.9: idealized at β=1 (-6.9 + 6.9068 > 0), not at β=10.
#      Reward gap (−10+16.9) − (−12+10) = 8.9 > 0. The reference ranks it wrongly (c = 6.9).
#   B: α = 0, the mirror of A with chosen and rejected swapped: the raters prefer `rejected`.
#   C: α = 0.5, a human tie. |policy gap| = 0.005 < 0.01: correct. |reference gap| = 0.002: idealized correct.
#      |reward gap| = β·0.003: below 0.01 at β=1, not at β=10. Ties never count as reference-wrong.
#   D: α = 0.25, prefers `rejected` with log-odds log 3 = 1.0986. Policy gap −1 (wrong). Reference gap −0.5:
#      idealized at β=1 (−0.5 + 1.0986 > 0), not at β=10. Reward gap −(1 − 0.5) < 0. Reference-wrong (c = 0.5).
IDEALIZED = {
    "chosen_logps": [-10.0, -12.0, -5.0, -3.0],
    "rejected_logps": [-12.0, -10.0, -5.005, -4.0],
    "ref_chosen_logps": [-16.9, -10.0, -7.0, -4.0],
    "ref_rejected_logps": [-10.0, -16.9, -7.002, -4.5],
    "preference_probs": [1.0, 0.0, 0.5, 0.25],
}


def test_idealized_by_hand():
    result = idealized_ranking_accuracy(**IDEALIZED, options=RankingOptions(beta=[1.0, 10.0], return_per_example=True))
    assert result["correct"] == [True, True, True, False]
    assert result["ranking_accuracy"] == 0.75
    assert (result["num_pairs"], result["num_ties"], result["num_human_ties"]) == (4, 0, 1)
    assert result["beta"] == [1.0, 10.0]
    assert result["idealized_correct"] == [[True, True, True, True], [False, False, True, False]]
    assert result["idealized_ranking_accuracy"] == [1.0, 0.25]
    assert result["idealized_ranking_accuracy_min"] == 0.25
    assert result["idealized_ranking_accuracy_median"] == 0.625
    assert result["idealized_ranking_accuracy_max"] == 1.0
    assert result["alignment_gap"] == pytest.approx(0.625 - 0.75)
    assert result["reward_correct"] == [[True, True, True, False], [True, True, False, False]]
    assert result["reward_accuracy"] == [0.75, 0.5]
    assert result["human_tie"] == [False, False, True, False]
    assert result["reference_wrong"] == [True, True, False, True]
    assert result["num_reference_wrong"] == 3
    assert result["reference_log_ratio"] == pytest.approx([6.9, 6.9, -0.002, 0.5])

    for index, beta in enumerate([1.0, 10.0]):
        thresholds = sorted([softplus(-beta * 6.9), softplus(-beta * 6.9), softplus(-beta * 0.5)])
        assert result["flip_loss_threshold_mean"][index] == pytest.approx(sum(thresholds) / 3)
        assert result["flip_loss_threshold_median"][index] == pytest.approx(thresholds[1])
        assert result["flip_loss_threshold_q25"][index] == pytest.approx(thresholds[0])  # between two equal values
        assert result["flip_loss_threshold_q75"][index] == pytest.approx((thresholds[1] + thresholds[2]) / 2)


def test_alpha_zero_and_one_are_clipped_not_infinite():
    # Reference gap −6.91 is just past log(999) = 6.9068: wrong at β = 1. An unclipped α = 1 would make it right.
    policy = {"chosen_logps": [-1.0], "rejected_logps": [-1.0]}
    for alpha, ref_chosen, ref_rejected in [(1.0, -16.91, -10.0), (0.0, -10.0, -16.91)]:
        result = idealized_ranking_accuracy(
            **policy, ref_chosen_logps=[ref_chosen], ref_rejected_logps=[ref_rejected], preference_probs=[alpha],
            options=RankingOptions(beta=1.0),
        )
        assert result["idealized_ranking_accuracy"] == [0.0]
        assert result["beta"] == [1.0]


def test_human_tie_uses_epsilon_on_logprobs():
    pairs = {
        "chosen_logps": [-5.0, -5.0, -5.0],
        "rejected_logps": [-5.009, -5.011, -4.995],  # |gaps|: 0.009 (tie kept), 0.011 (not), 0.005 (tie kept)
        "ref_chosen_logps": [-1.0, -1.0, -1.0],
        "ref_rejected_logps": [-1.0, -1.0, -1.0],
        "preference_probs": [0.5, 0.5, 0.5],
    }
    result = idealized_ranking_accuracy(**pairs, options=RankingOptions(return_per_example=True))
    assert result["correct"] == [True, False, True]
    assert result["num_reference_wrong"] == 0
    assert result["flip_loss_threshold_median"] == [None] * 5  # nothing to flip: no NaN
    wider = idealized_ranking_accuracy(**pairs, options=RankingOptions(human_tie_epsilon=0.02))
    assert wider["ranking_accuracy"] == 1.0


def test_idealized_defaults_to_the_paper_beta_grid_and_checks_alpha():
    result = idealized_ranking_accuracy(**IDEALIZED)
    assert result["beta"] == [0.01, 0.1, 1.0, 5.0, 10.0]
    assert len(result["idealized_ranking_accuracy_ci"]) == len(result["reward_accuracy"]) == 5
    with pytest.raises(ValueError, match=r"preference_probs\[3\]: expected a share of raters in \[0, 1\], found 1.25"):
        idealized_ranking_accuracy(**(IDEALIZED | {"preference_probs": [1.0, 0.0, 0.5, 1.25]}))
    with pytest.raises(ValueError, match=r"ref_rejected_logps\[0\]: expected a finite number, found nan"):
        idealized_ranking_accuracy(**(IDEALIZED | {"ref_rejected_logps": [None, -1.0, -1.0, -1.0]}))
    with pytest.raises(ValueError, match="preference_probs has 3 values"):
        idealized_ranking_accuracy(**(IDEALIZED | {"preference_probs": [1.0, 0.0, 0.5]}))


def test_alignment_gap_interval_is_paired():
    # Identical observed and idealized flags: every resample gives gap 0, so the interval collapses to [0, 0].
    n = 40
    result = idealized_ranking_accuracy(
        chosen_logps=np.r_[np.zeros(n // 2), -np.ones(n // 2)],
        rejected_logps=np.full(n, -0.5),
        ref_chosen_logps=np.r_[np.zeros(n // 2), -np.ones(n // 2)],
        ref_rejected_logps=np.full(n, -0.5),
        preference_probs=np.full(n, 0.5 + 1e-12),  # barely above a tie: log-odds ≈ 0
        options=RankingOptions(beta=1.0),
    )
    assert result["alignment_gap"] == 0.0
    assert result["alignment_gap_ci"] == [0.0, 0.0]
    assert result["ranking_accuracy_ci"][0] < 0.5 < result["ranking_accuracy_ci"][1]


# ---------------------------------------------------------------------------------------------------------------------
# Listwise


def test_rank_descending_matches_the_rankdata_max_convention():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 3, size=(50, 4)).astype(float)  # plenty of ties
    # n + 1 - rankdata(row, method="max"), where rankdata "max" = the number of values <= this one.
    expected = [[len(row) + 1 - sum(other <= value for other in row) for value in row] for row in values]
    assert rank_descending(values).tolist() == expected


def test_listwise_exact_match_with_human_ties():
    result = listwise_ranking_accuracy(
        logps=[[-1.0, -2.0, -3.0], [-1.0, -1.0, -3.0], [-1.0, -2.0, -3.0], [-2.0, -1.0], [-3.0, -1.0, -2.0, -4.0]],
        scores=[[3.0, 2.0, 1.0], [5.0, 5.0, 1.0], [5.0, 5.0, 1.0], [0.0, 1.0], [1.0, 4.0, 3.0, 2.0]],
        options=RankingOptions(return_per_example=True),
    )
    # 1: same order. 2: human tie matched by an exact model tie. 3: human tie the model breaks. 4: same order.
    # 5: human ranks (4, 1, 2, 3), model ranks (3, 1, 2, 4): not an exact match.
    assert result["correct"] == [True, True, False, True, False]
    assert result["human_tie"] == [False, True, True, False, False]
    assert (result["ranking_accuracy"], result["num_lists"], result["num_human_ties"]) == (0.6, 5, 2)


@pytest.mark.parametrize(
    ("logps", "scores", "message"),
    [
        ([[-1.0, -2.0], [-1.0, -2.0]], [[1.0, 2.0], [1.0, 2.0, 3.0]], r"row 1: logps\[1\] has 2 values but scores"),
        ([[-1.0, -2.0], [-1.0]], [[1.0, 2.0], [1.0]], r"logps\[1\]: expected at least 2 responses to rank, found 1"),
        ([[-1.0, -2.0], [-1.0, None]], [[1.0, 2.0], [1.0, 2.0]], r"logps\[1\]\[1\]: expected a finite number"),
        ([[-1.0, -2.0], [-1.0, -2.0]], [[1.0, 2.0], [float("nan"), 2.0]], r"scores\[1\]\[0\]: expected a finite"),
        ([[-1.0, -2.0], -1.0], [[1.0, 2.0], [1.0, 2.0]], r"logps\[1\]: expected a list of numbers, found -1.0"),
        ([[-1.0, -2.0]], [[1.0, 2.0], [1.0, 2.0]], "logps has 1 values, scores has 2"),
        ([], [], "logps is empty"),
    ],
)
def test_listwise_bad_inputs_raise(logps, scores, message):
    with pytest.raises(ValueError, match=message):
        listwise_ranking_accuracy(logps, scores)


def test_as_score_lists_offsets():
    values, offsets = as_score_lists("logps", [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0]])
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert offsets.tolist() == [0, 1, 3, 6]


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_matches_index_resampling_moments():
    # Index resampling of n rows gives column means with mean p and covariance (p_ij - p_i p_j) / n.
    flags = np.array([[True, True]] * 12 + [[True, False]] * 6 + [[False, True]] * 3 + [[False, False]] * 9)  # [30, 2]
    samples = bootstrap_means(flags, n_resamples=40_000, seed=0)  # [R, 2]
    p = flags.mean(axis=0)  # [0.6, 0.5]
    p_both = (flags[:, 0] & flags[:, 1]).mean()  # 0.4
    assert samples.mean(axis=0) == pytest.approx(p, abs=0.002)
    expected_cov = np.array([[p[0] * (1 - p[0]), p_both - p[0] * p[1]], [p_both - p[0] * p[1], p[1] * (1 - p[1])]]) / 30
    assert np.cov(samples.T) == pytest.approx(expected_cov, rel=0.05)


def test_bootstrap_ignores_row_order_and_degenerate_columns():
    rng = np.random.default_rng(0)
    flags = rng.random((500, 3)) < [0.2, 0.5, 1.0]
    shuffled = flags[rng.permutation(500)]
    assert np.array_equal(bootstrap_means(flags, 200, seed=7), bootstrap_means(shuffled, 200, seed=7))
    assert np.all(bootstrap_means(flags, 200, seed=7)[:, 2] == 1.0)  # all correct: no spread


def test_per_example_counts_match_inputs():
    n = 257
    rng = np.random.default_rng(0)
    result = ranking_accuracy(*rng.normal(size=(2, n)), options=RankingOptions(return_per_example=True))
    assert len(result["correct"]) == len(result["tie"]) == result["num_pairs"] == n
    assert as_scores("x", np.arange(3)).dtype == np.float64
