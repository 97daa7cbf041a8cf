"""Top-p / top-n selection with deterministic tie-breaking."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

# Candidate ids as the selection functions take them (compared as strings, see rank_order).
CandidateIds = Sequence[str] | pl.Series | np.ndarray


def selection_size(n_candidates: int, fraction: float | None = None, n: int | None = None) -> int:
    if (fraction is None) == (n is None):
        raise ValueError("set exactly one of fraction (in (0, 1]) or n (a count)")
    if n_candidates == 0:
        raise ValueError("there are no scored candidates to select from")
    if n is not None:
        if n < 1 or n > n_candidates:
            raise ValueError(f"n={n} must be between 1 and the number of scored candidates ({n_candidates})")
        return n
    assert fraction is not None  # exactly one of fraction and n is set, checked above
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1] (0.05 means the top 5%)")
    return max(1, math.floor(fraction * n_candidates + 1e-9))


def budgets(
    fraction: float | Sequence[float] | None = None, n: int | Sequence[int] | None = None
) -> list[tuple[str, float | None, int | None]]:
    """The configured selection budgets as (label, fraction, n), one per value, in the order given.

    A label names the budget in tables and folders: ``p0.05`` (the top 5%), ``n200`` (the top 200).
    """
    if (fraction is None) == (n is None):
        raise ValueError("set exactly one of fraction (in (0, 1], or a list) or n (a count, or a list)")
    given = fraction if fraction is not None else n
    values: list[Any] = list(given) if isinstance(given, (list, tuple)) else [given]
    if not values:
        raise ValueError("the list of selection budgets is empty; give at least one fraction or n")
    out: list[tuple[str, float | None, int | None]] = [
        (f"p{v:g}", v, None) if fraction is not None else (f"n{v}", None, v) for v in values
    ]
    labels = [label for label, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"selection budgets repeat: {labels}")
    return out


def _id_series(candidate_ids) -> pl.Series:
    """Candidate ids as a polars Utf8 Series; ids that are not strings compare as their ``str``."""
    if isinstance(candidate_ids, pl.Series):
        ids = candidate_ids if candidate_ids.dtype == pl.Utf8 else candidate_ids.cast(pl.Utf8)
    elif isinstance(candidate_ids, np.ndarray) and candidate_ids.dtype.kind == "U":
        ids = pl.Series(candidate_ids.ravel(), dtype=pl.Utf8)
    else:
        values = candidate_ids.tolist() if isinstance(candidate_ids, np.ndarray) else list(candidate_ids)
        try:
            ids = pl.Series(values, dtype=pl.Utf8, strict=True)
        except TypeError:  # not all str: compare str(id), as np.asarray(ids, dtype=str) did
            ids = pl.Series(np.asarray(values, dtype=str).ravel(), dtype=pl.Utf8)
    return ids.alias("id")


def rank_order(scores: np.ndarray, candidate_ids: CandidateIds) -> np.ndarray:
    """Indices by descending score, ties broken by ascending candidate id (int64).

    Ids compare as strings by code point ("c10" < "c9"); ids that are not strings compare
    as their ``str``. NaN scores rank last (ties among them by id as well), -0.0 ties with
    0.0, and rows with equal score and id keep their input order: the order of
    ``np.lexsort((np.asarray(ids, dtype=str), -scores))``, sorted by polars instead of
    over a numpy unicode array of all ids (several times faster at 10M candidates).
    """
    neg = -np.asarray(scores, dtype=np.float64).ravel()
    ids = _id_series(candidate_ids)
    if len(ids) != len(neg):
        raise ValueError(f"{len(neg)} scores but {len(ids)} candidate ids")
    return (
        pl.DataFrame([pl.Series("score", neg), ids])
        .with_row_index("i")
        .sort(["score", "id"], maintain_order=True)["i"]
        .to_numpy()
        .astype(np.int64)
    )


def capped_top(
    scores: np.ndarray,
    candidate_ids: CandidateIds,
    n: int,
    sources: Sequence[str] | None = None,
    max_per_source: int | None = None,
) -> np.ndarray:
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


def round_robin(
    subtask_scores: np.ndarray,
    candidate_ids: CandidateIds,
    n: int,
    sources: Sequence[str] | None = None,
    max_per_source: int | None = None,
) -> np.ndarray:
    """Subtasks take turns (in column order), each picking its best remaining candidate.

    ``subtask_scores`` is M x S. Every subtask gets an equal share of the budget
    instead of the subtask with the highest cosines taking everything.
    """
    if max_per_source is not None and sources is None:
        raise ValueError("max_per_source needs the candidates' sources")
    src: Sequence[str] = sources if sources is not None else ()
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
                if max_per_source is not None and per_source.get(src[i], 0) >= max_per_source:
                    continue
                taken[i] = True
                picked.append(int(i))
                if max_per_source is not None:
                    per_source[src[i]] = per_source.get(src[i], 0) + 1
                progressed = True
                break
            if len(picked) == n:
                break
        if not progressed:
            break
    return np.asarray(picked, dtype=np.int64)


STRATEGIES = ("top", "round_robin")


def select(
    scores: np.ndarray,
    candidate_ids: CandidateIds,
    size: int,
    strategy: str = "top",
    sources: Sequence[str] | None = None,
    max_per_source: int | None = None,
    subtask_scores: np.ndarray | None = None,
) -> np.ndarray:
    """The selection policy: indices of the ``size`` chosen candidates, best first.

    ``top``: the global top by score, ties by id; ``round_robin``: subtasks take turns (needs the
    M x S ``subtask_scores``). Either can cap the candidates per source. Fewer than ``size``
    candidates under the cap is an error, not a smaller selection.
    """
    if strategy == "top":
        picked = capped_top(scores, candidate_ids, size, sources, max_per_source)
    elif strategy == "round_robin":
        if subtask_scores is None:
            raise ValueError("round_robin needs the per-subtask scores")
        picked = round_robin(subtask_scores, candidate_ids, size, sources, max_per_source)
    else:
        raise ValueError(f"selection strategy must be one of {STRATEGIES}, got {strategy!r}")
    if len(picked) < size:
        raise ValueError(
            f"only {len(picked)} of {size} candidates can be selected with max_per_source="
            f"{max_per_source}; raise the cap or lower the selection size"
        )
    return picked
