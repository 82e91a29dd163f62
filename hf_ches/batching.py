"""Pairs → sequences → micro-batches: lay out a batch of pairs, sort by length, pack under a token budget, pad
on the right; or, for the prefix-shared forward, pack whole pairs side by side in rows (:meth:`PairBatch.shared_rows`).

:class:`PairBatch` turns ``k`` pairs into ``2k`` sequences (the chosen one of pair ``j`` at ``j``, its rejected one
at ``k + j``) and says which pairs can be scored. Sorting by length before packing is what makes batched scoring
fast: rows of similar length waste little padding, so a micro-batch of ``rows × longest`` tokens is mostly real
tokens, far more than fixed-size batches in random order (``docs/speed.md`` §2). Right padding keeps every real
token at its own position, so with a causal model the hidden states of real tokens do not depend on the padding at
all: no attention mask is needed.

>>> lengths = [5, 2, 9, 3]
>>> list(pack(longest_first(lengths), lengths.__getitem__, token_budget=10))
[[2], [0, 3], [1]]
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from hf_ches.pairs import TokenizedPair

T = TypeVar("T")


class PairBatch:
    """``k`` pairs laid out as ``2k`` sequences: the chosen sequence of pair ``j`` at ``j``, its rejected one at
    ``k + j``. This layout is written here only; :meth:`split` reads per-sequence results back per pair.

    The pairs may still be tokenizing (:class:`hf_ches.pairs.PendingPairs`): :attr:`sequences` and
    :attr:`prompt_lens` are lazy, so reading sequence ``j`` waits for pair ``j % k`` alone. Whether a pair can be
    scored is :attr:`hf_ches.pairs.TokenizedPair.scorable`; :meth:`runnable` and :meth:`scorable` are its two uses.

    >>> from hf_ches.pairs import TokenizedPair
    >>> batch = PairBatch([TokenizedPair(0, [1], [2, 3], [4]), TokenizedPair(1, [1], [], [5])])
    >>> batch.sequences[1], batch.sequences[2], batch.prompt_lens[3]
    ([1], [1, 4], 1)
    >>> list(batch.runnable(range(4))), batch.scorable().tolist()
    ([0, 2], [True, False])
    >>> batch.split(np.array([10, 11, 20, 21]))
    (array([10, 11]), array([20, 21]))
    >>> batch.segment_lengths[0]  # prompt + chosen + rejected: the pair's tokens in a prefix-shared forward
    4
    """

    def __init__(self, pairs: Sequence[TokenizedPair]):
        self.pairs, k = pairs, len(pairs)
        self.sequences: Sequence[list[int]] = LazySequence(2 * k, self._sequence)
        self.prompt_lens: Sequence[int] = LazySequence(2 * k, lambda j: len(pairs[j % k].prompt_ids))
        self.segment_lengths: Sequence[int] = LazySequence(k, lambda j: len(pairs[j].prompt_ids)
                                                           + len(pairs[j].chosen_ids) + len(pairs[j].rejected_ids))

    def __len__(self) -> int:
        return len(self.pairs)

    def _sequence(self, j: int) -> list[int]:
        pair = self.pairs[j % len(self)]
        return pair.prompt_ids + (pair.chosen_ids if j < len(self) else pair.rejected_ids)

    def completions(self) -> tuple[list[list[int]], list[list[int]]]:
        """The chosen and the rejected completion ids of every pair (EOS included)."""
        return [p.chosen_ids for p in self.pairs], [p.rejected_ids for p in self.pairs]

    def runnable(self, order: Iterable[int]) -> Iterator[int]:
        """The sequences of ``order`` whose pair can be scored (lazy: waits for each pair when it comes). Pair
        indices work too: pair ``j`` is the pair of sequence ``j``."""
        return (j for j in order if self.pairs[j % len(self)].scorable)

    def scorable(self) -> np.ndarray:
        """``[k]`` bool: the pairs that get scores (the others get NaN)."""
        return np.array([pair.scorable for pair in self.pairs], dtype=bool)

    def split(self, per_sequence: T) -> tuple[T, T]:
        """``(chosen part, rejected part)`` of anything indexed by sequence (an array, a tensor, a tuple)."""
        return per_sequence[: len(self)], per_sequence[len(self) :]

    def shared_rows(self, rows: Sequence[Sequence[int]], pad_id: int) -> "SharedRows":
        """Lay out the pairs of ``rows`` (pair indices per row, e.g. from :func:`pack_rows`) for one prefix-shared
        forward pass: each pair is one segment ``[prompt | chosen | rejected]``, segments sit side by side and each
        row is right-padded to the longest.

        The positions run ``0 … P+C-1`` over prompt and chosen, then restart at ``P`` for the rejected tokens, so
        every token keeps the position it has in its own sequence; the attention layout (:attr:`SharedRows.segments`,
        :attr:`SharedRows.branch`) lets a token see only the earlier tokens of its segment, and a rejected token no
        chosen one. The state at ``P-1`` predicts the first token of both answers, so the rejected sequence's
        completion-predicting states are ``P-1`` and its own tokens but the last.

        >>> batch = PairBatch([TokenizedPair(0, [1, 2], [3, 4], [5]), TokenizedPair(1, [6], [7], [8, 9])])
        >>> packed = batch.shared_rows([[0, 1]], pad_id=0)
        >>> packed.ids.tolist(), packed.positions.tolist(), packed.branch.tolist()
        ([[1, 2, 3, 4, 5, 6, 7, 8, 9]], [[0, 1, 2, 3, 2, 0, 1, 1, 2]], [[0, 0, 1, 1, 2, 0, 1, 2, 2]])
        >>> packed.cols.tolist(), packed.targets.tolist(), packed.sequences, packed.counts
        ([1, 2, 1, 5, 5, 7], [3, 4, 5, 7, 8, 9], [0, 2, 1, 3], [2, 1, 1, 2])
        """
        width = max(sum(self.segment_lengths[j] for j in row) for row in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        positions = np.tile(np.arange(width), (len(rows), 1))
        segments = np.zeros_like(ids)
        branch = np.zeros_like(ids)  # 0: prompt or padding, 1: chosen, 2: rejected
        cols, targets, sequences, counts = [], [], [], []
        segment = 0
        for r, row in enumerate(rows):
            at = 0
            for j in row:
                pair = self.pairs[j]
                p, c, n = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
                end = at + p + c + n
                ids[r, at:end] = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
                positions[r, at:end] = np.r_[np.arange(p + c), np.arange(p, p + n)]
                segments[r, at:end] = segment
                branch[r, at + p : end] = np.repeat([1, 2], [c, n])
                cols += [np.arange(at + p - 1, at + p + c - 1), np.r_[at + p - 1, np.arange(at + p + c, end - 1)]]
                targets += [pair.chosen_ids, pair.rejected_ids]
                sequences += [j, len(self) + j]
                counts += [c, n]
                at, segment = end, segment + 1
            positions[r, at:] = np.arange(width - at)
            segments[r, at:] = segment  # the padding of a row is a segment of its own: it sees only itself
            segment += 1
        block_rows = np.repeat([r for r, row in enumerate(rows) for _ in range(2 * len(row))], counts)
        return SharedRows(ids, positions, segments, branch, block_rows, np.concatenate(cols),
                          np.fromiter(itertools.chain.from_iterable(targets), dtype=np.int64), sequences, counts)


@dataclass(frozen=True)
class SharedRows:
    """Pairs laid out for a prefix-shared forward pass (:meth:`PairBatch.shared_rows`): the row inputs and where each
    sequence's completion-predicting states are, sequence by sequence (chosen, then rejected, of each pair)."""

    ids: np.ndarray  # [B, T] token ids
    positions: np.ndarray  # [B, T] position ids (the rejected tokens restart after the prompt)
    segments: np.ndarray  # [B, T] segment number, distinct within the micro-batch: a token sees only its segment
    branch: np.ndarray  # [B, T] 0 prompt or padding, 1 chosen, 2 rejected: a rejected token does not see chosen ones
    rows: np.ndarray  # [M] row of each completion-predicting state
    cols: np.ndarray  # [M] its column
    targets: np.ndarray  # [M] the token it predicts
    sequences: list[int]  # the sequence index (PairBatch layout) of each block of the M states
    counts: list[int]  # states per block: the completion's tokens


