"""The statistics behind ``hf-ches validate`` and the selection study, each against an independent computation:
the partial Spearman against the precision matrix of the ranks, the AUROC against counting every (positive,
negative) pair, the top-10% share and the bootstrap interval against hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hf_ches.displacement import auroc, bootstrap_interval, partial_spearman, ranks, spearman, top_share


def precision_partial(a, b, covariates) -> float:
    """Partial correlation of the ranks of ``a`` and ``b`` given the covariates' ranks, from the inverse of the
    rank correlation matrix: ``−P_ab / sqrt(P_aa P_bb)`` (no regression)."""
    corr = np.corrcoef(np.vstack([ranks(np.asarray(x, dtype=float)) for x in (a, b, *covariates)]))
    precision = np.linalg.inv(corr)
    return -precision[0, 1] / np.sqrt(precision[0, 0] * precision[1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_spearman_equals_the_precision_matrix_formula(seed):
    rng = np.random.default_rng(seed)
    n_c, n_r = rng.integers(5, 200, 60), rng.integers(5, 200, 60)  # token counts, with ties
    fall = 0.02 * n_c + rng.normal(0, 1, 60)
    score = fall + 0.5 * n_r + rng.normal(0, 1, 60)
    assert partial_spearman(score, fall, [n_c, n_r]) == pytest.approx(precision_partial(score, fall, [n_c, n_r]),
                                                                      abs=1e-12)
    assert partial_spearman(score, fall, []) == pytest.approx(spearman(score, fall), abs=1e-12)  # nothing to remove


def test_partial_spearman_is_nan_for_a_function_of_the_lengths():
    n_c, n_r = np.array([3, 9, 4, 12, 7, 5]), np.array([8, 2, 6, 6, 10, 3])
    fall = np.array([0.1, 0.5, -0.2, 0.9, 0.3, 0.0])
    assert np.isnan(partial_spearman(-n_c, fall, [n_c, n_r]))  # the -chosen_tokens baseline adds nothing
    assert not np.isnan(partial_spearman(n_r - n_c, fall, [n_c, n_r]))  # a difference of ranks is not a rank


def test_auroc_counts_every_pair():
    rng = np.random.default_rng(4)
    score = rng.integers(0, 6, 40).astype(float)  # many ties
    label = rng.random(40) < 0.4
    pairs = list(itertools.product(score[label], score[~label]))
    expected = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
    assert auroc(score, label) == pytest.approx(expected, abs=1e-12)
    assert auroc(-score, label) == pytest.approx(1 - expected, abs=1e-12)
    assert np.isnan(auroc(score, np.ones(40, dtype=bool)))


def test_top_share_by_hand():
    target = np.arange(20.0)  # the true top 10%: positions 18 and 19
    assert top_share(target, target) == 1.0
    assert top_share(-target, target) == 0.0
    score = np.zeros(20)
    score[[19, 3]] = 1.0  # one of two recovered
    assert top_share(score, target) == 0.5
    assert top_share(score, target, fraction=0.2) == 0.25  # top 4: {19, 3, 0, 1} against {16..19}


def test_bootstrap_interval_is_seeded_and_covers_the_statistic():
    x = np.random.default_rng(5).normal(1.0, 1.0, 80)
    low, high = bootstrap_interval(np.mean, x, n_resamples=400, seed=3)
    assert low < x.mean() < high
    assert [low, high] == bootstrap_interval(np.mean, x, n_resamples=400, seed=3)
    assert bootstrap_interval(spearman, np.ones(5), np.arange(5.0)) == [pytest.approx(np.nan, nan_ok=True)] * 2
