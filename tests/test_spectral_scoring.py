"""Unit tests for gist_core/spectral.py, scoring.py and selection.py (docs/design.md, the method: steps 3, 5, 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gist_core.scoring import (
    TargetScorer,
    checkpoint_weights,
    combine_and_max,
    cosine_to_subtasks,
    gist_scores,
    subtask_directions,
)
from gist_core.selection import rank_order, select, selection_size
from gist_core.spectral import ColumnReader, build_basis, choose_rank, column_chunks, gram_matrix, spectrum


@pytest.fixture
def G():
    return np.random.default_rng(0).standard_normal((12, 300))


def align_signs(V: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Flip columns of V so each has a non-negative dot product with the reference column."""
    signs = np.sign(np.sum(V * ref, axis=0))
    signs[signs == 0] = 1
    return V * signs


# ------------------------------------------------------------------ spectral


def test_build_basis_matches_numpy_and_torch_svd(G):
    basis, notes = build_basis(G, k=5)
    assert notes == []
    assert basis.k == 5 and basis.V.shape == (300, 5) and basis.Z.shape == (12, 5) and basis.dim == 300

    U_np, s_np, Vt_np = np.linalg.svd(G, full_matrices=False)
    s_t = torch.linalg.svdvals(torch.from_numpy(G)).numpy()
    np.testing.assert_allclose(basis.s, s_np, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(basis.s, s_t, rtol=1e-9, atol=1e-9)

    V = basis.V.astype(np.float64)
    np.testing.assert_allclose(align_signs(V, Vt_np[:5].T), Vt_np[:5].T, atol=1e-5)
    _, _, Vh_t = torch.linalg.svd(torch.from_numpy(G), full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(V * Vh_t.numpy()[:5].T, axis=0)), np.ones(5), atol=1e-5)

    np.testing.assert_allclose(V.T @ V, np.eye(5), atol=1e-5)
    # Z = U_k diag(s_k) (up to the same column signs as V)
    signs = np.sign(np.sum(V * Vt_np[:5].T, axis=0))
    np.testing.assert_allclose(basis.Z * signs, U_np[:, :5] * s_np[:5], atol=1e-8)
    # projecting the target rows onto the basis reproduces the target coordinates
    np.testing.assert_allclose(G @ V, basis.Z, atol=1e-4)
    assert basis.energy_kept == pytest.approx(np.sum(s_np[:5] ** 2) / np.sum(s_np**2))


def test_full_rank_basis_reconstructs_G(G):
    basis, _ = build_basis(G, energy=1.0)
    assert basis.k == 12 and basis.energy_kept == pytest.approx(1.0)
    np.testing.assert_allclose(basis.Z @ basis.V.T.astype(np.float64), G, atol=1e-4)


def test_chunked_equals_single_chunk(G):
    starts, width = column_chunks(300, 12 * 8, budget_bytes=12 * 8 * 7)
    assert width == 7 and len(starts) == 43
    assert column_chunks(300, 12 * 8, budget_bytes=1 << 62)[1] == 300
    one, _ = build_basis(G, k=4)
    many, _ = build_basis(G, k=4, budget_bytes=1)  # one column per chunk: 300 chunks
    odd, _ = build_basis(G, k=4, budget_bytes=12 * 8 * 7)
    np.testing.assert_allclose(gram_matrix(G, budget_bytes=1), G @ G.T, rtol=1e-10, atol=1e-10)
    for other in (many, odd):
        np.testing.assert_allclose(other.s, one.s, rtol=1e-10)
        np.testing.assert_allclose(other.V, one.V, atol=1e-6)
        np.testing.assert_allclose(other.Z, one.Z, atol=1e-8)


def test_memmap_input_and_output(G, tmp_path):
    path = tmp_path / "G.npy"
    np.save(path, G.astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap)
    ref, _ = build_basis(G.astype(np.float32), k=3)
    out = np.lib.format.open_memmap(tmp_path / "V.npy", mode="w+", dtype=np.float32, shape=(300, 3))
    basis, _ = build_basis(mm, k=3, budget_bytes=12 * 8 * 16, out=out)
    assert basis.V is out
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "V.npy"), ref.V, atol=1e-6)
    np.testing.assert_allclose(basis.s, ref.s, rtol=1e-9)


