"""Pair scores from per-sequence statistics: pure math, float64, no model and no I/O.

With ``S± = Σ_k h_k`` the sum of the hidden states that produce the logits of each token of the chosen (+) and
rejected (−) completion, and ``n±`` their token counts (Razin et al. 2024, Definitions 2 and 3):

* ``ches    = <S+, S−> − ||S+||²``
* ``ln_ches = <S+, S−> / (n+ n−) − ||S+||² / n+²``  (= ``<m+, m− − m+>`` with the means ``m± = S± / n±``)

A high score means the two completions look alike to the model, and DPO on the pair tends to *lower* the
probability of the chosen completion (likelihood displacement). The paper's two baselines, which it shows are not
indicative of displacement, are here for comparison: the normalized token edit distance of the completions and the
inner product of their last hidden states.

>>> import torch
>>> s_plus, s_minus = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]])
>>> ches(s_plus, s_minus).tolist()          # (3 + 2) - (1 + 4)
[0.0]
>>> ln_ches(s_plus, s_minus, torch.tensor([2]), torch.tensor([1])).tolist()   # 5/2 - 5/4
[1.25]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum(-1)  # [N]


def ches(s_chosen: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
    """CHES ``<S+,S−> − ||S+||²`` per pair, float64 ``[N]``, from the sums ``[N, d]``."""
    return _dot(s_chosen, s_rejected) - _dot(s_chosen, s_chosen)


def ln_ches(
    s_chosen: torch.Tensor, s_rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor
) -> torch.Tensor:
    """Length-normalized CHES ``<S+,S−>/(n+ n−) − ||S+||²/n+²`` per pair, float64 ``[N]``."""
    n_c, n_r = n_chosen.double(), n_rejected.double()
    return _dot(s_chosen, s_rejected) / (n_c * n_r) - _dot(s_chosen, s_chosen) / n_c**2


def last_hidden_ip(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """Inner product of the last completion hidden states ``<h+_last, h−_last>`` (a baseline of the paper)."""
    return _dot(h_chosen, h_rejected)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Levenshtein distance of two token id sequences divided by the longer length (a baseline of the paper).

    0 means identical completions, 1 means nothing in common. The paper stores the negation; we keep the distance.

    >>> edit_distance([1, 2, 3], [1, 5, 3]), edit_distance([1, 2], [1, 2])
    (0.3333333333333333, 0.0)
    """
    if not a or not b:
        return 1.0 if (a or b) else 0.0
    b_arr = np.asarray(b)
    prev = np.arange(len(b) + 1)  # distances from the empty prefix of a
    for i, token in enumerate(a, start=1):
        substitute = prev[:-1] + (b_arr != token)  # [len(b)]
        delete = prev[1:] + 1
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(substitute, delete)
        # insertions run left to right: cur[j] = min(cur[j], cur[j-1] + 1) = min_k (cur[k] + j - k)
        cur = np.minimum.accumulate(cur - np.arange(len(cur))) + np.arange(len(cur))
        prev = cur
    return float(prev[-1]) / max(len(a), len(b))
