"""Parallel shards on one machine: the multiprocess fan-out job, and one GPU slot per concurrent step."""

import multiprocessing as mp
import shutil

import dagster as dg
import duckdb
import polars as pl

from gist_assets.run import materialize
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
    root, home, config = tiny_graph()  # the whole exact path, materialized
    monkeypatch.setenv("GIST_STORAGE_ROOT", str(root))  # the step processes build resources from it
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        shards = sorted(instance.get_dynamic_partitions("candidate_shards"))
        # Lose two shards' features (as after new data), then recompute the stale ones in parallel processes.
        redo = shards[:2]
        for shard in redo:
            shutil.rmtree(root / "features" / shard)
        job = dg.build_reconstructable_job("gist_assets.definitions", "parallel_features_job_def")
        result = dg.execute_job(job, instance=instance, run_config={"execution": {"config": {"max_concurrent": 2}}})
        assert result.success
        logs = [
            e
            for e in instance.all_logs(result.run_id)
            if e.dagster_event is not None and (e.dagster_event.step_key or "").startswith("shard_features[")
        ]
        starts = sorted(e.timestamp for e in logs if e.dagster_event.event_type_value == "STEP_START")
        ends = sorted(e.timestamp for e in logs if e.dagster_event.event_type_value == "STEP_SUCCESS")
        assert len(starts) == len(ends) == len(redo)  # only the stale shards ran
        assert starts[1] < ends[0]  # the two shard steps overlapped in time
        mats = instance.fetch_materializations(dg.AssetKey("candidate_features"), limit=1000).records
        assert {r.partition_key for r in mats if r.run_id == result.run_id} == set(redo)
        materialize(["candidate_scores"], config, instance, str(root))
    pool = pl.read_parquet(root / "pool" / "candidate_pool.parquet")
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT target, count(*), count(DISTINCT candidate_id) FROM candidate_scores "
            "WHERE method = 'gist' GROUP BY 1"
        ).fetchall()
    assert rows and all(n == distinct == pool.height for _, n, distinct in rows)