def test_memmap_read_by_positioned_reads_and_V_streamed_to_a_file(G, tmp_path):
    # G is 12 x 300 float32 (14 KB); the budget holds 16 float64 columns of it at a time.
    np.save(tmp_path / "G.npy", G.astype(np.float32))
    mm = np.load(tmp_path / "G.npy", mmap_mode="r")
    with ColumnReader(mm) as reader:
        assert reader._fd is not None  # not read through the mapping
        chunk = np.empty((12, 5))
        reader.read(295, chunk)
        np.testing.assert_array_equal(chunk, G.astype(np.float32)[:, 295:])
    assert ColumnReader(mm[:, 10:])._fd is None  # a view has no file layout of its own: copied
    ref, _ = build_basis(G.astype(np.float32), k=3)
    basis, _ = build_basis(mm, k=3, budget_bytes=(12 * 8 + 12 * 3) * 16, out=tmp_path / "V.npy")
    assert isinstance(basis.V, np.memmap) and basis.V.shape == (300, 3)
    np.testing.assert_allclose(np.load(tmp_path / "V.npy"), ref.V, atol=1e-6)
    np.testing.assert_allclose(basis.s, ref.s, rtol=1e-9)


def test_truncated_gradient_file_is_reported(G, tmp_path):
    np.save(tmp_path / "G.npy", G.astype(np.float32))
    mm = np.load(tmp_path / "G.npy", mmap_mode="r")
    with open(tmp_path / "G.npy", "r+b") as f:
        f.truncate(mm.offset + 11 * 300 * 4)  # the last row is missing
    with pytest.raises(OSError, match="G.npy: .* bytes, but its header describes .* truncated"):
        gram_matrix(mm, budget_bytes=1 << 20)


def test_spectrum_descending_and_clipped():
    K = np.diag([1.0, 9.0, -1e-12, 4.0])
    s, U = spectrum(K)
    np.testing.assert_allclose(s, [3.0, 2.0, 1.0, 0.0])
    assert not np.isnan(s).any()
    np.testing.assert_allclose(np.abs(U[:, 0]), [0, 1, 0, 0])


@pytest.mark.parametrize("energy, k", [(0.5, 1), (9 / 14, 1), (0.9, 2), (13 / 14, 2), (0.95, 3), (1.0, 3)])
def test_choose_rank_by_energy(energy, k):
    # s^2 = 9, 4, 1; cumulative fractions 9/14 = 0.643, 13/14 = 0.929, 1
    got, notes = choose_rank(np.array([3.0, 2.0, 1.0]), energy=energy)
    assert got == k and notes == []


def test_choose_rank_fixed_k_and_clamp():
    s = np.array([3.0, 2.0, 1.0, 0.0, 1e-12])
    assert choose_rank(s, k=2) == (2, [])
    k, notes = choose_rank(s, k=10)
    assert k == 3
    assert len(notes) == 1 and "k=10" in notes[0] and "using k=3" in notes[0]
    assert choose_rank(s, energy=1.0)[0] == 3


def test_rank_deficient_G():
    rng = np.random.default_rng(1)
    G = rng.standard_normal((12, 4)) @ rng.standard_normal((4, 300))  # rank 4
    basis, notes = build_basis(G, k=8)
    assert basis.k == 4 and notes and "using k=4" in notes[0]
    assert np.all(basis.s[4:] < basis.s[0] * 1e-6)
    V = basis.V.astype(np.float64)
    np.testing.assert_allclose(V.T @ V, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(basis.Z @ V.T, G, atol=1e-4)
    e, _ = build_basis(G, energy=1.0)
    assert e.k == 4 and e.energy_kept == pytest.approx(1.0)


def test_all_zero_G_errors():
    with pytest.raises(ValueError, match="all target gradients are zero"):
        build_basis(np.zeros((5, 40)), k=2)
    with pytest.raises(ValueError, match="all target gradients are zero"):
        build_basis(np.zeros((5, 40)), energy=0.9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"k": 2, "energy": 0.9}, "exactly one"),
        ({"k": 0}, "at least 1"),
        ({"k": -3}, "at least 1"),
        ({"energy": 0.0}, r"\(0, 1\]"),
        ({"energy": 1.5}, r"\(0, 1\]"),
        ({"energy": -0.1}, r"\(0, 1\]"),
        ({"energy": float("nan")}, r"\(0, 1\]"),
    ],
)
def test_choose_rank_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_rank(np.array([3.0, 2.0, 1.0]), **kwargs)


