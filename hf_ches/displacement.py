"""The math of likelihood-displacement checks: one DPO step, rank correlation with a bootstrap interval, and the
paper's percentile subsets. Pure: tensors, arrays or floats in and out; no model and no I/O.

One DPO step on a single pair, with the model itself as the reference (so the margin starts at 0), is what
:mod:`hf_ches.validate` measures for every pair:

* the loss is TRL's sigmoid DPO loss ``ℓ = −log σ(β [(log π(y+) − log π_ref(y+)) − (log π(y−) − log π_ref(y−))])``
  (:func:`dpo_sigmoid_loss`), whose gradient at margin 0 is ``−(β/2) (∇ log π(y+) − ∇ log π(y−))``;
* the update is plain SGD ``θ −= η ∇ℓ`` or the sign step ``θ −= η sign(∇ℓ)`` (Adam's first steps)
  (:func:`apply_step`);
* the measured effect is ``Δ log π(y+) = log π_after(y+) − log π_before(y+)``; ``Δ < 0`` is displacement.

A score predicts displacement when it ranks the pairs as ``−Δ`` does: :func:`spearman`, with a percentile-bootstrap
interval from :func:`spearman_interval`.

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

from collections.abc import Sequence

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


def spearman_interval(
    a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, confidence_level: float = 0.95, seed: int = 0
) -> list[float]:
    """Percentile-bootstrap interval ``[low, high]`` of :func:`spearman` over pairs resampled with replacement.

    Seeded, so the same inputs give the same interval; resamples in which one side is constant are skipped.

    >>> x = np.arange(50.0)
    >>> low, high = spearman_interval(x, x + np.random.default_rng(1).normal(0, 10, 50), n_resamples=200)
    >>> 0.4 < low < high < 1.0
    True
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(a), size=(n_resamples, len(a)))  # [R, n]
    values = np.array([spearman(a[idx], b[idx]) for idx in draws])  # [R]
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
