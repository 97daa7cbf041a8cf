"""Parallel shards on one machine: the multiprocess fan-out job, and one GPU slot per concurrent step."""

import multiprocessing as mp
import shutil

import dagster as dg
import duckdb
import polars as pl

from gist_assets.parallel import FanOutConfig, due_shards
from gist_assets.run import materialize, plan_stage, with_storage
from gist_resources import ArtifactStore
from gist_resources.devices import claim_slot


def _claim(lock_dir, n, queue, hold):
    queue.put(claim_slot(n, lock_dir))
    hold.wait(30)


def test_concurrent_processes_get_different_gpu_slots(tmp_path):
    ctx = mp.get_context("spawn")
    queue, hold = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), 2, queue, hold)) for _ in range(2)]
    for p in procs:
        p.start()
    slots = sorted(queue.get(timeout=60) for _ in procs)
    hold.set()
    for p in procs:
        p.join(30)
    assert slots == [0, 1]
    assert claim_slot(2, str(tmp_path)) in (0, 1)  # slots are free again once the holders exit


def test_multiprocess_fan_out_scores_every_candidate_once(tiny_graph, monkeypatch):
    root, home, config = tiny_graph()  # the whole exact path, materialized; no sketches yet
    monkeypatch.setenv("GIST_STORAGE_ROOT", str(root))  # the step processes build resources from it
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        shards = sorted(instance.get_dynamic_partitions("candidate_shards"))
        # Lose two shards' features (as after new data), then compute what is due in parallel processes: the
        # features of those two and (default methods: gist and gist_sketch) every shard's sketches.
        redo = shards[:2]
        for shard in redo:
            shutil.rmtree(root / "features" / shard)
        job = dg.build_reconstructable_job("gist_assets.definitions", "parallel_features_job_def")
        result = dg.execute_job(job, instance=instance, run_config={"execution": {"config": {"max_concurrent": 2}}})
        assert result.success
        logs = [
            e
            for e in instance.all_logs(result.run_id)
            if e.dagster_event is not None and (e.dagster_event.step_key or "").startswith("shard_gradient_pass[")
        ]
        starts = sorted(e.timestamp for e in logs if e.dagster_event.event_type_value == "STEP_START")
        ends = sorted(e.timestamp for e in logs if e.dagster_event.event_type_value == "STEP_SUCCESS")
        assert len(starts) == len(ends) == len(shards)  # one step per shard, its due assets from one pass
        assert starts[1] < ends[0]  # two shard steps overlapped in time
        made = {
            asset: {
                r.partition_key
                for r in instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
                if r.run_id == result.run_id
            }
            for asset in ("candidate_features", "candidate_sketches")
        }
        assert made == {"candidate_features": set(redo), "candidate_sketches": set(shards)}
        storage = ArtifactStore(root=str(root))
        assert due_shards(storage, shards, FanOutConfig())[0] == {}  # nothing left to do
        assert due_shards(storage, shards, FanOutConfig(methods=["gist"], all_shards=True))[0] == {
            s: [dg.AssetKey("candidate_features")] for s in shards
        }
        # Sketches of another projection: every shard is due, made with the asked projection; then the CLI's
        # planner reads what the shards were made with, not the fan-out run's config (which names no sketches).
        small = {
            "execution": {"config": {"max_concurrent": 2}},
            "ops": {"shards_to_compute": {"config": {"sketches": {"dim": 64}}}},
        }
        assert due_shards(storage, shards, FanOutConfig(sketches={"dim": 64}))[0] == {
            s: [dg.AssetKey("candidate_sketches")] for s in shards
        }
        assert dg.execute_job(job, instance=instance, run_config=small).success
        assert due_shards(storage, shards, FanOutConfig())[0] == {}  # None: keep the pool's projection (64)
        file_64 = with_storage({"ops": {"candidate_sketches": {"config": {"dim": 64}}}}, str(root))
        plan = plan_stage(instance, "features_job", file_64, shards[0])
        assert "candidate_sketches" in plan.fresh and "candidate_features" in plan.fresh, plan
        plan = plan_stage(
            instance, "features_job", with_storage(with_methods(config, ["gist", "gist_sketch"]), str(root)), shards[0]
        )
        assert plan.run == ["candidate_sketches"] and plan.reasons["candidate_sketches"] == (
            "config changed: dim 64 -> 16384"
        )
        materialize(["candidate_scores"], with_methods(config, ["gist", "gist_sketch"]), instance, str(root))
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet")
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT method, target, count(*), count(DISTINCT candidate_id) FROM candidate_scores GROUP BY 1, 2"
        ).fetchall()
    assert {m for m, *_ in rows} == {"gist", "gist_sketch"}
    assert all(n == distinct == pool.height for _, _, n, distinct in rows)


def with_methods(config: dict, methods: list[str]) -> dict:
    return {"ops": {**config["ops"], "candidate_scores": {"config": {"methods": methods}}}}