# ------------------------------------------------------------------- scoring


def test_subtask_directions_by_hand():
    Z = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 1.0]])
    names, D = subtask_directions(Z, ["math", "math", "zulu", "bio", "zulu"])
    assert names == ["bio", "math", "zulu"]
    expected = []
    for _name, rows in (("bio", [3]), ("math", [0, 1]), ("zulu", [2, 4])):
        m = Z[rows].mean(axis=0)
        expected.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(D, np.array(expected))
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0)
    np.testing.assert_allclose(D[2], [-1 / np.sqrt(10), 3 / np.sqrt(10)])


def test_subtask_with_zero_mean_gives_zero_direction():
    Z = np.array([[1.0, 2.0], [-1.0, -2.0], [0.0, 1.0]])
    names, D = subtask_directions(Z, ["a", "a", "b"])
    assert names == ["a", "b"]
    assert not np.isnan(D).any()
    np.testing.assert_array_equal(D[0], [0.0, 0.0])


def test_cosine_to_subtasks_matches_explicit_cosines():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((7, 5))
    Z = rng.standard_normal((9, 5))
    _, D = subtask_directions(Z, list("aabbbcccc"))
    C = cosine_to_subtasks(z, D)
    assert C.shape == (7, 3)
    for i in range(7):
        for j in range(3):
            expected = z[i] @ D[j] / (np.linalg.norm(z[i]) * np.linalg.norm(D[j]))
            assert C[i, j] == pytest.approx(expected, abs=1e-12)
    assert np.all(np.abs(C) <= 1 + 1e-12)


def test_zero_candidate_scores_zero_not_nan():
    D = np.array([[1.0, 0.0], [0.0, 1.0]])
    C = cosine_to_subtasks(np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32), D)
    np.testing.assert_array_equal(C, [[0.0, 0.0], [1.0, 0.0]])
    score, best = combine_and_max([C], [1.0])
    assert not np.isnan(score).any()
    np.testing.assert_array_equal(score, [0.0, 1.0])


def test_combine_and_max_by_hand():
    # 2 candidates x 2 subtasks, 2 checkpoints
    c1 = np.array([[0.2, 0.8], [0.5, -0.1]])
    c2 = np.array([[0.6, 0.0], [0.1, 0.9]])
    score, best = combine_and_max([c1, c2], [0.75, 0.25])
    # candidate 0: [0.15+0.15, 0.6+0] = [0.30, 0.60] -> 0.60 (subtask 1)
    # candidate 1: [0.375+0.025, -0.075+0.225] = [0.40, 0.15] -> 0.40 (subtask 0)
    np.testing.assert_allclose(score, [0.60, 0.40])
    np.testing.assert_array_equal(best, [1, 0])
    # max is taken after the weighted sum, not per checkpoint
    assert score[0] < 0.75 * c1[0].max() + 0.25 * c2[0].max()
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        combine_and_max([c1, c2], [1.0])


def test_checkpoint_weights():
    np.testing.assert_allclose(checkpoint_weights([2e-5, 1e-5, 1e-5]), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(checkpoint_weights([3.0]), [1.0])
    np.testing.assert_allclose(checkpoint_weights([0.0, 1.0]), [0.0, 1.0])
    assert checkpoint_weights([1, 2, 3, 4]).sum() == pytest.approx(1.0)
    for bad in ([], [0.0, 0.0], [1.0, -0.5]):
        with pytest.raises(ValueError, match="non-negative and not all zero"):
            checkpoint_weights(bad)


# ----------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "pool, pct, expected",
    [
        (100, 0.05, 5),
        (10, 0.05, 1),
        (3, 0.01, 1),
        (10, 0.3, 3),
        (100, 0.29, 29),
        (7, 0.5, 3),
        (10, 1.0, 10),
    ],
)
def test_selection_size_fraction(pool, pct, expected):
    assert selection_size(pool, fraction=pct) == expected


