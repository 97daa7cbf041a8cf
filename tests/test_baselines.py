"""Baseline building blocks: random projection, LESS's Adam direction, selection strategies, random scores."""

import numpy as np
import pytest
import torch

from gist_assets.baselines import random_scores
from gist_core.gradients import GradientLayout, ParamBlock
from gist_core.projection import BlockProjector, adam_direction
from gist_core.selection import capped_top, round_robin

LAYOUT = GradientLayout((ParamBlock("a", (64, 32), 0), ParamBlock("b", (16, 40), 2048)))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_entries_have_mean_zero_and_variance_one_over_d(kind):
    d = 256
    P = BlockProjector(LAYOUT, d, seed=3, kind=kind, chunk_rows=500).dense().numpy()
    assert P.shape == (LAYOUT.dim, d)
    assert abs(P.mean()) < 3 * np.sqrt(1 / d) / np.sqrt(P.size)
    assert P.var() == pytest.approx(1 / d, rel=0.02)
    if kind == "rademacher":
        assert np.allclose(np.abs(P), 1 / np.sqrt(d))


def test_projection_is_seeded_and_independent_of_chunking_and_batching():
    a = BlockProjector(LAYOUT, 64, seed=1, chunk_rows=100).dense()
    b = BlockProjector(LAYOUT, 64, seed=1, chunk_rows=100, cache_bytes=0).dense()  # regenerated, not cached
    c = BlockProjector(LAYOUT, 64, seed=2, chunk_rows=100).dense()
    assert torch.equal(a, b) and not torch.equal(a, c)
    proj = BlockProjector(LAYOUT, 64, seed=1, chunk_rows=100)
    G = torch.randn(7, LAYOUT.dim, generator=torch.Generator().manual_seed(0))
    blockwise = torch.zeros(7, 64)
    for k, blk in enumerate(LAYOUT.blocks):
        proj.add_block(blockwise, k, G[:, blk.offset : blk.offset + blk.size])
    np.testing.assert_allclose(blockwise.numpy(), (G @ a).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(proj.project_rows(G.numpy(), row_chunk=3), (G @ a).numpy(), rtol=1e-4, atol=1e-4)
    one_row = proj.project_rows(G[:1].numpy())
    np.testing.assert_allclose(one_row, (G[:1] @ a).numpy(), rtol=1e-4, atol=1e-4)


def test_adam_direction_matches_the_formula():
    g, m, v = torch.randn(3, 5), torch.randn(5), torch.rand(5)
    expected = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8)
    torch.testing.assert_close(adam_direction(g, m, v), expected)


def test_round_robin_on_a_hand_made_example():
    ids = ["a", "b", "c", "d", "e"]
    # subtask 0 prefers a > b > c; subtask 1 prefers a > d > e.
    scores = np.array([[0.9, 0.9], [0.8, 0.1], [0.7, 0.0], [0.1, 0.8], [0.0, 0.7]])
    # Subtask 0 takes a; subtask 1's best (a) is taken, so d; then b, then e.
    assert [ids[i] for i in round_robin(scores, ids, 4)] == ["a", "d", "b", "e"]
    # The global top by max would take a, b, d (0.8 ties broken by id) instead.
    assert [ids[i] for i in capped_top(scores.max(1), ids, 3)] == ["a", "b", "d"]


def test_per_source_cap():
    ids = ["a", "b", "c", "d"]
    sources = ["x", "x", "x", "y"]
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert [ids[i] for i in capped_top(scores, ids, 3, sources, max_per_source=2)] == ["a", "b", "d"]
    assert len(capped_top(scores, ids, 4, sources, max_per_source=1)) == 2  # the cap cannot be met
    rr = round_robin(scores[:, None], ids, 3, sources, max_per_source=2)
    assert [ids[i] for i in rr] == ["a", "b", "d"]


def test_random_scores_are_seeded_uniform_per_id():
    ids = [f"c{i}" for i in range(2000)]
    s = random_scores(ids, seed=0)
    assert np.array_equal(s, random_scores(ids, seed=0))
    assert not np.array_equal(s, random_scores(ids, seed=1))
    assert np.array_equal(random_scores(ids[::-1], seed=0), s[::-1])  # a property of the id, not the order
    assert 0 <= s.min() and s.max() < 1 and abs(s.mean() - 0.5) < 0.03
