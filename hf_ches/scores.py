"""Pair scores from per-sequence statistics: pure math, float64, no model and no I/O; and :data:`SCORES`, the
registry the scorer reads (each score's columns, what it needs from the forward pass, and its function).

With ``S± = Σ_k h_k`` the sum of the hidden states that produce the logits of each token of the chosen (+) and
rejected (−) completion, and ``n±`` their token counts (Razin et al. 2024, Definitions 2 and 3):

* ``ches    = <S+, S−> − ||S+||²``
* ``ln_ches = <S+, S−> / (n+ n−) − ||S+||² / n+²``  (= ``<m+, m− − m+>`` with the means ``m± = S± / n±``)

A high score means the two completions look alike to the model, and DPO on the pair tends to *lower* the
probability of the chosen completion (likelihood displacement). The paper's two baselines, which it shows are not
indicative of displacement, are here for comparison: the normalized token edit distance of the completions and the
inner product of their last hidden states.

CHES is the output-embedding block of the empirical NTK with every token weight set to 1 (``docs/scores.md`` §3.2).
The exact block keeps the weights. With ``g_k = (e_{y_k} − softmax(z_k)) ⊙ post′`` the gradient of
``ln π(y_k | x, y_<k)`` w.r.t. the output embedding's output ``W h_k + b`` (before soft-capping and scaling),
``∇_W ln π(y|x) = Σ_k g_k h_kᵀ`` and, with ``K_W(a,b) = <∇_W ln π(a|x), ∇_W ln π(b|x)>_F = Σ_{k,k'} <g_k, g'_k'>
<h_k, h'_k'>``:

* ``entk_w    = K_W(+,−) − K_W(+,+)``
* ``ln_entk_w = K_W(+,−) / (n+ n−) − K_W(+,+) / n+²``

(:func:`alpha_ches` with the α of :func:`output_gradient_gram`). To first order, one SGD step of size ``η`` on any
DPO-type loss ``ℓ`` of the pair that trains only an untied output embedding changes ``ln π(y+|x)`` by
``η ℓ′ · entk_w`` (``ℓ′ < 0``): a positive ``entk_w`` predicts displacement.

>>> import torch
>>> s_plus, s_minus = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]])
>>> ches(s_plus, s_minus).tolist()          # (3 + 2) - (1 + 4)
[0.0]
>>> ln_ches(s_plus, s_minus, torch.tensor([2]), torch.tensor([1])).tolist()   # 5/2 - 5/4
[1.25]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from hf_ches.batching import PairBatch
from hf_ches.forward import HEAD_BYTES, Encoded, OutputHead


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


def alpha_ches(
    h_plus: torch.Tensor, h_minus: torch.Tensor, alpha_pm: torch.Tensor, alpha_pp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted CHES of one pair and its length-normalized form, float64 scalars (Razin et al. 2024, Thm 6).

    ``Σ_{k,k'} α−[k,k'] <h+_k, h−_k'> − Σ_{k,k'} α+[k,k'] <h+_k, h+_k'>``, and the same with the two terms divided
    by ``n+ n−`` and ``n+²``, from the states ``h± [n±, d]`` and the weights ``α− [n+, n−]``, ``α+ [n+, n+]``. With
    every α = 1 it is ``(ches, ln_ches)``; with the α of :func:`output_gradient_gram` it is ``(entk_w, ln_entk_w)``.

    >>> h_plus, h_minus = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0], [0.0, 1.0]])
    >>> [float(x) for x in alpha_ches(h_plus, h_minus, torch.ones(1, 2), torch.ones(1, 1))]   # (5+2) - 5, 7/2 - 5
    [2.0, -1.5]
    """
    h_p, h_m = h_plus.double(), h_minus.double()
    n_p, n_m = h_p.shape[0], h_m.shape[0]
    pm = (alpha_pm.double() * (h_p @ h_m.T)).sum()  # Σ α− ⊙ [n+, n−]
    pp = (alpha_pp.double() * (h_p @ h_p.T)).sum()  # Σ α+ ⊙ [n+, n+]
    return pm - pp, pm / (n_p * n_m) - pp / n_p**2


