"""GIST scores: cosine to each subtask's mean target direction, checkpoints weighted, max over subtasks.

``TargetScorer`` is the scoring half of the recipe for one target, as the candidate_scores asset
uses it shard by shard; ``gist_scores`` is the whole recipe on arrays in memory (target gradients
and candidate gradients in, scores out), the reference the graph is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from .spectral import build_basis


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


def fullspace_cosine_to_subtasks(z: np.ndarray, directions: np.ndarray, gradient_norms: np.ndarray) -> np.ndarray:
    """cos(g_i, V_k t_s) = (z_i . t_s) / |g_i| for candidates z = g V_k (M x k), unit directions t (S x k) and
    the full gradients' norms |g_i| -> M x S (float64): the cosine in the full gradient space (V_k has
    orthonormal columns, so V_k t_s is a unit vector). A zero gradient scores 0."""
    norms = np.asarray(gradient_norms, dtype=np.float64)[:, None]
    dots = np.asarray(z, dtype=np.float64) @ np.asarray(directions, dtype=np.float64).T
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


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


@dataclass(frozen=True)
class Scores:
    """Scores of M candidates for one target."""

    per_subtask: np.ndarray  # M x S: the checkpoint-weighted cosine to each subtask's direction
    score: np.ndarray  # (M,) the max over subtasks
    best_subtask: np.ndarray  # (M,) index of the subtask that gave it


@dataclass(frozen=True)
class TargetScorer:
    """GIST's score for one target: per checkpoint c, cos(z_c, t_{c,s}) with t_{c,s} the unit mean of
    subtask s's rows of the target coordinates Z_c; the checkpoints weighted; the max over subtasks."""

    subtasks: list[str]  # sorted names, the columns of ``Scores.per_subtask``
    directions: tuple[np.ndarray, ...]  # per checkpoint: S x k unit rows
    weights: np.ndarray  # per checkpoint, summing to 1

    @classmethod
    def from_coordinates(
        cls, Z_per_checkpoint: Sequence[np.ndarray], subtasks: Sequence[str], weights: Sequence[float] | np.ndarray
    ) -> TargetScorer:
        """From each checkpoint's target coordinates Z (N x k; the same N examples, labelled ``subtasks``)."""
        if len(Z_per_checkpoint) != len(weights):
            raise ValueError("one weight per checkpoint is required")
        per = [subtask_directions(Z, subtasks) for Z in Z_per_checkpoint]
        return cls(per[0][0], tuple(t for _, t in per), np.asarray(weights, dtype=np.float64))

    def subtask_scores(
        self, z_per_checkpoint: Sequence[np.ndarray], gradient_norms: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """M x S: the weighted sum over checkpoints of cos(z_c, t_{c,s}) (GIST), or, given each checkpoint's
        full gradient norms |g_c|, of cos(g_c, V_k t_{c,s}) (the cosine in the full space)."""
        if gradient_norms is None:
            cosines = [cosine_to_subtasks(z, t) for z, t in zip(z_per_checkpoint, self.directions, strict=True)]
        else:
            cosines = [
                fullspace_cosine_to_subtasks(z, t, g)
                for z, t, g in zip(z_per_checkpoint, self.directions, gradient_norms, strict=True)
            ]
        return weighted_sum(cosines, self.weights)

    def score(self, z_per_checkpoint: Sequence[np.ndarray]) -> Scores:
        per_subtask = self.subtask_scores(z_per_checkpoint)
        score, best = combine_and_max([per_subtask], [1.0])
        return Scores(per_subtask, score, best)


def gist_scores(
    target_gradients: Sequence[np.ndarray],
    subtasks: Sequence[str],
    candidate_gradients: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    *,
    k: int | None,
    energy: float | None,
    eps: float,
) -> tuple[TargetScorer, Scores]:
    """The whole GIST recipe for one target on arrays in memory, per checkpoint c: the basis V_c of the
    target gradients G_c (N x D), candidate coordinates z = g V_c, then ``TargetScorer``.

    ``candidate_gradients[c]`` is M x D. The graph computes the same in stages (spectral_basis,
    candidate_features, candidate_scores), streaming what does not fit in memory.
    """
    if not (len(target_gradients) == len(candidate_gradients) == len(weights)):
        raise ValueError("target gradients, candidate gradients and weights need one entry per checkpoint")
    Zs, zs = [], []
    for G, g in zip(target_gradients, candidate_gradients, strict=True):
        basis, _ = build_basis(np.asarray(G, dtype=np.float32), k=k, energy=energy, eps=eps)
        Zs.append(basis.Z)
        zs.append(np.asarray(g, dtype=np.float64) @ np.asarray(basis.V, dtype=np.float64))
    scorer = TargetScorer.from_coordinates(Zs, subtasks, weights)
    return scorer, scorer.score(zs)


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
