"""A target removed from the configuration leaves no selection behind: not in DuckDB, not on disk, not in the CLI."""

import duckdb

from gist_assets.run import current_selections
from reliability_util import copy_root, fresh_instance, materialize, user_error


def test_removed_target_leaves_no_selections(custom_graph, tmp_path):
    root = copy_root(custom_graph["root"], tmp_path / "root")
    assert set(current_selections(str(root))) == {"mixed", "single"}
    ops = {
        **custom_graph["ops"],
        "target_sets": {
            **custom_graph["ops"]["target_sets"],
            "targets": custom_graph["ops"]["target_sets"]["targets"][1:],
        },
    }
    assert [t["name"] for t in ops["target_sets"]["targets"]] == ["mixed"]
    with fresh_instance(custom_graph["shards"]) as instance:
        for names, partition in (
            (["target_sets", "target_gradients", "spectral_basis"], None),
            (["candidate_features"], custom_graph["shards"][0]),
            (["candidate_scores", "selected_subset"], None),
        ):
            result = materialize(names, root, instance, ops, partition_key=partition)
            assert result.success, user_error(result)
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        assert db.execute("SELECT DISTINCT target FROM selections").fetchall() == [("mixed",)]
        assert db.execute("SELECT DISTINCT target FROM candidate_scores").fetchall() == [("mixed",)]
    assert not (root / "selections" / "single").exists()
    assert (root / "selections" / "mixed" / "gist" / "p0.1" / "selection.messages.jsonl").exists()
    assert list(current_selections(str(root))) == ["mixed"]
    meta = result.asset_materializations_for_node("selected_subset")[0].metadata
    assert meta["removed_unconfigured"].value == ["single/gist"]
