"""A storage root copied or restored elsewhere reads its own artifacts: manifests hold paths relative to the
root. The old root is deleted before the rerun, so any read through a recorded path would fail."""

import shutil

import pytest

from reliability_util import fresh_instance, materialize, user_error
from small_config import SMALL


@pytest.mark.slow
def test_copied_root_reruns_downstream_assets_from_the_new_place(custom_graph, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    ops = {
        **custom_graph["ops"],
        "base_model": SMALL["ops"]["base_model"]["config"],
        "warmup_checkpoint": {**SMALL["ops"]["warmup_checkpoint"]["config"], "fraction": 0.5},
    }
    downstream = ["target_gradients", "spectral_basis", "candidate_scores", "selected_subset"]
    with fresh_instance() as instance:

        def run(root):
            first = materialize(["target_gradients", "spectral_basis"], root, instance, ops)
            assert first.success, user_error(first)
            for shard in sorted(instance.get_dynamic_partitions("candidate_shards")):
                feats = materialize(["candidate_features"], root, instance, partition_key=shard)
                assert feats.success, user_error(feats)
            last = materialize(["candidate_scores", "selected_subset"], root, instance, ops)
            assert last.success, user_error(last)
            return last

        built = materialize(["candidate_pool", "target_sets", "base_model", "warmup_checkpoint"], old, instance, ops)
        assert built.success, user_error(built)
        run(old)
        shutil.copytree(old, new)
        shutil.rmtree(old)
        rerun = run(new)
    assert not old.exists()
    assert {e.asset_key.to_user_string() for e in rerun.get_asset_materialization_events()} >= set(downstream[2:])
    # What the rerun wrote names no path of the old place. base_model and warmup_checkpoint (not rerun here;
    # PEFT's adapter_config.json too) still record absolute paths: the readers rebuild those from names.
    for path in new.rglob("*.json"):
        rel = str(path.relative_to(new))
        if rel.startswith(("models/", "warmup/")):
            continue
        assert str(old) not in path.read_text(encoding="utf-8"), rel
    import json

    manifest = json.loads((new / "selections" / "mixed" / "gist" / "p0.1" / "manifest.json").read_text())
    assert manifest["files"]["jsonl"] == "selections/mixed/gist/p0.1/selection.jsonl"
    assert manifest["model"] == "models/base_model" and manifest["artifacts"]["database"] == "gist.duckdb"
    assert all((new / c["dir"]).is_dir() for c in manifest["checkpoints"])
