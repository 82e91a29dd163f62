"""The math of likelihood-displacement checks: one DPO step, rank correlation with a bootstrap interval, and the
paper's percentile subsets. Pure: tensors, arrays or floats in and out; no model and no I/O.

One DPO step on a single pair, with the model itself as the reference (so the margin starts at 0), is what
:mod:`hf_ches.validate` measures for every pair:

* the loss is TRL's sigmoid DPO loss ``ℓ = −log σ(β [(log π(y+) − log π_ref(y+)) − (log π(y−) − log π_ref(y−))])``
  (:func:`dpo_sigmoid_loss`), whose gradient at margin 0 is ``−(β/2) (∇ log π(y+) − ∇ log π(y−))``;
* the update is plain SGD ``θ −= η ∇ℓ`` or the sign step ``θ −= η sign(∇ℓ)`` (Adam's first steps)
  (:func:`apply_step`);
* the measured effect is ``Δ log π(y+) = log π_after(y+) − log π_before(y+)``; ``Δ < 0`` is displacement.

A score predicts displacement when it ranks the pairs as ``−Δ`` does: :func:`spearman`, and beyond the
completions' lengths (a summed change grows with the token count): :func:`partial_spearman`; :func:`top_share`
(how much of the true top 10% a top-10% cut recovers) and :func:`auroc` (for "log π(y+) fell") measure a cut;
:func:`bootstrap_interval` gives each a percentile-bootstrap interval. :func:`render_table` and :func:`best_line`
write the results of ``hf-ches validate`` for the terminal and for the dataset card.

>>> import torch
>>> w = torch.tensor([0.5, -1.0], requires_grad=True)
>>> chosen, rejected = w @ torch.tensor([1.0, 2.0]), w @ torch.tensor([1.0, 1.0])      # toy "log-probs"
>>> loss = dpo_sigmoid_loss(chosen - chosen.detach(), rejected - rejected.detach(), beta=0.2)
>>> round(loss.item(), 4)                                     # log 2 at margin 0
0.6931
>>> grad, = torch.autograd.grad(loss, [w])
>>> [round(v, 4) for v in grad.tolist()]                     # −(β/2) (g+ − g−) = −0.1 · [0, 1]
[0.0, -0.1]
>>> apply_step([w], [grad], learning_rate=1.0, optimizer="sgd")
>>> [round(v, 4) for v in w.tolist()]
[0.5, -0.9]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

OPTIMIZERS = ("sgd", "sign")


def dpo_sigmoid_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's ``sigmoid`` DPO loss (no label smoothing): ``−log σ(β (chosen_logratio − rejected_logratio))``.

    The log-ratios are ``log π(y) − log π_ref(y)`` of the summed completion log-probs (any shape, same for both).

    >>> round(dpo_sigmoid_loss(torch.tensor(2.0), torch.tensor(-1.0), beta=0.5).item(), 4)   # −log σ(1.5)
    0.2014
    """
    return -torch.nn.functional.logsigmoid(beta * (chosen_logratio - rejected_logratio))


