"""Seeded random projections of LoRA gradients, applied block by block (LESS, and the GIST sketches).

The D x d projection matrix is never materialized whole: each gradient block
(one LoRA weight) has its own rows, generated in row chunks from a generator
seeded by (seed, block, chunk), so the same rows come out whatever the batch.
Entries have mean 0 and variance 1/d (Rademacher +-1/sqrt(d), or Gaussian).
Chunks are cached while they fit a memory budget.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .gradients import GradientLayout

KINDS = ("rademacher", "gaussian")
SKETCH_KINDS = ("countsketch", *KINDS)


class BlockProjector:
    def __init__(
        self,
        layout: GradientLayout,
        dim: int,
        seed: int = 0,
        kind: str = "rademacher",
        chunk_rows: int = 4096,
        cache_bytes: int = 512 << 20,
        device: torch.device | str = "cpu",
    ):
        if kind not in KINDS:
            raise ValueError(f"projection must be one of {KINDS}, got {kind!r}")
        if dim < 1:
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.layout, self.dim, self.seed, self.kind = layout, dim, seed, kind
        self.chunk_rows, self.device = chunk_rows, torch.device(device)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._cache_left = cache_bytes

    def _chunk(self, block: int, chunk: int, rows: int) -> torch.Tensor:
        key = (block, chunk)
        if key in self._cache:
            return self._cache[key]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + block * 10_007 + chunk) % (2**63))
        if self.kind == "rademacher":
            m = torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
        else:
            m = torch.randn(rows, self.dim, generator=gen)
        m = m.div_(math.sqrt(self.dim)).to(self.device)
        if m.numel() * 4 <= self._cache_left:
            self._cache[key] = m
            self._cache_left -= m.numel() * 4
        return m

    def add_block(self, acc: torch.Tensor, block: int, g: torch.Tensor) -> None:
        """Add this block's share of g @ P ((B, block size) -> (B, d)) into ``acc`` (B, d)."""
        size = self.layout.blocks[block].size
        for c, start in enumerate(range(0, size, self.chunk_rows)):
            stop = min(size, start + self.chunk_rows)
            acc.addmm_(g[:, start:stop].float(), self._chunk(block, c, stop - start))

    def project_rows(self, G: np.ndarray, row_chunk: int = 256) -> np.ndarray:
        """Project full gradients (N x D, e.g. a memmap) -> N x d, reading G a slab at a time."""
        out = np.zeros((G.shape[0], self.dim), dtype=np.float32)
        for r in range(0, G.shape[0], row_chunk):
            acc = torch.zeros(min(row_chunk, G.shape[0] - r), self.dim, device=self.device)
            for k, b in enumerate(self.layout.blocks):
                g = torch.from_numpy(np.ascontiguousarray(G[r : r + row_chunk, b.offset : b.offset + b.size]))
                self.add_block(acc, k, g.to(self.device))
            out[r : r + acc.shape[0]] = acc.cpu().numpy()
        return out

    def project_columns(self, V: np.ndarray) -> np.ndarray:
        """P^T V for a D x k matrix (e.g. a memmapped basis) -> d x k, reading V a block of rows at a time.

        For a candidate sketched as s = g P, ``s @ project_columns(V)`` estimates g V: only the
        inner products of g with V's columns are needed, and E[P P^T] = I.
        """
        if V.shape[0] != self.layout.dim:
            raise ValueError(f"V has {V.shape[0]} rows but the gradient layout has {self.layout.dim} entries")
        out = torch.zeros(self.dim, V.shape[1], dtype=torch.float64)
        for k, b in enumerate(self.layout.blocks):
            for c, start in enumerate(range(0, b.size, self.chunk_rows)):
                stop = min(b.size, start + self.chunk_rows)
                rows = torch.from_numpy(np.asarray(V[b.offset + start : b.offset + stop], dtype=np.float32))
                out += (self._chunk(k, c, stop - start).cpu().T @ rows).double()  # float64 sum over chunks
        return out.numpy()

    def dense(self) -> torch.Tensor:
        """The whole D x d matrix (tests only)."""
        return torch.cat(
            [
                torch.cat(
                    [
                        self._chunk(k, c, min(self.chunk_rows, b.size - s))
                        for c, s in enumerate(range(0, b.size, self.chunk_rows))
                    ]
                )
                for k, b in enumerate(self.layout.blocks)
            ]
        )


