"""selection_evaluation on the small graph: one row per (target, method) plus the references, no duplicates."""

import math
import random
import shutil

import dagster as dg
import duckdb
import polars as pl
import pytest
import torch

from gist_assets.definitions import make_resources
from gist_assets.evaluation import heldout_sets, selection_evaluation
from gist_core.modeling import train_bpe_tokenizer


EXTRA = "random_sample"  # a second method, added straight to DuckDB, the same for every target


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and loses much when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _evaluations(root):
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        return db.sql("SELECT * FROM evaluations").pl()


def test_selection_evaluation(small_run, tmp_path, one_thread):
    # A copy of the shared small run, so the extra method below does not leak into other tests.
    root = tmp_path / "copy"
    shutil.copytree(small_run["root"], root)
    resources = make_resources(str(root))
    run_config = {"ops": {"selection_evaluation": {"config": {"epochs": 1, "include_full_pool": True}}}}
    with dg.instance_for_test() as instance:
        store = resources["score_store"]
        with store.get_connection() as conn:
            sel = conn.sql("SELECT * FROM selections").pl()
        # Another method, as a baseline would write it: the evaluation reads methods, never hard-codes them.
        pool_ids = sorted(pl.read_parquet(root / "pool" / "candidate_pool.parquet")["candidate_id"].to_list())
        picked = random.Random(0).sample(pool_ids, sel.filter(pl.col("target") == sel["target"][0]).height)
        for target in sorted(sel["target"].unique().to_list()):
            store.replace_selection(target, EXTRA, pl.DataFrame({
                "target": target, "method": EXTRA, "candidate_id": picked, "rank": range(1, len(picked) + 1),
                "score": 0.0, "source": "?"}))
        with store.get_connection() as conn:
            pairs = set(conn.execute("SELECT DISTINCT target, method FROM selections").fetchall())
        targets = sorted({t for t, _ in pairs})

        result = dg.materialize([selection_evaluation], instance=instance, resources=resources,
                                run_config=run_config)
        assert result.success
        first = _evaluations(root)
        expected = pairs | {(t, m) for t in targets for m in ("base", "full_pool")}
        assert set(zip(first["target"], first["method"])) == expected
        assert first.height == len(expected)  # one row each
        assert all(math.isfinite(x) for x in first["heldout_loss"])
        assert first["accuracy"].null_count() == first.height  # embedded targets are not multiple choice
        assert (first["heldout_examples"] > 0).all()
        by = {(r["target"], r["method"]): r for r in first.to_dicts()}
        n_pool = len(pool_ids)
        for t in targets:
            assert by[(t, "base")]["train_examples"] == 0
            assert 0 < by[(t, "full_pool")]["train_examples"] <= n_pool
            assert by[(t, "gist")]["bytes_per_candidate"] > 0 and by[(t, "gist")]["feature_pass_seconds"] > 0
            assert by[(t, EXTRA)]["bytes_per_candidate"] is None  # no stored features for this method
            assert by[(t, "base")]["bytes_per_candidate"] is None
            # Fine-tuning on anything from the pool changes the model; the held-out set is the same for all.
            assert by[(t, "full_pool")]["heldout_loss"] != by[(t, "base")]["heldout_loss"]
            assert len({by[(t, m)]["heldout_examples"] for m in ("base", "full_pool", "gist")}) == 1
        mat = result.asset_materializations_for_node("selection_evaluation")[0]
        assert "comparison" in mat.metadata and "heldout_loss_chart" in mat.metadata
        # One fine-tune per distinct training set (random and EXTRA are the same for every target) + full pool.
        with store.get_connection() as conn:
            sets = {tuple(sorted(ids)) for (ids,) in conn.execute(
                "SELECT list(candidate_id) FROM selections GROUP BY target, method").fetchall()}
        assert mat.metadata["fine_tunes"].value == len(sets) + 1

        # Again: the table is replaced, not appended to; same seed, same numbers.
        assert dg.materialize([selection_evaluation], instance=instance, resources=resources,
                              run_config=run_config).success
        second = _evaluations(root)
        assert second.height == first.height
        key = ["target", "method"]
        assert second.sort(key).select(*key, "heldout_loss").equals(first.sort(key).select(*key, "heldout_loss"))


def test_no_heldout_examples_is_a_clear_error():
    tok = train_bpe_tokenizer(["<|user|>\nhello\n<|assistant|>\nworld"], vocab_size=300)
    targets = pl.DataFrame({"target": ["a", "a"], "subtask": ["x", "x"], "prompt": ["p", "q"],
                            "completion": ["c", "d"], "split": ["basis", "basis"]})
    with pytest.raises(ValueError, match=r"\['a'\].*heldout_fraction > 0"):
        heldout_sets(targets, tok, 64)
