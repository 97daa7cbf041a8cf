"""Spectral basis of the target gradients (docs/design.md, the method: step 3).

G is N x D with N (target examples) small and D (LoRA parameters) large.
K = G G^T is N x N; its eigendecomposition gives the left singular vectors U
and singular values s of G, and V_k = G^T U_k diag(1/(s_k + eps)) gives the
right singular vectors without ever forming a D x D matrix.

Memory is bounded by ``budget_bytes``: G is read in column chunks into one
reused float64 buffer. A G stored as a ``.npy`` memmap is read with
``os.preadv`` rather than through the mapping, because every mapped page a
process touches counts in its resident memory until the kernel drops it; V
can be streamed to a ``.npy`` file the same way (pass a path as ``out``).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def column_chunks(dim: int, bytes_per_column: int, budget_bytes: int) -> tuple[range, int]:
    """Chunk width so that the working buffers of one chunk fit the memory budget (at least 1)."""
    width = int(min(dim, max(1, budget_bytes // max(1, bytes_per_column))))
    return range(0, dim, width), width


class ColumnReader:
    """Copies column blocks ``G[:, a:b]`` of an N x D matrix into a caller's float64 buffer.

    A C-ordered ``np.memmap`` opened on a whole file (what ``np.load(mmap_mode="r")``
    returns) is read with positioned reads, one row segment at a time, so no page of
    the mapping is touched; any other array is copied with ``np.copyto``.
    """

    def __init__(self, G):
        self.G = G
        self.shape = tuple(G.shape)
        self._fd = None
        if (
            isinstance(G, np.memmap)
            and isinstance(G.base, mmap.mmap)
            and G.filename
            and G.mode != "c"
            and G.flags.c_contiguous
            and G.dtype.isnative
            and G.ndim == 2
        ):
            fd = os.open(G.filename, os.O_RDONLY)
            size, needed = os.fstat(fd).st_size, int(G.offset) + G.nbytes
            if size < needed:  # reading the mapping past the end would kill the process (SIGBUS)
                os.close(fd)
                raise OSError(
                    f"{G.filename}: {size} bytes, but its header describes {needed}; the file is "
                    "truncated or still being written: re-materialize the asset that writes it"
                )
            self._fd, self._offset = fd, int(G.offset)
            self._row = np.empty(0, dtype=G.dtype)

    def read(self, start: int, out: np.ndarray) -> None:
        n, d = self.shape
        width = out.shape[1]
        if self._fd is None:
            np.copyto(out, self.G[:, start : start + width])
            return
        if self._row.size < width:
            self._row = np.empty(width, dtype=self._row.dtype)
        item = self._row.itemsize
        segment = memoryview(self._row[:width]).cast("B")
        for i in range(n):
            got = os.preadv(self._fd, [segment], self._offset + (i * d + start) * item)
            if got != width * item:
                raise OSError(
                    f"{self.G.filename}: short read at row {i} (got {got} of {width * item} "
                    "bytes); the file is truncated or still being written"
                )
            out[i] = self._row[:width]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gram_matrix(G: np.ndarray, budget_bytes: int = 256 << 20) -> np.ndarray:
    """K = G G^T in float64, reading G (possibly a memmap) in column chunks within the budget."""
    n, d = G.shape
    K = np.zeros((n, n), dtype=np.float64)
    starts, width = column_chunks(d, 8 * n, budget_bytes)
    buffer = np.empty(n * width, dtype=np.float64)
    with ColumnReader(G) as reader:
        for c in starts:
            chunk = _contiguous(buffer, n, min(width, d - c))
            reader.read(c, chunk)
            K += chunk @ chunk.T
    return K


def _contiguous(buffer: np.ndarray, n: int, width: int) -> np.ndarray:
    """An n x width C-contiguous view of a flat buffer: BLAS takes it without a copy."""
    return buffer[: n * width].reshape(n, width)


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
            notes.append(
                f"k={k} exceeds the {n_pos} non-zero singular values of the {len(s)} target gradients; using k={n_pos}"
            )
            k = n_pos
        return k, notes
    assert energy is not None  # exactly one of k and energy is set, checked above
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    cum = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(cum, energy - 1e-12) + 1)
    return min(k, n_pos), notes


@dataclass
class SpectralBasis:
    V: np.ndarray  # D x k, orthonormal columns
    s: np.ndarray  # all singular values, descending
    Z: np.ndarray  # N x k target coordinates U_k diag(s_k)
    k: int
    energy_kept: float

    @property
    def dim(self) -> int:
        return self.V.shape[0]


def build_basis(
    G: np.ndarray,
    k: int | None = None,
    energy: float | None = None,
    eps: float = 1e-8,
    budget_bytes: int = 256 << 20,
    out: np.ndarray | str | os.PathLike | None = None,
) -> tuple[SpectralBasis, list[str]]:
    """Exact truncated SVD of G via its Gram matrix.

    ``out``: None keeps V in memory; an array (e.g. a D x k memmap) receives V; a path
    gets V written as a ``.npy`` file chunk by chunk (then V is returned as a read-only
    memmap of it), so V, which can be larger than the budget, never sits in memory.
    """
    n, d = G.shape
    K = gram_matrix(G, budget_bytes)
    s, U = spectrum(K)
    k, notes = choose_rank(s, k=k, energy=energy)
    U_k, s_k = U[:, :k], s[:k]
    scale = U_k / (s_k + eps)  # N x k
    # Per column: the float64 chunk of G, the float64 rows of V and their float32 copy.
    starts, width = column_chunks(d, 8 * n + 12 * k, budget_bytes)
    buffer = np.empty(n * width, dtype=np.float64)
    product = np.empty(k * width, dtype=np.float64)  # V's rows, transposed: k x w
    rows32 = np.empty((width, k), dtype=np.float32)
    scale_t = np.ascontiguousarray(scale.T)
    with ColumnReader(G) as reader, _BasisWriter(out, d, k) as writer:
        for c in starts:
            w = min(width, d - c)
            chunk = _contiguous(buffer, n, w)
            reader.read(c, chunk)
            # scale^T @ chunk rather than chunk^T @ scale: numpy copies a transposed
            # operand of matmul when ``out`` is given, which would double the peak.
            product_t = _contiguous(product, k, w)
            np.matmul(scale_t, chunk, out=product_t)
            rows32[:w] = product_t.T
            writer.write(c, rows32[:w])
    energy_kept = float(np.sum(s_k**2) / np.sum(s**2))
    return SpectralBasis(V=writer.result(), s=s, Z=(U_k * s_k).astype(np.float64), k=k, energy_kept=energy_kept), notes


class _BasisWriter:
    """Where the rows of V go: a new array, the caller's array, or a ``.npy`` file by positioned writes."""

    def __init__(self, out, d: int, k: int):
        self.path = None
        if out is None:
            self.V = np.empty((d, k), dtype=np.float32)
        elif isinstance(out, (str, os.PathLike)):
            self.path = Path(out)
            header = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(d, k))
            self.offset = int(header.offset)  # the header is written; the data pages stay untouched
            del header
            self.fd = os.open(self.path, os.O_WRONLY)
        else:
            if out.shape != (d, k):
                raise ValueError(f"out has shape {out.shape}, expected {(d, k)}")
            self.V = out

    def write(self, start: int, rows: np.ndarray) -> None:
        if self.path is None:
            self.V[start : start + rows.shape[0]] = rows
            return
        data = np.ascontiguousarray(rows).data.cast("B")
        position = self.offset + start * rows.shape[1] * 4
        while data:
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def result(self) -> np.ndarray:
        if self.path is None:
            return self.V
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            os.close(self.fd)