class CountSketch:
    """A sparse projection: each gradient entry goes, with a seeded random sign, to one seeded random bucket.

    P has one +-1 per row, so E[P P^T] = I and <g P, h P> estimates <g, h> with about the
    variance of a dense Rademacher projection of the same d, but applying it costs O(D) per
    example instead of O(D d), and P is two length-D arrays instead of a D x d matrix.
    """

    kind = "countsketch"

    def __init__(self, layout: GradientLayout, dim: int, seed: int = 0, device: torch.device | str = "cpu"):
        if dim < 1:
            raise ValueError(f"sketch dimension must be positive, got {dim}")
        self.layout, self.dim, self.seed, self.device = layout, dim, seed, torch.device(device)
        self.buckets, self.signs = [], []
        for k, b in enumerate(layout.blocks):
            gen = torch.Generator().manual_seed((seed * 1_000_003 + k * 10_007) % (2**63))
            self.buckets.append(torch.randint(0, dim, (b.size,), generator=gen).to(self.device))
            self.signs.append(torch.randint(0, 2, (b.size,), generator=gen).float().mul_(2).sub_(1).to(self.device))

    def add_block(self, acc: torch.Tensor, block: int, g: torch.Tensor) -> None:
        """Add this block's share of g @ P ((B, block size) -> (B, d)) into ``acc`` (B, d): scattered in place,
        with no (B, d) temporary per block (which cost 25x the scatter itself)."""
        acc.index_add_(1, self.buckets[block].to(g.device), g.float() * self.signs[block].to(g.device))

    def project_columns(self, V: np.ndarray) -> np.ndarray:
        """P^T V for a D x k matrix -> d x k (see ``BlockProjector.project_columns``)."""
        if V.shape[0] != self.layout.dim:
            raise ValueError(f"V has {V.shape[0]} rows but the gradient layout has {self.layout.dim} entries")
        out = torch.zeros(self.dim, V.shape[1], dtype=torch.float64)
        for k, b in enumerate(self.layout.blocks):
            rows = torch.from_numpy(np.asarray(V[b.offset : b.offset + b.size], dtype=np.float64))
            out.index_add_(0, self.buckets[k].cpu(), rows * self.signs[k].cpu().double()[:, None])
        return out.numpy()

    def dense(self) -> torch.Tensor:
        """The whole D x d matrix (tests only)."""
        P = torch.zeros(self.layout.dim, self.dim)
        rows = torch.arange(self.layout.dim)
        P[rows, torch.cat(self.buckets).cpu()] = torch.cat(self.signs).cpu()
        return P


def sketch_projector(layout: GradientLayout, dim: int, seed: int, kind: str, device: torch.device | str = "cpu"):
    """The projection of a gradient sketch: a CountSketch, or a dense BlockProjector (rademacher/gaussian)."""
    if kind == "countsketch":
        return CountSketch(layout, dim, seed, device=device)
    return BlockProjector(layout, dim, seed, kind, device=device)


def pack_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows stored in half the bytes: float16 after scaling each row to a max |entry| of 1, and the float32
    scales. Scaling keeps every row inside float16's range whatever the gradients' magnitude (unscaled,
    entries under 6e-8 would flush to zero); each entry is kept to 2^-11 of its row's max."""
    scale = np.abs(rows).max(axis=1).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return (rows / safe[:, None]).astype(np.float16), scale


def unpack_rows(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``pack_rows``' inverse, as float32."""
    return packed.astype(np.float32) * scale[:, None]


def sketched_coordinates(
    sketches: np.ndarray,
    projected_bases: np.ndarray,
    slices: dict[str, tuple[int, int]],
    scale: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per target, candidates' estimated GIST coordinates z ~= (g P)(P^T V_k) (M x k).

    ``sketches`` is M x d (g P per candidate; or ``pack_rows``' float16 rows with their ``scale``),
    ``projected_bases`` the d x sum(k) matrix P^T V of every target's basis side by side, ``slices`` each
    target's columns. Exact when P P^T = I; E[P P^T] = I.
    """
    # torch converts float16 rows several times faster than numpy; a row's scale is applied to its M x k
    # product rather than to its d entries: (diag(c) S) B = diag(c) (S B).
    rows = torch.from_numpy(np.ascontiguousarray(sketches)).float()
    z = (rows @ torch.from_numpy(np.ascontiguousarray(projected_bases, dtype=np.float32))).numpy()
    if scale is not None:
        z *= scale[:, None]
    return {name: z[:, a:b] for name, (a, b) in slices.items()}


def adam_direction(
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """The update direction LESS uses: one Adam step's moments from the checkpoint's state, no bias correction.

    m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2;  direction = m' / sqrt(v' + eps)
    """
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * g.pow(2)
    return m / torch.sqrt(v + eps)
