"""Top-p / top-n selection with deterministic tie-breaking."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def selection_size(n_candidates: int, percentage: float | None = None, n: int | None = None) -> int:
    if (percentage is None) == (n is None):
        raise ValueError("set exactly one of percentage (a fraction in (0, 1]) or n (a count)")
    if n_candidates == 0:
        raise ValueError("there are no scored candidates to select from")
    if n is not None:
        if n < 1 or n > n_candidates:
            raise ValueError(f"n={n} must be between 1 and the number of scored candidates ({n_candidates})")
        return n
    if not 0 < percentage <= 1:
        raise ValueError(f"percentage={percentage} must be in (0, 1] (0.05 means the top 5%)")
    return max(1, math.floor(percentage * n_candidates + 1e-9))


def rank_order(scores: np.ndarray, candidate_ids: Sequence[str]) -> np.ndarray:
    """Indices by descending score, ties broken by ascending candidate id."""
    ids = np.asarray(candidate_ids, dtype=str)
    return np.lexsort((ids, -np.asarray(scores, dtype=np.float64))).astype(np.int64)


def top_selection(scores: np.ndarray, candidate_ids: Sequence[str], percentage: float | None = None,
                  n: int | None = None) -> np.ndarray:
    """Indices of the selected candidates, best first."""
    return rank_order(scores, candidate_ids)[: selection_size(len(candidate_ids), percentage, n)]


def capped_top(scores: np.ndarray, candidate_ids: Sequence[str], n: int, sources: Sequence[str] | None = None,
               max_per_source: int | None = None) -> np.ndarray:
    """Global top-n by score, skipping candidates whose source already has ``max_per_source``."""
    order = rank_order(scores, candidate_ids)
    if max_per_source is None:
        return order[:n]
    if sources is None:
        raise ValueError("max_per_source needs the candidates' sources")
    taken: dict[str, int] = {}
    picked = []
    for i in order:
        s = sources[i]
        if taken.get(s, 0) < max_per_source:
            picked.append(i)
            taken[s] = taken.get(s, 0) + 1
            if len(picked) == n:
                break
    return np.asarray(picked, dtype=np.int64)


def round_robin(subtask_scores: np.ndarray, candidate_ids: Sequence[str], n: int,
                sources: Sequence[str] | None = None, max_per_source: int | None = None) -> np.ndarray:
    """Subtasks take turns (in column order), each picking its best remaining candidate.

    ``subtask_scores`` is M x S. Every subtask gets an equal share of the budget
    instead of the subtask with the highest cosines taking everything.
    """
    m, n_sub = subtask_scores.shape
    orders = [rank_order(subtask_scores[:, s], candidate_ids) for s in range(n_sub)]
    pos = [0] * n_sub
    taken = np.zeros(m, dtype=bool)
    per_source: dict[str, int] = {}
    picked: list[int] = []
    while len(picked) < n:
        progressed = False
        for s in range(n_sub):
            order = orders[s]
            while pos[s] < m:
                i = order[pos[s]]
                pos[s] += 1
                if taken[i]:
                    continue
                if max_per_source is not None and per_source.get(sources[i], 0) >= max_per_source:
                    continue
                taken[i] = True
                picked.append(int(i))
                if max_per_source is not None:
                    per_source[sources[i]] = per_source.get(sources[i], 0) + 1
                progressed = True
                break
            if len(picked) == n:
                break
        if not progressed:
            break
    return np.asarray(picked, dtype=np.int64)
