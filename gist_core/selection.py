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