def test_selection_size_n_and_errors():
    assert selection_size(10, n=1) == 1
    assert selection_size(10, n=10) == 10
    for kwargs, match in [
        ({}, "exactly one"),
        ({"fraction": 0.1, "n": 2}, "exactly one"),
        ({"n": 0}, "between 1 and"),
        ({"n": 11}, "between 1 and"),
        ({"n": -1}, "between 1 and"),
        ({"fraction": 0.0}, r"\(0, 1\]"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
        ({"fraction": -0.2}, r"\(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            selection_size(10, **kwargs)
    with pytest.raises(ValueError, match="no scored candidates"):
        selection_size(0, n=1)


def test_top_selection_order_and_tie_breaking():
    ids = ["d", "b", "a", "c", "e"]
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    order = rank_order(scores, ids)
    assert [ids[i] for i in order] == ["b", "a", "c", "d", "e"]
    sel = select(scores, ids, 3)
    assert sel.dtype == np.int64
    assert [ids[i] for i in sel] == ["b", "a", "c"]
    assert list(scores[sel]) == sorted(scores[sel], reverse=True)
    assert [ids[i] for i in select(scores, ids, selection_size(5, fraction=0.4))] == ["b", "a"]
    assert len(select(scores, ids, selection_size(5, fraction=1.0))) == 5


def test_top_selection_is_independent_of_input_order():
    rng = np.random.default_rng(3)
    ids = [f"cand-{i:03d}" for i in range(50)]
    scores = np.round(rng.random(50), 1)  # many ties
    chosen = {ids[i] for i in select(scores, ids, selection_size(50, fraction=0.2))}
    perm = rng.permutation(50)
    chosen_perm = {ids[i] for i in perm[select(scores[perm], [ids[i] for i in perm], 10)]}
    assert chosen == chosen_perm and len(chosen) == 10


# ------------------------------------------------- scale paths (same results as before)


def _old_cosine_to_subtasks(z, directions):
    """The previous implementation: normalize float64 rows, then one matmul."""
    x = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0) @ directions.T


def _old_rank_order(scores, ids):
    """The previous implementation: np.lexsort over a numpy unicode array of the ids."""
    return np.lexsort((np.asarray(ids, dtype=str), -np.asarray(scores, dtype=np.float64))).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_to_subtasks_float32_zero_rows_and_chunks_match_old(monkeypatch, dtype):
    import gist_core.scoring as scoring

    rng = np.random.default_rng(5)
    z = rng.standard_normal((1001, 16)).astype(dtype)
    z[[0, 500, 1000]] = 0.0  # zero rows, also at chunk edges
    z[7] *= 1e-30  # tiny but non-zero row still gets its cosine
    _, D = subtask_directions(rng.standard_normal((12, 16)), list("aaaabbbbcccc"))
    old = _old_cosine_to_subtasks(z, D)
    for chunk_bytes in (scoring._COSINE_CHUNK_BYTES, 8 * 16 * 64, 8 * 16 * 1, 1):  # one chunk ... one row a chunk
        monkeypatch.setattr(scoring, "_COSINE_CHUNK_BYTES", chunk_bytes)
        C = cosine_to_subtasks(z, D)
        assert C.dtype == np.float64 and C.shape == (1001, 3)
        assert not np.isnan(C).any()
        np.testing.assert_array_equal(C[[0, 500, 1000]], 0.0)
        np.testing.assert_allclose(C, old, rtol=1e-12, atol=1e-15)
        assert np.abs(C[7]).max() > 0.01


def test_cosine_to_subtasks_nan_row_is_zero_like_before():
    D = np.array([[1.0, 0.0], [0.0, 1.0]])
    z = np.array([[np.nan, 1.0], [3.0, 4.0]], dtype=np.float32)
    C = cosine_to_subtasks(z, D)
    np.testing.assert_array_equal(C, _old_cosine_to_subtasks(z, D))
    np.testing.assert_allclose(C, [[0.0, 0.0], [0.6, 0.8]])


def test_rank_order_matches_lexsort_with_many_ties():
    import polars as pl

    rng = np.random.default_rng(11)
    m = 5000
    ids = [f"c{i}" for i in rng.permutation(m)]  # string order differs from numeric: "c10" < "c9"
    ids[10] = ids[11]  # a duplicated id keeps input order
    scores = np.round(rng.random(m), 2)  # ~100 distinct values: long runs of ties
    scores[rng.choice(m, 50, replace=False)] = np.nan  # NaN ranks last, ties by id there too
    scores[rng.choice(m, 50, replace=False)] = -0.0  # ties with 0.0
    scores[rng.choice(m, 50, replace=False)] = 0.0
    scores[:3] = [np.inf, -np.inf, np.inf]
    expected = _old_rank_order(scores, ids)
    for given in (ids, tuple(ids), pl.Series("candidate_id", ids), np.asarray(ids), np.asarray(ids, dtype=object)):
        got = rank_order(scores, given)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)
    continuous = rng.standard_normal(m)  # (almost) no ties: the argsort-only path
    np.testing.assert_array_equal(rank_order(continuous, ids), _old_rank_order(continuous, ids))
    np.testing.assert_array_equal(rank_order(np.zeros(m), ids), _old_rank_order(np.zeros(m), ids))


def test_rank_order_nan_last_string_ids_and_edges():
    ids = ["c9", "c10", "c2", "b", "a"]
    scores = np.array([0.5, 0.5, np.nan, np.nan, 0.7])
    assert [ids[i] for i in rank_order(scores, ids)] == ["a", "c10", "c9", "b", "c2"]
    nums = [10, 9, 100]
    assert [nums[i] for i in rank_order([1, 1, 1], nums)] == [10, 100, 9]  # non-str ids compare as str
    assert rank_order(np.array([]), []).dtype == np.int64 and len(rank_order(np.array([]), [])) == 0
    np.testing.assert_array_equal(rank_order(np.array([0.3]), ["x"]), [0])
    with pytest.raises(ValueError, match="2 scores but 3 candidate ids"):
        rank_order(np.array([0.1, 0.2]), ["a", "b", "c"])


def test_method_scores_and_top_rows_read_back_as_before(tmp_path) -> None:
    """write_method_scores' columns as the old list code built them; the top-n chosen in DuckDB picks the same
    rows as choosing on every row in Python; capped/round-robin are staged as chosen; a set streamed in shards
    is the same as one written at once; the DuckDB histogram counts what numpy counts."""
    import polars as pl

    from gist_assets.config import SelectionConfig
    from gist_assets.scores import add_method_scores, score_summary, write_method_scores
    from gist_assets.selection import choose, stage_budget
    from gist_resources import ScoreStore

    rng = np.random.default_rng(4)
    m, names = 400, ["algebra", "geometry", "logic"]
    ids = [f"c{i}" for i in rng.permutation(m)]
    scored = pl.DataFrame(
        {
            "candidate_id": ids,
            "source": [f"s{i % 3}" for i in range(m)],
            "shard": ["x-0000"] * m,
            "n_tokens": list(range(m)),
        }
    )
    per_subtask = np.round(rng.random((m, 3)), 2)  # many tied scores
    store = ScoreStore(database=str(tmp_path / "scores.duckdb"))
    write_method_scores(store, "gist", [("t", scored, per_subtask, names, "fp")])
    full = store.read_scores("t", "gist")
    score, best = per_subtask.max(axis=1), per_subtask.argmax(axis=1)
    rank = np.empty(m, dtype=np.int64)
    rank[_old_rank_order(score, ids)] = np.arange(1, m + 1)
    want = pl.DataFrame({"candidate_id": ids, "rank": rank, "best_subtask": [names[i] for i in best]}).sort("rank")
    assert full.select("candidate_id", "rank", "best_subtask").equals(want)
    for n in (1, 37, 40, 399, 400, 500):  # cuts through tied scores, and past the last row
        store.stage_top("t", "gist", f"n{n}", n)
        top = store.staged_summary("t", "gist", f"n{n}", head=m)["head"]
        assert top["candidate_id"].to_list() == want["candidate_id"].to_list()[:n]
        assert top["selection_rank"].to_list() == list(range(1, min(n, m) + 1))
    long = store.read_subtask_scores("t", "gist").sort("candidate_id", "subtask")
    want_long = pl.DataFrame(
        {
            "candidate_id": np.repeat(np.asarray(ids, dtype=object), 3).tolist(),
            "subtask": names * m,
            "score": per_subtask.reshape(-1),
        }
    ).sort("candidate_id", "subtask")
    assert long.equals(want_long)

    for cfg in (
        SelectionConfig(fraction=0.1),
        SelectionConfig(fraction=None, n=37),
        SelectionConfig(fraction=0.1, max_per_source=15),
        SelectionConfig(fraction=0.1, strategy="round_robin"),
    ):
        stage_budget(store, "t", "gist", "b", cfg, m)
        subtasks = store.read_subtask_scores("t", "gist") if cfg.strategy == "round_robin" else None
        staged = store.staged_summary("t", "gist", "b", head=m)
        want_rows = choose(cfg, full, subtasks).select(staged["head"].columns)
        assert staged["selected"] == want_rows.height == (cfg.n or int(cfg.fraction * m))
        assert staged["head"].equals(want_rows)
        assert staged["counts_per_source"] == dict(want_rows.group_by("source").len().sort("source").iter_rows())
        assert staged["score_cut"] == want_rows["score"].min()

    edges, counts = store.score_histogram("t", "gist", bins=7)
    np.testing.assert_array_equal(counts, np.histogram(score, bins=7, range=(score.min(), score.max()))[0])
    np.testing.assert_allclose(edges[[0, -1]], [score.min(), score.max()])

    # The same rows streamed in three uneven shards, into another target: the same table.
    summary: dict = {}
    with store.write_scores("gist") as writer:
        for target in ("t", "u"):
            for a, b in ((0, 150), (150, 151), (151, m)):
                add_method_scores(writer, summary, target, scored[a:b], per_subtask[a:b], names, "fp")
    assert [r["scored"] for r in score_summary(summary)] == [m, m]
    assert store.read_scores("u", "gist").drop("target").equals(full.drop("target"))
    assert store.read_scores("t", "gist").equals(full)


def test_shards_scored_on_threads_come_back_in_order_and_bounded() -> None:
    """in_order: the items' order whatever thread finishes first, at most 2 per thread in flight, and a
    worker's error reaches the caller."""
    import threading
    import time

    from gist_assets.scores import in_order

    running, most, started, lock = 0, 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal running, most, started
        with lock:
            running += 1
            started += 1
            most = max(most, running)
        time.sleep(0.002 * ((7 * i) % 5))  # later items often finish first
        with lock:
            running -= 1
        return i * i

    consumed = []
    for value in in_order(work, list(range(40)), threads=3):
        consumed.append(value)
        assert started - len(consumed) <= 2 * 3  # work started ahead of the consumer stays bounded
    assert consumed == [i * i for i in range(40)]
    assert most <= 3
    assert list(in_order(work, [5], threads=3)) == [25]
    assert list(in_order(work, list(range(4)), threads=1)) == [0, 1, 4, 9]

    def fails(i: int) -> int:
        if i == 6:
            raise ValueError("shard 6 is damaged")
        return i

    with pytest.raises(ValueError, match="shard 6 is damaged"):
        list(in_order(fails, list(range(20)), threads=2))


def test_selection_files_written_in_chunks_read_back_whole(tmp_path) -> None:
    """A selection written through the artifact store in chunks give the lines as the pool had them (quotes, commas,
    unicode untouched), one messages line per record, and one Parquet file equal to all the chunks."""
    import json

    import polars as pl

    from gist_assets.selection import training_messages_column
    from gist_resources import ArtifactStore

    records = [
        {
            "id": f"c{i}",
            "messages": [{"role": "user", "content": f'say "{i}", twice'}, {"role": "assistant", "content": "ok, é"}],
        }
        for i in range(11)
    ]
    rows = pl.DataFrame(
        {
            "candidate_id": [r["id"] for r in records],
            "source": ["s"] * 11,
            "score": [1.0 - i / 100 for i in range(11)],
            "original": [json.dumps(r, ensure_ascii=False) for r in records],
            "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in records],
        }
    )

    def chunks():
        for at in range(0, rows.height, 4):
            part = rows.slice(at, 4)
            messages = training_messages_column(part["messages"])
            yield (
                part["original"],
                pl.DataFrame([part["candidate_id"].alias("id"), part["source"], messages]),
                part.drop("messages", "original").with_columns(messages),
            )

    storage = ArtifactStore(root=str(tmp_path))
    with storage.selection_writer("t", "gist") as writer:
        manifest = writer.write_budget("p1", chunks(), {"budget": "p1"})
    out = storage.selection_dir("t", "gist", "p1")
    assert manifest["files"]["jsonl"] == "selections/t/gist/p1/selection.jsonl"
    assert storage.selection_manifests("t", "gist") == {"p1": manifest}
    lines = (out / "selection.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == rows["original"].to_list()
    chat = [json.loads(line) for line in (out / "selection.messages.jsonl").read_text().splitlines()]
    assert [c["id"] for c in chat] == rows["candidate_id"].to_list()
    assert chat[3]["messages"] == records[3]["messages"]
    back = pl.read_parquet(out / "selection.parquet")
    assert back["candidate_id"].to_list() == rows["candidate_id"].to_list()
    assert back["messages"].to_list()[10] == records[10]["messages"]


def test_pool_text_joined_in_order_a_chunk_at_a_time(tmp_path) -> None:
    """ScoreStore.staged_with_file_columns gives what a plain left join of the staged rows, best first, gives, in
    chunks of at most chunk_rows, whatever the chunk size; spill folders never outlive it, and a dead process's
    are removed."""
    import subprocess
    import sys

    import polars as pl

    from gist_resources import ScoreStore
    from gist_resources.files import _host

    rng = np.random.default_rng(7)
    pool = pl.DataFrame(
        {
            "candidate_id": [f"c{i}" for i in range(500)],
            "original": [f'{{"id": "c{i}", "q": "é {i}"}}' for i in range(500)],
            "messages": [f"m{i}" for i in range(500)],
            "source": ["s"] * 500,
        }
    )
    pool_file = tmp_path / "pool.parquet"
    pool.write_parquet(pool_file, row_group_size=64)
    asked = [f"c{i}" for i in rng.choice(500, 120, replace=False)] + ["absent-1", "absent-2"]
    ranks = pl.Series(np.arange(1, 123), dtype=pl.Int64)
    frame = pl.DataFrame(
        {
            "selection_rank": ranks,
            "candidate_id": rng.permutation(asked).tolist(),
            "source": "s",
            "score": np.linspace(1.0, 0.0, 122),
            "rank": ranks,
            "best_subtask": "a",
            "shard": "x-0000",
            "n_tokens": pl.Series(rng.integers(1, 100, 122), dtype=pl.Int64),
            "basis_fingerprint": "fp",
        }
    )
    want = frame.join(pool.drop("source"), on="candidate_id", how="left", maintain_order="left")
    store = ScoreStore(database=str(tmp_path / "db" / "scores.duckdb"))
    (tmp_path / "db").mkdir()
    store.stage_rows("t", "gist", "p1", frame)
    for chunk_rows in (1, 7, 50, 122, 1000):
        parts = list(
            store.staged_with_file_columns("t", "gist", "p1", str(pool_file), ["original", "messages"], chunk_rows)
        )
        assert all(0 < p.height <= chunk_rows for p in parts)
        got = pl.concat(parts)
        assert got.select("target", "method", "budget").unique().rows() == [("t", "gist", "p1")]
        assert got.drop("target", "method", "budget").equals(want)
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["scores.duckdb"]

    empty = list(store.staged_with_file_columns("t", "gist", "none", str(pool_file), ["original"], 10))
    assert len(empty) == 1 and empty[0].columns[-2:] == ["basis_fingerprint", "original"] and empty[0].height == 0

    stream = store.staged_with_file_columns("t", "gist", "p1", str(pool_file), ["original"], 10)
    next(stream)
    stream.close()  # a consumer that stops early (a failed export) leaves nothing behind
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "db" / f".export_join.{_host()}-{int(done.stdout)}-00000000.tmp"  # a killed writer's
    stale.mkdir()
    pl.concat([pool, pool.filter(pl.col("candidate_id") == frame["candidate_id"][0])]).write_parquet(pool_file)
    with pytest.raises(ValueError, match=r"pool\.parquet holds a candidate_id more than once"):
        list(store.staged_with_file_columns("t", "gist", "p1", str(pool_file), ["original"], 10))
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["scores.duckdb"]


# ------------------------------------------------- the recipe against a plain computation


def plain_gist(Gs, subtasks, gs, weights, k):
    """GIST by the book: a full numpy SVD per checkpoint, z = g V_k, Z = U_k S_k, per-subtask unit means,
    explicit cosines, weighted sum over checkpoints, max over subtasks."""
    names = sorted(set(subtasks))
    total = 0.0
    for G, g, w in zip(Gs, gs, weights, strict=True):
        U, s, Vt = np.linalg.svd(G.astype(np.float64), full_matrices=False)
        V, Z = Vt[:k].T, U[:, :k] * s[:k]
        z = g.astype(np.float64) @ V
        cos = np.zeros((len(g), len(names)))
        for j, name in enumerate(names):
            t = Z[[i for i, x in enumerate(subtasks) if x == name]].mean(axis=0)
            t /= np.linalg.norm(t)
            for i in range(len(g)):
                cos[i, j] = z[i] @ t / np.linalg.norm(z[i])
        total = total + w * cos
    return names, total


def test_gist_scores_match_a_full_svd_by_hand():
    rng = np.random.default_rng(7)
    subtasks = ["a"] * 4 + ["b"] * 5 + ["c"] * 3
    Gs = [rng.standard_normal((12, 300)).astype(np.float32) for _ in range(2)]
    gs = [rng.standard_normal((40, 300)).astype(np.float32) for _ in range(2)]
    weights = checkpoint_weights([2e-5, 1e-5])
    scorer, scores = gist_scores(Gs, subtasks, gs, weights, k=6, energy=None, eps=1e-8)
    names, expected = plain_gist(Gs, subtasks, gs, weights, k=6)
    assert scorer.subtasks == names
    np.testing.assert_allclose(scores.per_subtask, expected, atol=1e-6)
    np.testing.assert_allclose(scores.score, expected.max(axis=1), atol=1e-6)
    np.testing.assert_array_equal(scores.best_subtask, expected.argmax(axis=1))
    # The selection from those scores: the top 10%, ties by id.
    ids = [f"c{i:02d}" for i in range(40)]
    chosen = select(scores.score, ids, selection_size(40, fraction=0.1))
    assert [ids[i] for i in chosen] == [ids[i] for i in np.argsort(-expected.max(axis=1), kind="stable")[:4]]


def test_select_policies_and_a_cap_too_tight():
    ids = ["a", "b", "c", "d"]
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    per_subtask = np.array([[0.9, 0.0], [0.8, 0.1], [0.7, 0.2], [0.0, 0.1]])
    assert select(scores, ids, 2).tolist() == [0, 1]
    assert select(scores, ids, 2, sources=["x", "x", "y", "y"], max_per_source=1).tolist() == [0, 2]
    assert select(scores, ids, 2, strategy="round_robin", subtask_scores=per_subtask).tolist() == [0, 2]
    with pytest.raises(ValueError, match="only 2 of 3 candidates"):
        select(scores, ids, 3, sources=["x", "x", "y", "y"], max_per_source=1)
    with pytest.raises(ValueError, match="round_robin needs"):
        select(scores, ids, 2, strategy="round_robin")
    with pytest.raises(ValueError, match="strategy must be one of"):
        select(scores, ids, 2, strategy="best")


def test_fullspace_scores_are_cosines_to_the_basis_directions_in_gradient_space():
    """gist_fullspace: per checkpoint cos(g, V_k t_s) with the full gradient g, from z = g V_k and |g| alone."""
    rng = np.random.default_rng(11)
    subtasks = ["a"] * 5 + ["b"] * 4
    Gs = [rng.standard_normal((9, 200)).astype(np.float32) for _ in range(2)]
    gs = [rng.standard_normal((30, 200)) for _ in range(2)]
    gs[0][3] = 0.0  # a zero gradient scores 0, not NaN
    weights = checkpoint_weights([3e-5, 1e-5])
    expected = 0.0
    zs, norms, Zs = [], [], []
    for G, g, w in zip(Gs, gs, weights, strict=True):
        U, s, Vt = np.linalg.svd(G.astype(np.float64), full_matrices=False)
        V, Z = Vt[:5].T, U[:, :5] * s[:5]
        cos = np.zeros((30, 2))
        for j, name in enumerate(["a", "b"]):
            t = Z[[i for i, x in enumerate(subtasks) if x == name]].mean(axis=0)
            u = V @ (t / np.linalg.norm(t))  # the subtask's direction in gradient space
            for i in range(30):
                n = np.linalg.norm(g[i])
                cos[i, j] = 0.0 if n == 0 else g[i] @ u / (n * np.linalg.norm(u))
        expected = expected + w * cos
        zs.append(g @ V)
        norms.append(np.linalg.norm(g, axis=1))
        Zs.append(Z)
    scorer = TargetScorer.from_coordinates(Zs, subtasks, weights)
    np.testing.assert_allclose(scorer.subtask_scores(zs, norms), expected, atol=1e-9)
    assert not np.isnan(scorer.subtask_scores(zs, norms)).any()
    # Per checkpoint never above the GIST cosine in magnitude: |z| = |g V_k| <= |g|.
    one = TargetScorer.from_coordinates(Zs[:1], subtasks, [1.0])
    assert np.all(np.abs(one.subtask_scores(zs[:1], norms[:1])) <= np.abs(one.subtask_scores(zs[:1])) + 1e-9)
