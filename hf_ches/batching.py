"""Sequences → micro-batches: sort by length, pack under a token budget, pad on the right.

Sorting by length before packing is what makes batched scoring fast: rows of similar length waste little padding,
so a micro-batch of ``rows × longest`` tokens is mostly real tokens, far more than fixed-size batches in random
order (``docs/speed.md`` §2). Right padding keeps every real token at its own position, so with a causal model the
hidden states of real tokens do not depend on the padding at all: no attention mask is needed.

>>> plan_microbatches([5, 2, 9, 3], token_budget=10)
[[2], [0, 3], [1]]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np


def plan_microbatches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that ``len(group) * longest_in_group <= token_budget``.

    A sequence longer than the budget gets a micro-batch of its own (it is never truncated here).
    """
    return list(pack(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)), lengths.__getitem__, token_budget))


def pack(
    order: Iterable[int], length: Callable[[int], int], token_budget: int, first_budget: int | None = None
) -> Iterator[list[int]]:
    """Cut ``order`` into consecutive groups with ``len(group) * longest_in_group <= token_budget``.

    Lazy: a group is yielded as soon as the next sequence does not fit, so ``length`` may wait for sequences that
    are still being tokenized (see :class:`hf_ches.pairs.PendingPairs`). In an order of decreasing length this is
    :func:`plan_microbatches`; in an order that only roughly decreases it wastes a little more padding.
    ``first_budget`` (default ``token_budget``) bounds the first group alone: a small first group needs few
    sequences, so the model can start while the others are still being tokenized.

    >>> list(pack([2, 0, 3, 1], [5, 2, 9, 3].__getitem__, token_budget=10))
    [[2], [0, 3], [1]]
    >>> list(pack([3, 1, 0, 2], [2, 2, 2, 2].__getitem__, token_budget=8, first_budget=2))
    [[3], [1, 0, 2]]
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    budget = token_budget if first_budget is None else first_budget
    group: list[int] = []
    longest = 0
    for i in order:
        n = length(i)
        if group and (len(group) + 1) * max(longest, n) > budget:
            yield group
            group, longest, budget = [], 0, token_budget
        group.append(i)
        longest = max(longest, n)
    if group:
        yield group


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """Right-pad token id lists into one ``int64`` array ``[B, longest]``.

    >>> pad_right([[5, 6, 7], [8]], pad_id=0).tolist()
    [[5, 6, 7], [8, 0, 0]]
    """
    lengths = np.array([len(s) for s in sequences])
    ids = np.full((len(sequences), lengths.max()), pad_id, dtype=np.int64)
    # the real positions of a row are its first len(row) columns, so row-major order is the concatenation order
    ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum())
    )
    return ids


def completion_positions(lengths: np.ndarray, prompt_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every completion-predicting position ``P-1 … L-2`` of a padded batch, row by row.

    >>> rows, cols = completion_positions(np.array([4, 3]), np.array([2, 1]))
    >>> rows.tolist(), cols.tolist()
    ([0, 0, 1, 1], [1, 2, 0, 1])
    """
    counts = lengths - prompt_lens
    first = np.repeat(np.cumsum(counts) - counts, counts)  # flat index where each row's positions start
    cols = np.arange(counts.sum()) - first + np.repeat(prompt_lens - 1, counts)
    return np.repeat(np.arange(len(lengths)), counts), cols
