"""Staleness the UI shows: data versions follow config, so changing k or the warmup marks the right assets."""

import dagster as dg
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from gist_assets.definitions import ASSETS
from gist_assets.run import materialize


def _status(instance, shards):
    resolver = get_stale_status_resolver(instance, ASSETS)
    out = {}
    for assets_def, key in ((a, k) for a in ASSETS for k in a.keys):
        name = key.to_user_string()
        if assets_def.partitions_def is not None:
            out[name] = {resolver.get_status(key, s) for s in shards}
        else:
            out[name] = {resolver.get_status(key)}
    return out


def test_changing_k_and_warmup_marks_exactly_what_depends_on_them(tiny_graph):
    built, home, config = tiny_graph()  # the whole exact path, materialized
    root = str(built)
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        shards = instance.get_dynamic_partitions("candidate_shards")
        fresh = {StaleStatus.FRESH}
        status = _status(instance, shards)
        for name in [
            "candidate_pool",
            "target_sets",
            "base_model",
            "warmup_checkpoint",
            "target_gradients",
            "spectral_basis",
            "candidate_features",
            "candidate_scores",
            "selected_subset",
        ]:
            assert status[name] == fresh, (name, status[name])

        # Same config again: same data version, nothing downstream turns stale.
        materialize(["spectral_basis"], config, instance, root)
        status = _status(instance, shards)
        assert status["candidate_features"] == fresh and status["selected_subset"] == fresh

        # A new k: the basis and everything below it are stale; the pool, warmup and gradients are not.
        materialize(["spectral_basis"], {"ops": {"spectral_basis": {"config": {"k": 4}}}}, instance, root)
        status = _status(instance, shards)
        for name in ["candidate_pool", "base_model", "warmup_checkpoint", "target_gradients", "spectral_basis"]:
            assert status[name] == fresh, (name, status[name])
        assert status["candidate_features"] == {StaleStatus.STALE}  # every shard partition
        assert status["candidate_scores"] == {StaleStatus.STALE}  # it reads the basis directly too
        # Dagster marks direct dependents only: the selection turns stale once the scores change.
        assert status["selected_subset"] == fresh
        for shard in shards:
            materialize(["candidate_features"], config, instance, root, partition=shard)
        materialize(["candidate_scores"], config, instance, root)
        status = _status(instance, shards)
        assert status["candidate_features"] == fresh and status["candidate_scores"] == fresh
        assert status["selected_subset"] == {StaleStatus.STALE}

        # A new warmup: the target gradients (and the basis after them) are stale, the pool is not.
        materialize(
            ["warmup_checkpoint"],
            {"ops": {"warmup_checkpoint": {"config": {"fraction": 0.1, "epochs": 1}}}},
            instance,
            root,
        )
        status = _status(instance, shards)
        assert status["candidate_pool"] == fresh and status["base_model"] == fresh
        assert status["target_gradients"] == {StaleStatus.STALE}
        assert status["spectral_basis"] == fresh  # until the gradients are re-materialized
        materialize(["target_gradients"], config, instance, root)
        assert _status(instance, shards)["spectral_basis"] == {StaleStatus.STALE}