@torch.no_grad()
def apply_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], learning_rate: float, optimizer: str
) -> None:
    """One in-place step on ``params``: ``θ −= η g`` (``"sgd"``) or ``θ −= η sign(g)`` (``"sign"``).

    >>> p = torch.tensor([1.0, 1.0, 1.0])
    >>> apply_step([p], [torch.tensor([0.3, -2.0, 0.0])], learning_rate=0.5, optimizer="sign")
    >>> p.tolist()
    [0.5, 1.5, 1.0]
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    for p, g in zip(params, grads, strict=True):
        p.sub_(g.sign() if optimizer == "sign" else g, alpha=learning_rate)


def ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks of ``x`` ``[n]``, ties given their average rank.

    >>> ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist()
    [2.5, 0.0, 2.5, 1.0]
    """
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, tie, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=r) / count)[tie]  # average rank within each group of equal values


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, ties given their average rank (NaN if one is constant).

    >>> round(spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 20.0, 40.0])), 4)
    0.9487
    """
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def partial_spearman(a: np.ndarray, b: np.ndarray, covariates: Sequence[np.ndarray]) -> float:
    """Spearman's correlation of ``a`` and ``b`` given ``covariates`` (e.g. both completions' token counts).

    Rank-based: the ranks of ``a`` and of ``b`` are each residualized on the ranks of every covariate (least squares
    with an intercept), then Pearson's correlation of the residuals. It asks whether ``a`` ranks ``b`` beyond what
    the covariates already rank; NaN if a residual is constant (e.g. ``a`` is a function of the covariates' ranks).

    >>> n_c = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    >>> fall = n_c + np.array([0.5, -0.5, 0.2, -0.2, 0.1, -0.1])          # length plus a part length does not explain
    >>> round(spearman(n_c, fall), 2), partial_spearman(n_c, fall, [n_c])   # length ranks it, but adds nothing
    (0.99, nan)
    """
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    design = np.column_stack([np.ones(len(ra))] + [ranks(np.asarray(c, dtype=np.float64)) for c in covariates])
    residuals = []
    for r in (ra, rb):
        coef, *_ = np.linalg.lstsq(design, r, rcond=None)
        residual = r - design @ coef
        if np.abs(residual).max(initial=0.0) <= 1e-9 * max(1.0, len(r)):  # rounding noise of an exact fit
            return float("nan")
        residuals.append(residual)
    return float(np.corrcoef(*residuals)[0, 1])


def top_share(score: np.ndarray, target: np.ndarray, fraction: float = 0.1) -> float:
    """The share of the ``k = max(1, round(fraction n))`` largest ``target`` values that are also among the ``k``
    highest ``score`` values (ties broken by position): how much of the true top a top-``fraction`` cut recovers.

    >>> top_share(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), np.array([1.0, 9.0, 8.0, 0.0, 0.0]), fraction=0.4)
    0.5
    """
    score, target = np.asarray(score, dtype=np.float64), np.asarray(target, dtype=np.float64)
    k = max(1, int(round(fraction * len(score))))
    top = np.argsort(-score, kind="stable")[:k]
    true = np.argsort(-target, kind="stable")[:k]
    return len(np.intersect1d(top, true)) / k


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``label``: the chance that a random positive scores
    above a random negative, ties counting one half (Mann-Whitney); NaN without both classes.

    >>> auroc(np.array([0.9, 0.8, 0.3, 0.3, 0.1]), np.array([True, False, True, False, False]))
    0.75
    """
    score, label = np.asarray(score, dtype=np.float64), np.asarray(label, dtype=bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = (ranks(score) + 1)[label].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_interval(
    statistic: Callable[..., float], *arrays: np.ndarray, n_resamples: int = 1000, confidence_level: float = 0.95,
    seed: int = 0,
) -> list[float]:
    """Percentile-bootstrap interval ``[low, high]`` of ``statistic(*arrays)`` over rows resampled with replacement
    (the same rows of every array). Seeded, so the same inputs give the same interval; resamples whose statistic is
    NaN (e.g. one side constant) are skipped.

    >>> x = np.arange(50.0)
    >>> low, high = bootstrap_interval(spearman, x, x + np.random.default_rng(1).normal(0, 10, 50), n_resamples=200)
    >>> 0.4 < low < high < 1.0
    True
    """
    arrays = tuple(np.asarray(a, dtype=np.float64) for a in arrays)
    n = len(arrays[0])
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # [R, n]
    values = np.array([statistic(*(a[idx] for a in arrays)) for idx in draws])  # [R]
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return [float("nan"), float("nan")]
    tail = (1 - confidence_level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return [float(low), float(high)]


def quantile_slice(order: np.ndarray, quantile: float, size: int) -> np.ndarray:
    """``size`` entries of ``order`` (indices sorted by score, ascending) centered at ``quantile``: the paper's rule.

    The window starts at ``max(0, round(q (N − 1)) − size // 2)`` and is shifted left if it runs past the end, so
    ``quantile=0`` gives the lowest ``size`` and ``quantile=1`` the highest.

    >>> order = np.arange(10)
    >>> [quantile_slice(order, q, 3).tolist() for q in (0.0, 0.5, 1.0)]
    [[0, 1, 2], [3, 4, 5], [7, 8, 9]]
    """
    n = len(order)
    if not 0 <= quantile <= 1 or not 1 <= size <= n:
        raise ValueError(f"quantile_slice: expected 0 <= quantile <= 1 and 1 <= size <= {n}, got {quantile}, {size}")
    start = min(max(0, round(quantile * (n - 1)) - size // 2), n - size)
    return order[start : start + size]


TOP_FRACTION = 0.1  # the share of pairs a top cut takes in the tables (top_share)


def render_table(results: dict[str, Any]) -> str:
    """A Markdown table of each candidate's ρ with −Δ log π(y+) (and, when measured, the partial ρ given both
    lengths, ρ with the per-token change and the top-10% share), the sign rules, and the share displaced.

    >>> print(render_table({"share_displaced": 0.25, "counts": {"num_scored": 4}, "sign_rules": {},
    ...                     "spearman": {"ches": {"rho": 0.5, "ci": [0.1, 0.8]}}}))
    | score | Spearman ρ with −Δ log π(chosen) | 95% interval |
    |---|---|---|
    | `ches` | 0.50 | [0.10, 0.80] |
    <BLANKLINE>
    4 pairs; 25% displaced (Δ log π(chosen) < 0).
    """
    def cell(rho: float, ci: list[float]) -> str:
        return f"{rho:.2f} | [{ci[0]:.2f}, {ci[1]:.2f}]"

    stats = results["spearman"]
    partial = all("partial_rho" in stat for stat in stats.values())
    header = "| score | Spearman ρ with −Δ log π(chosen) | 95% interval |"
    if partial:
        header += (" partial ρ given both lengths | 95% interval | ρ with −Δ / n+ | 95% interval "
                   f"| top {TOP_FRACTION:.0%} recovered |")
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for name, stat in stats.items():
        row = f"| `{name}` | {cell(stat['rho'], stat['ci'])} |"
        if partial:
            row += (f" {cell(stat['partial_rho'], stat['partial_ci'])} | "
                    f"{cell(stat['per_token_rho'], stat['per_token_ci'])} | {stat['top_share']:.0%} |")
        lines.append(row)
    lines += ["", f"{results['counts']['num_scored']} pairs; {results['share_displaced']:.0%} displaced "
                  "(Δ log π(chosen) < 0)."]
    for rule, stat in results["sign_rules"].items():
        lines.append(f"`{rule}` holds for {stat['share_flagged']:.0%} of the pairs and agrees with "
                     f"\"log π(chosen) fell\" on {stat['agreement']:.0%}.")
    return "\n".join(lines)


def best_line(results: dict[str, Any]) -> str:
    """The one line that names the score that best predicted displacement, and by what.

    >>> print(best_line({"best": {"score": "entk_w", "by": "partial_rho"},
    ...                  "spearman": {"entk_w": {"partial_rho": 0.61, "partial_ci": [0.45, 0.74]}}}))
    ... # doctest: +NORMALIZE_WHITESPACE
    Best predictor of the fall of log π(chosen) on this model and data: entk_w
    (partial Spearman given both lengths 0.61 [0.45, 0.74])
    """
    if results.get("best") is None:
        return "No score could be ranked against the fall of log π(chosen) (too few pairs, or constant columns)"
    name, by = results["best"]["score"], results["best"]["by"]
    stat = results["spearman"][name]
    ci = stat["partial_ci" if by == "partial_rho" else "ci"]
    what = "partial Spearman given both lengths" if by == "partial_rho" else "Spearman"
    return (f"Best predictor of the fall of log π(chosen) on this model and data: {name} ({what} {stat[by]:.2f} "
            f"[{ci[0]:.2f}, {ci[1]:.2f}])")