@torch.no_grad()  # the head's weight is a model parameter: no autograd graph
def output_gradient_gram(
    head: OutputHead, h: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, max_bytes: int = HEAD_BYTES,
    rows: int | None = None,
) -> torch.Tensor:
    """The Gram matrix ``G[:rows] Gᵀ`` ``[rows, N]`` float64 of the per-token output-layer gradients.

    Row ``k`` of ``G = (onehot(targets) − softmax(logits(h))) ⊙ head.slope`` ``[N, V]`` is the gradient of
    ``ln π(targets_k)`` w.r.t. the pre-processing logits ``W h_k + b``, so ``<g_k, g_k'>`` are the α that make
    :func:`alpha_ches` the exact output-embedding kernel. States ``h`` ``[N, d]`` and their logits' log-sum-exp ``lse``
    ``[N]`` come from :func:`hf_ches.forward.encode` (``needs={"states"}``); the logits are recomputed for
    ``max_bytes / (4 N)`` vocabulary entries at a time (float32; at least one), so about ``max_bytes`` of logits
    are live at once, never ``[N, V]``.

    >>> from hf_ches.forward import OutputHead
    >>> head = OutputHead(weight=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), bias=None)
    >>> h, y = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])   # uniform p = (1/2, 1/2)
    >>> output_gradient_gram(head, h, y, torch.full((2,), 0.6931471805599453), max_bytes=8).tolist()
    [[0.5, -0.5], [-0.5, 0.5]]
    """
    n, vocab_size = h.shape[0], head.weight.shape[0]
    rows = n if rows is None else rows
    step = max(1, max_bytes // (head.dtype.itemsize * n))
    x = h.to(head.weight.device, head.weight.dtype)  # [N, d]
    targets, lse = targets.to(x.device), lse.to(x.device)  # [N], [N]
    gram = torch.zeros(rows, n, dtype=torch.float64, device=x.device)
    for start in range(0, vocab_size, step):
        vocab = slice(start, min(start + step, vocab_size))
        z = head.logits(x, vocab)  # [N, c]
        slope = head.slope(z)  # [N, c], or a number without soft-capping
        g = z.sub_(lse[:, None]).exp_().neg_()  # [N, c]: −softmax, in place of the logits
        hit = ((targets >= vocab.start) & (targets < vocab.stop)).nonzero().squeeze(1)  # rows whose target is here
        g[hit, targets[hit] - start] += 1.0  # + onehot(targets)
        g *= slope
        with _one_cpu_thread(x.device):
            gram += (g[:rows] @ g.T).double()  # [rows, N]
    return gram


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, one torch thread for the block. A CPU BLAS may split a long inner dimension (here a vocabulary
    slice) across its threads, so the summation order, and the last bits of a Gram entry, would follow the thread
    count; on one thread every process sums alike (a `torchrun` rank on one thread equals one process on all)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_entk(
    head: OutputHead,
    h_plus: torch.Tensor,
    h_minus: torch.Tensor,
    y_plus: torch.Tensor,
    y_minus: torch.Tensor,
    lse_plus: torch.Tensor,
    lse_minus: torch.Tensor,
    max_bytes: int = HEAD_BYTES,
) -> tuple[float, float]:
    """``(entk_w, ln_entk_w)`` of one pair: the exact output-embedding eNTK displacement, plain and length-normalized.

    ``h± [n±, d]``, ``y± [n±]`` (the completion token ids, EOS included) and ``lse± [n±]`` as in
    :func:`output_gradient_gram`, which runs once over ``[h+; h−]`` (cost ``≈ 2 (n+ + n−)(d + n+) V`` flops).
    For tied embeddings this is the output use of the shared matrix only: training that matrix also moves the
    input embeddings, which is a different kernel (``GradientKernelScorer(parameters="output")`` computes that one).
    """
    n = h_plus.shape[0]
    alpha = output_gradient_gram(  # [n+, n+ + n−]
        head, torch.cat([h_plus, h_minus]), torch.cat([y_plus, y_minus]), torch.cat([lse_plus, lse_minus]), max_bytes,
        n)
    device = alpha.device
    entk_w, ln_entk_w = alpha_ches(h_plus.to(device), h_minus.to(device), alpha[:, n:], alpha[:, :n])
    return float(entk_w), float(ln_entk_w)


def last_hidden_ip(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """Inner product of the last completion hidden states ``<h+_last, h−_last>`` (a baseline of the paper)."""
    return _dot(h_chosen, h_rejected)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Levenshtein distance of two token id sequences divided by the longer length (a baseline of the paper).

    0 means identical completions, 1 means nothing in common. The paper stores the negation; we keep the distance.

    >>> edit_distance([1, 2, 3], [1, 5, 3]), edit_distance([1, 2], [1, 2])
    (0.3333333333333333, 0.0)
    """
    return Levenshtein.distance(list(a), list(b)) / max(len(a), len(b), 1)


# --- the registry: what the scorer computes for each name in ``scores=`` ---


@dataclass(frozen=True)
class ScoreInputs:
    """What a score is computed from: the batch of pairs, its forward pass, and the checked output head."""

    batch: PairBatch
    encoded: Encoded
    head: OutputHead
    head_bytes: int  # most bytes of float32 logits at once (hf_ches.forward.HEAD_BYTES)


@dataclass(frozen=True)
class Score:
    """One entry of :data:`SCORES`: the columns it adds, what it needs from :func:`hf_ches.forward.encode`
    (beyond the sums), and the function that gives one ``[k]`` float64 array per column (any value for a pair that
    is not scorable: the scorer writes NaN there)."""

    columns: tuple[str, ...]
    needs: frozenset[str]
    compute: Callable[[ScoreInputs], tuple[np.ndarray, ...]]


def _ches(x: ScoreInputs) -> tuple[np.ndarray]:
    return (ches(*x.batch.split(x.encoded.sums)).numpy(),)


def _ln_ches(x: ScoreInputs) -> tuple[np.ndarray]:
    return (ln_ches(*x.batch.split(x.encoded.sums), *x.batch.split(x.encoded.num_tokens)).numpy(),)


def _logps(x: ScoreInputs) -> tuple[np.ndarray, np.ndarray]:
    chosen, rejected = x.batch.split(x.encoded.logps.numpy())
    return chosen, rejected


def _edit_distance(x: ScoreInputs) -> tuple[np.ndarray]:
    ok = x.batch.scorable()
    return (np.array([edit_distance(c, r) if good else np.nan for c, r, good in zip(*x.batch.completions(), ok)]),)


def _last_hidden_ip(x: ScoreInputs) -> tuple[np.ndarray]:
    return (last_hidden_ip(*x.batch.split(x.encoded.last_hidden)).numpy(),)


def _entk_w(x: ScoreInputs) -> tuple[np.ndarray, np.ndarray]:
    (h_c, h_r), (lse_c, lse_r) = x.batch.split(x.encoded.states), x.batch.split(x.encoded.lse)
    chosen, rejected = x.batch.completions()
    values = [
        output_entk(x.head, h_c[j], h_r[j], torch.as_tensor(chosen[j]), torch.as_tensor(rejected[j]), lse_c[j],
                    lse_r[j], x.head_bytes) if ok else (np.nan, np.nan)
        for j, ok in enumerate(x.batch.scorable())
    ]
    table = np.array(values, dtype=np.float64).reshape(len(x.batch), 2)
    return table[:, 0], table[:, 1]


SCORES: dict[str, Score] = {
    "ches": Score(("ches",), frozenset(), _ches),
    "ln_ches": Score(("ln_ches",), frozenset(), _ln_ches),
    "logps": Score(("chosen_logps", "rejected_logps"), frozenset({"logps"}), _logps),
    "edit_distance": Score(("edit_distance",), frozenset(), _edit_distance),
    "last_hidden_ip": Score(("last_hidden_ip",), frozenset({"last_hidden"}), _last_hidden_ip),
    "entk_w": Score(("entk_w", "ln_entk_w"), frozenset({"states"}), _entk_w),
}
