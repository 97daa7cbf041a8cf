"""selection_evaluation on the small graph: one row per (target, method) plus the references, no duplicates."""

import math
import random
import shutil

import dagster as dg
import duckdb
import polars as pl
import pytest

from gist_assets.definitions import make_resources
from gist_assets.evaluation import heldout_sets, selection_evaluation
from gist_demo.tiny_model import train_bpe_tokenizer

EXTRA = "random_sample"  # a second method, added straight to DuckDB, the same for every target


def _evaluations(root):
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        return db.sql("SELECT * FROM evaluations").pl()


def test_selection_evaluation(small_run, tmp_path):
    # A copy of the shared small run, so the extra method below does not leak into other tests. Torch threads
    # as the small run had them, so the fine-tunes both made are the same to the bit.
    root = tmp_path / "copy"
    shutil.copytree(small_run["root"], root)
    resources = make_resources(str(root))
    run_config = {
        "ops": {"selection_evaluation": {"config": {"epochs": 1, "include_full_pool": True, "seeds": [0, 1]}}}
    }
    with dg.instance_for_test() as instance:
        store = resources["score_store"]
        with store.get_connection() as conn:
            sel = conn.sql("SELECT * FROM selections").pl()
        # Another method, as a baseline would write it: the evaluation reads methods, never hard-codes them.
        pool_ids = sorted(pl.read_parquet(root / "pool" / "candidate_pool.parquet")["candidate_id"].to_list())
        budget = "p0.05"
        picked = random.Random(0).sample(
            pool_ids, sel.filter((pl.col("target") == sel["target"][0]) & (pl.col("budget") == budget)).height
        )
        for target in sorted(sel["target"].unique().to_list()):
            rows = pl.DataFrame(
                {
                    "selection_rank": range(1, len(picked) + 1),
                    "candidate_id": picked,
                    "source": "?",
                    "score": 0.0,
                    "rank": range(1, len(picked) + 1),
                    "best_subtask": None,
                    "shard": None,
                    "n_tokens": None,
                    "basis_fingerprint": None,
                }
            )
            store.stage_rows(target, EXTRA, budget, rows)
            store.publish_selection(target, EXTRA, {budget: rows.height})
        with store.get_connection() as conn:
            cells = set(conn.execute("SELECT DISTINCT target, method, budget FROM selections").fetchall())
        targets = sorted({t for t, _, _ in cells})
        seeds = run_config["ops"]["selection_evaluation"]["config"]["seeds"]

        result = dg.materialize([selection_evaluation], instance=instance, resources=resources, run_config=run_config)
        assert result.success
        first = _evaluations(root)
        expected = (
            {(t, m, b, s) for t, m, b in cells for s in seeds}
            | {(t, "full_pool", None, s) for t in targets for s in seeds}
            | {(t, "base", None, None) for t in targets}
        )
        assert set(zip(first["target"], first["method"], first["budget"], first["seed"], strict=False)) == expected
        assert first.height == len(expected)  # one row each
        assert all(math.isfinite(x) for x in first["heldout_loss"])
        assert first["accuracy"].null_count() == first.height  # embedded targets are not multiple choice
        assert (first["heldout_examples"] > 0).all()
        by = {(r["target"], r["method"], r["budget"], r["seed"]): r for r in first.to_dicts()}
        n_pool = len(pool_ids)
        for t in targets:
            assert by[(t, "base", None, None)]["train_examples"] == 0
            assert 0 < by[(t, "full_pool", None, 0)]["train_examples"] <= n_pool
            gist = by[(t, "gist", budget, 0)]
            assert gist["bytes_per_candidate"] > 0 and gist["feature_pass_seconds"] > 0
            assert by[(t, EXTRA, budget, 0)]["bytes_per_candidate"] is None  # no stored features for this method
            assert by[(t, "base", None, None)]["bytes_per_candidate"] is None
            # Fine-tuning on anything from the pool changes the model; the held-out set is the same for all.
            assert by[(t, "full_pool", None, 0)]["heldout_loss"] != by[(t, "base", None, None)]["heldout_loss"]
            assert len({r["heldout_examples"] for k, r in by.items() if k[0] == t}) == 1
            # Another seed is another fine-tune (order, LoRA init): another number, same training set size.
            assert gist["heldout_loss"] != by[(t, "gist", budget, 1)]["heldout_loss"]
            assert gist["train_examples"] == by[(t, "gist", budget, 1)]["train_examples"]
        mat = result.asset_materializations_for_node("selection_evaluation")[0]
        assert {"comparison", "summary", "heldout_loss_by_budget"} <= set(mat.metadata)
        assert (root / "evaluation" / "heldout_loss_by_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # One fine-tune per seed and distinct training set: the score-based methods' selections (two methods
        # that chose the same set share one), random per budget (its draw, like EXTRA, is shared by every
        # target), EXTRA, the full pool.
        n_budgets = len({b for _, _, b in cells})
        with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
            sets = db.execute(
                "SELECT target, method, budget, list(candidate_id ORDER BY candidate_id) FROM selections "
                "WHERE method NOT IN ('random', ?) GROUP BY 1, 2, 3",
                [EXTRA],
            ).fetchall()
        per_seed = len({tuple(ids) for *_, ids in sets}) + n_budgets + 1 + 1
        assert mat.metadata["fine_tunes"].value == per_seed * len(seeds)

        # The copy held the small run's evaluations: they were replaced, not appended to (one row each above),
        # and the fine-tunes they share (same config, same seeds) gave the same numbers.
        key = ["target", "method", "budget", "seed"]
        earlier = _evaluations(small_run["root"]).select(*key, "heldout_loss")
        shared = first.select(*key, "heldout_loss").join(earlier, on=key, how="inner", nulls_equal=True)
        assert shared.height == earlier.height > 0
        assert shared["heldout_loss"].to_list() == shared["heldout_loss_right"].to_list()


def test_no_heldout_examples_is_a_clear_error():
    tok = train_bpe_tokenizer(["<|user|>\nhello\n<|assistant|>\nworld"], vocab_size=300)
    targets = pl.DataFrame(
        {
            "target": ["a", "a"],
            "subtask": ["x", "x"],
            "prompt": ["p", "q"],
            "completion": ["c", "d"],
            "split": ["basis", "basis"],
        }
    )
    with pytest.raises(ValueError, match=r"\['a'\].*heldout_fraction > 0"):
        heldout_sets(targets, tok, 64)
