"""Spectral basis of the target gradients (DESIGN.md §1 step 3).

G is N x D with N (target examples) small and D (LoRA parameters) large.
K = G G^T is N x N; its eigendecomposition gives the left singular vectors U
and singular values s of G, and V_k = G^T U_k diag(1/(s_k + eps)) gives the
right singular vectors without ever forming a D x D matrix. G is read in
column chunks so memory is bounded by the chunk, not by N x D.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


def column_chunks(dim: int, n_rows: int, budget_bytes: int, itemsize: int = 8) -> tuple[range, int]:
    """Chunk width so that one N x width float64 chunk fits the memory budget."""
    width = max(1, budget_bytes // max(1, n_rows * itemsize))
    return range(0, dim, width), width


def gram_matrix(G: np.ndarray, budget_bytes: int = 256 << 20) -> np.ndarray:
    """K = G G^T in float64, reading G (possibly a memmap) in column chunks."""
    n, d = G.shape
    K = np.zeros((n, n), dtype=np.float64)
    starts, width = column_chunks(d, n, budget_bytes)
    for c in starts:
        chunk = np.asarray(G[:, c:c + width], dtype=np.float64)
        K += chunk @ chunk.T
    return K


def spectrum(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending, sqrt of clipped eigenvalues) and U from the Gram matrix."""
    evals, evecs = np.linalg.eigh((K + K.T) / 2)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    return s, evecs[:, order]


def choose_rank(s: np.ndarray, k: int | None = None, energy: float | None = None) -> tuple[int, list[str]]:
    """Rank by a fixed k or the smallest k reaching an energy fraction of sum s^2.

    Returns (k, warnings). k is clamped to the number of non-zero singular values.
    """
    notes: list[str] = []
    if (k is None) == (energy is None):
        raise ValueError("set exactly one of k (an integer) or energy (a fraction in (0, 1])")
    n_pos = int((s > s[0] * 1e-6).sum()) if s.size and s[0] > 0 else 0
    if n_pos == 0:
        raise ValueError("all target gradients are zero; cannot build a basis (check the targets' completions)")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > n_pos:
            notes.append(f"k={k} exceeds the {n_pos} non-zero singular values of the {len(s)} "
                         f"target gradients; using k={n_pos}")
            k = n_pos
        return k, notes
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(cum, energy - 1e-12) + 1)
    return min(k, n_pos), notes


@dataclass
class SpectralBasis:
    V: np.ndarray         # D x k, orthonormal columns
    s: np.ndarray         # all singular values, descending
    Z: np.ndarray         # N x k target coordinates U_k diag(s_k)
    k: int
    energy_kept: float

    @property
    def dim(self) -> int:
        return self.V.shape[0]


def build_basis(G: np.ndarray, k: int | None = None, energy: float | None = None, eps: float = 1e-8,
                budget_bytes: int = 256 << 20, out: np.ndarray | None = None) -> tuple[SpectralBasis, list[str]]:
    """Exact truncated SVD of G via its Gram matrix. ``out`` may be a D x k memmap."""
    n, d = G.shape
    K = gram_matrix(G, budget_bytes)
    s, U = spectrum(K)
    k, notes = choose_rank(s, k=k, energy=energy)
    U_k, s_k = U[:, :k], s[:k]
    scale = U_k / (s_k + eps)                     # N x k
    V = out if out is not None else np.empty((d, k), dtype=np.float32)
    starts, width = column_chunks(d, n, budget_bytes)
    for c in starts:
        chunk = np.asarray(G[:, c:c + width], dtype=np.float64)
        V[c:c + width] = (chunk.T @ scale).astype(V.dtype)
    energy_kept = float(np.sum(s_k ** 2) / np.sum(s ** 2))
    return SpectralBasis(V=V, s=s, Z=(U_k * s_k).astype(np.float64), k=k, energy_kept=energy_kept), notes