class LazySequence(Sequence):
    """``[get(0), …, get(n-1)]``, each item computed on first use (it may wait for a pair still being tokenized)."""

    def __init__(self, n: int, get: Callable[[int], Any]):
        self._n, self._get = n, functools.cache(get)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self._n:  # also ends iteration
            raise IndexError(i)
        return self._get(i)


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices of ``lengths`` from the longest to the shortest (ties by index): the packing order that wastes least.

    >>> longest_first([5, 2, 9, 3])
    [2, 0, 3, 1]
    """
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def pack(
    order: Iterable[int], length: Callable[[int], int], token_budget: int, first_budget: int | None = None
) -> Iterator[list[int]]:
    """Cut ``order`` into consecutive groups with ``len(group) * longest_in_group <= token_budget``.

    Lazy: a group is yielded as soon as the next sequence does not fit, so ``length`` may wait for sequences that
    are still being tokenized (see :class:`hf_ches.pairs.PendingPairs`). In :func:`longest_first` order this wastes
    least padding; in an order that only roughly decreases it wastes a little more.
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


def pack_rows(
    order: Iterable[int], length: Callable[[int], int], token_budget: int, first_budget: int | None = None
) -> Iterator[list[list[int]]]:
    """Cut ``order`` into micro-batches of rows: each item goes into the first row with room, or opens a row, and a
    micro-batch holds at most ``token_budget`` tokens, counted as ``rows × width``.

    A row's width is the longest item of its micro-batch, so in :func:`longest_first` order the first item sets it
    and shorter items fill the rows' ends (first-fit decreasing): little padding, and no row longer than the longest
    item, which bounds the ``width²`` attention cost of a row. Lazy like :func:`pack`, with the same
    ``first_budget``.

    >>> list(pack_rows([0, 1, 2, 3], [6, 4, 2, 2].__getitem__, token_budget=12))
    [[[0], [1, 2]], [[3]]]
    >>> list(pack_rows([0, 1, 2], [3, 3, 3].__getitem__, token_budget=9, first_budget=3))
    [[[0]], [[1], [2]]]
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    budget = token_budget if first_budget is None else first_budget
    rows: list[list[int]] = []
    used: list[int] = []  # tokens in each row
    width = 0
    for i in order:
        n = length(i)
        fits = next((r for r, u in enumerate(used) if u + n <= width), None)
        if fits is not None:
            rows[fits].append(i)
            used[fits] += n
            continue
        if rows and (len(rows) + 1) * max(width, n) > budget:
            yield rows
            rows, used, width, budget = [], [], 0, token_budget
        rows.append([i])
        used.append(n)
        width = max(width, n)
    if rows:
        yield rows


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
