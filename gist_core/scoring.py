"""GIST scores: cosine to each subtask's mean target direction, max over subtasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows; an all-zero row stays zero (its cosine is 0, never NaN)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


def subtask_directions(Z: np.ndarray, subtasks: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """t_s = normalize(mean of subtask s's rows of Z), subtasks in sorted order."""
    labels = np.asarray(subtasks)
    names = sorted(set(labels.tolist()))
    means = np.stack([Z[labels == name].mean(axis=0) for name in names])
    return names, _normalize_rows(means.astype(np.float64))


_COSINE_CHUNK_BYTES = 8 << 20  # float64 rows of z converted at a time (bounds the temporaries)


def cosine_to_subtasks(z: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """cos(z_i, t_s) for candidates z (M x k) and unit directions (S x k) -> M x S (float64).

    Computed as (z @ t.T) / |z_i| in float64, in row chunks: no M x k float64 copy of z
    (rows arrive as float32) and only M x S-sized outputs. An all-zero (or non-finite-norm
    NaN) row gets cosine 0, never NaN, as with normalizing the rows first. Matches
    ``normalize_rows(z) @ t.T`` to rounding (~1e-16 relative).
    """
    z = np.asarray(z)
    t = np.asarray(directions, dtype=np.float64)
    out = np.zeros((z.shape[0], t.shape[0]), dtype=np.float64)
    step = max(1, _COSINE_CHUNK_BYTES // (8 * max(1, z.shape[1])))
    for a in range(0, z.shape[0], step):
        zc = np.asarray(z[a : a + step], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", zc, zc))[:, None]
        np.divide(zc @ t.T, norms, out=out[a : a + step], where=norms > 0)
    return out


def checkpoint_weights(avg_learning_rates: Sequence[float]) -> np.ndarray:
    """LESS weights each checkpoint by its epoch's average learning rate, normalized to sum 1."""
    w = np.asarray(avg_learning_rates, dtype=np.float64)
    if w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"checkpoint weights must be non-negative and not all zero, got {list(w)}")
    return w / w.sum()


def weighted_sum(per_checkpoint: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Weighted sum of per-checkpoint M x S score matrices."""
    if len(per_checkpoint) != len(weights):
        raise ValueError("one weight per checkpoint is required")
    return cast(np.ndarray, sum(w * c for w, c in zip(weights, per_checkpoint, strict=False)))


def combine_and_max(cosines: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of per-checkpoint M x S cosine matrices, then max over subtasks.

    Returns (score (M,), index of the best subtask (M,)).
    """
    total = weighted_sum(cosines, weights)
    return total.max(axis=1), total.argmax(axis=1)


def mean_cosine_per_subtask(
    candidates: np.ndarray, targets: np.ndarray, subtasks: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """LESS: cosine of each candidate to each target example, averaged within each subtask -> M x S."""
    labels = np.asarray(subtasks)
    names = sorted(set(labels.tolist()))
    cos = (
        _normalize_rows(np.asarray(candidates, dtype=np.float64))
        @ _normalize_rows(np.asarray(targets, dtype=np.float64)).T
    )
    return names, np.stack([cos[:, labels == name].mean(axis=1) for name in names], axis=1)
