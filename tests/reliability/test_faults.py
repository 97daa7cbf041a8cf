"""Reliability matrix, faults: a killed step, a failed write, a transient error, a repeated materialization.
Nothing is half-written, a re-run finishes the job, and the same inputs give the same bytes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from gist_assets.baselines import BASELINE_METHODS
from gist_assets.steps import RECOMPUTE_TAG
from gist_resources import ArtifactStore, ComputeResource, ScoreStore, files
from gist_resources.files import FOREIGN_SCRATCH_STALE_S, _host
from gist_resources.score_store import ScoreStoreWriteError
from reliability_util import copy_root, fresh_instance, materialize, metadata, user_error
from small_config import SMALL

REPO = Path(__file__).resolve().parents[2]
FEATURE_FOLDERS = ("features", "features_gist_sketch", "features_less", "features_representation")

KILLABLE_SHARD = """
import sys
import dagster as dg
from gist_assets.definitions import make_resources
from gist_assets.features import candidate_gradient_pass
from gist_resources import ComputeResource

root, shard, shards = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
resources = make_resources(root)
resources["compute"] = ComputeResource(max_batch_size=2)  # many small batches: a long window to kill in
with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("candidate_shards", shards)
    dg.materialize(
        [candidate_gradient_pass], selection=["candidate_features"], instance=instance, resources=resources,
        partition_key=shard,
    )
"""


def _included(root: Path, shards) -> set[str]:
    ids = set()
    for shard in shards:
        side = pl.read_parquet(root / "features" / shard / "candidates.parquet")
        ids |= set(side.filter(pl.col("included"))["candidate_id"].to_list())
    return ids


def test_sigkill_mid_shard_then_rerun_scores_every_candidate_once(small_run, tmp_path, monkeypatch):
    root = copy_root(small_run["root"], tmp_path / "root")
    shards = sorted(small_run["shards"])
    shard = shards[0]
    features = root / "features"
    before = (features / shard / "features.safetensors").read_bytes()
    import shutil

    shutil.rmtree(features / shard)  # the shard has not been computed yet
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_SHARD, str(root), shard, ",".join(shards)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:  # wait until the step is computing gradients, then kill it
            seen.append(line)
            if f"{shard}/epoch_1: " in line and "examples" in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert not (features / shard).exists()  # nothing half-written where the shard belongs

    # What a killed writer leaves when it dies while swapping in its directory (scratch named by host and pid),
    # and the older scratch naming: the next write of the same shard removes both.
    leftovers = [features / f".{shard}.{_host()}-{proc.pid}-0123abcd.tmp", features / f".{shard}.89abcdef.tmp"]
    for d in leftovers:
        d.mkdir()
        (d / "features.safetensors").write_bytes(b"half")

    with dg.DagsterInstance.get() as instance:
        assert set(instance.get_dynamic_partitions("candidate_shards")) == set(shards)
        rerun = materialize(["candidate_features"], root, instance, partition_key=shard)
        assert rerun.success, user_error(rerun)
        scores = materialize(["candidate_scores"], root, instance)
        assert scores.success, user_error(scores)
    assert not any(d.exists() for d in leftovers)
    assert sorted(p.name for p in features.iterdir()) == shards  # no scratch of any shard left
    assert (features / shard / "features.safetensors").read_bytes() == before

    included = _included(root, shards)
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT target, method, count(*), count(DISTINCT candidate_id) FROM candidate_scores GROUP BY 1, 2"
        ).fetchall()
        gist_ids = {
            r[0]
            for r in db.execute("SELECT DISTINCT candidate_id FROM candidate_scores WHERE method = 'gist'").fetchall()
        }
    assert {r[1] for r in rows} == {"gist", "gist_sketch", "random", "less", "representation"}
    assert all(r[2] == r[3] == len(included) for r in rows), rows  # exactly one row per candidate
    assert gist_ids == included


def test_stale_scratch_is_removed_live_and_foreign_scratch_is_kept(tmp_path):
    storage = ArtifactStore(root=str(tmp_path))
    dest = storage.features_location("gist", "shard-0000")
    parent = dest.parent
    parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    names = {
        "dead_writer": f".shard-0000.{host}-{dead.pid}-0123abcd.tmp",
        "dead_writer_old": f".shard-0000.{host}-{dead.pid}-0123abce.old",
        "legacy": ".shard-0000.0123abcd.tmp",
        "live_writer": f".shard-0000.{host}-{os.getppid()}-0123abcd.tmp",
        "other_host_recent": ".shard-0000.otherhost-1-0123abcd.tmp",
        "other_host_old": ".shard-0000.otherhost-2-0123abcd.tmp",
        "other_destination": f".shard-0001.{host}-{dead.pid}-0123abcd.tmp",
        "not_a_scratch": ".shard-0000.notes.tmp",
    }
    for name in names.values():
        (parent / name).mkdir()
    old = time.time() - FOREIGN_SCRATCH_STALE_S - 60
    os.utime(parent / names["other_host_old"], (old, old))
    with files.atomic_dir(dest) as tmp:
        assert tmp.name.startswith(f".shard-0000.{host}-{os.getpid()}-") and tmp.name.endswith(".tmp")
        (tmp / "x").write_text("complete")
    left = {k for k, n in names.items() if (parent / n).exists()}
    assert left == {"live_writer", "other_host_recent", "other_destination", "not_a_scratch"}
    assert (dest / "x").read_text() == "complete"


def _rows(n: int, shift: float = 0.0) -> pl.DataFrame:
    score = [i / n - shift for i in range(n)]
    return pl.DataFrame(
        {
            "candidate_id": [f"c{i:04d}" for i in range(n)],
            "source": ["s"] * n,
            "score": score,
            "best_subtask": ["a"] * n,
            "shard": ["x-0000"] * n,
            "n_tokens": [10] * n,
            "basis_fingerprint": ["f"] * n,
            "subtask_scores": [[v] for v in score],
        }
    )


def _write(store: ScoreStore, sets: dict[str, pl.DataFrame], fail_after: int | None = None) -> None:
    with store.write_scores("gist") as writer:
        for i, (target, rows) in enumerate(sets.items()):
            if i == fail_after:
                raise KeyboardInterrupt  # the run is stopped half way through the set
            writer.add(target, rows, ["a"])


@pytest.mark.parametrize("broken", ["interrupted", "null_score", "commit"])
def test_failed_score_write_leaves_previous_rows_intact(tmp_path, broken, monkeypatch):
    store = ScoreStore(database=str(tmp_path / "scores.duckdb"))
    _write(store, {"t": _rows(200), "u": _rows(50)})
    before = (store.read_scores("t", "gist"), store.read_subtask_scores("t", "gist"))
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    new = {"t": _rows(300, shift=0.5), "v": _rows(10)}
    if broken == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            _write(store, new, fail_after=1)
    elif broken == "null_score":
        new["v"] = new["v"].with_columns(
            pl.when(pl.arange(0, 10) == 5).then(None).otherwise(pl.col("score")).alias("score")
        )
        with pytest.raises(ValueError, match="target 'v' have null values {'score': 1}"):
            _write(store, new)
    else:  # the DuckDB transaction that swaps the set in fails
        calls, create_views = [], ScoreStore._create_views

        def fail_in_commit(self, conn):  # the first call is the connection's own setup
            calls.append(1)
            create_views(self, conn) if len(calls) == 1 else conn.execute("SELECT no_such_column")

        monkeypatch.setattr(ScoreStore, "_create_views", fail_in_commit)
        with pytest.raises(ScoreStoreWriteError, match="rolled back; the previous scores are unchanged") as err:
            _write(store, new)
        assert str(tmp_path / "scores.duckdb") in str(err.value)
        monkeypatch.undo()
    assert store.read_scores("t", "gist").equals(before[0])  # all 200 old rows, none of the new
    assert store.read_subtask_scores("t", "gist").sort("candidate_id").equals(before[1].sort("candidate_id"))
    assert store.read_scores("u", "gist").height == 50 and store.read_scores("v", "gist").height == 0
    # Nothing of the failed write is left on disk.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet")) == files_before
    # The store is usable afterwards: a good write replaces the whole set.
    _write(store, {"t": _rows(300, shift=0.5)})
    assert store.read_scores("t", "gist").height == 300 and store.read_scores("u", "gist").height == 0
    assert len(list(store.method_dir("gist").iterdir())) == 1


def test_publish_refuses_staged_rows_another_run_changed(tmp_path):
    """Two selection runs at once (no writer pool configured): when the staged rows are not the ones this run
    counted, the publish fails and the published selection stays; a clean stage then publishes."""
    store = ScoreStore(database=str(tmp_path / "scores.duckdb"))
    _write(store, {"t": _rows(200)})

    def published() -> list[tuple]:
        with store.get_connection() as conn:
            return conn.execute("SELECT budget, count(*) FROM selections GROUP BY budget ORDER BY 1").fetchall()

    store.stage_top("t", "gist", "n10", 10)
    store.publish_selection("t", "gist", {"n10": 10})
    assert published() == [("n10", 10)]
    store.stage_top("t", "gist", "n20", 20)
    store.stage_top("t", "gist", "n20", 30)  # the other run restaged the same budget meanwhile
    with pytest.raises(ScoreStoreWriteError, match=r"changed while they were exported.*staged \{'n20': 20\}"):
        store.publish_selection("t", "gist", {"n20": 20})
    assert published() == [("n10", 10)]
    store.drop_staged("t", "gist")
    with pytest.raises(ScoreStoreWriteError, match="found {}"):  # the other run's publish took the rows away
        store.publish_selection("t", "gist", {"n20": 20})
    assert published() == [("n10", 10)]
    store.stage_top("t", "gist", "n20", 20)
    store.publish_selection("t", "gist", {"n20": 20})
    assert published() == [("n20", 20)]
    with store.get_connection() as conn:
        assert conn.execute("SELECT count(*) FROM selection_staging").fetchone()[0] == 0


class FlakyCompute(ComputeResource):
    """Fails the first model load (as a transient CUDA OOM or a busy file system would), then works."""

    fail_marker: str

    def load_model(
        self,
        path: str,
        adapter_dir: str | None = None,
        produced_by: str = "warmup_checkpoint",
        partition: str | None = None,
    ):
        marker = Path(self.fail_marker)
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("simulated transient failure: CUDA out of memory")
        return super().load_model(path, adapter_dir, produced_by, partition)


def test_transient_gradient_failure_is_retried_without_duplicate_output(small_run, tmp_path):
    root = copy_root(small_run["root"], tmp_path / "root")
    shard = sorted(small_run["shards"])[1]
    original = {
        n: (small_run["root"] / "features" / shard / n).read_bytes()
        for n in ("features.safetensors", "candidates.parquet")
    }
    flaky = FlakyCompute(fail_marker=str(tmp_path / "failed_once"))
    with fresh_instance(small_run["shards"]) as instance:
        result = materialize(["candidate_features"], root, instance, partition_key=shard, resources={"compute": flaky})
    assert result.success, user_error(result)
    kinds = [e.event_type_value for e in result.all_events]
    assert kinds.count("STEP_UP_FOR_RETRY") == 1 and kinds.count("STEP_RESTARTED") == 1, kinds
    assert kinds.count("STEP_FAILURE") == 0 and kinds.count("STEP_SUCCESS") == 1
    assert len(result.get_asset_materialization_events()) == 1
    assert (tmp_path / "failed_once").exists()
    folder = root / "features" / shard
    assert sorted(p.name for p in folder.iterdir()) == ["candidates.parquet", "features.safetensors", "meta.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{shard}.")]
    side = pl.read_parquet(folder / "candidates.parquet")
    assert side["candidate_id"].n_unique() == side.height == metadata(result, "candidate_features")["candidates"]
    for name, data in original.items():  # the same bytes as the first (never retried) computation
        assert (folder / name).read_bytes() == data, name


def test_same_inputs_same_seed_same_bytes_per_asset(small_run, tmp_path):
    # Inputs, materialized twice (the pool records each row's file path, so the same root): same Parquet bytes.
    inputs = tmp_path / "inputs"
    ops = {"candidate_pool": {"embedded_pool_size": 120, "shard_size": 40}}
    outputs = []
    for _ in range(2):
        with fresh_instance() as instance:
            result = materialize(["candidate_pool", "target_sets"], inputs, instance, ops)
            assert result.success, user_error(result)
        shards = json.loads((inputs / "pool" / "shards.json").read_text())
        outputs.append(
            {
                **{
                    rel: (inputs / rel).read_bytes()
                    for rel in ("pool/candidate_pool.parquet", "targets/target_sets.parquet")
                },
                "versions": (shards["version"], shards["shards"]),
            }
        )  # ("files" holds mtimes)
    assert outputs[0] == outputs[1]

    # Every asset after the inputs and the base model, re-materialized in graph order over a copy of the small
    # run with its config: the same bytes in every file it writes and the same rows (by induction, the whole
    # graph is reproducible). Manifests and metadata files hold timings, so they are left out.
    src = small_run["root"]
    root = copy_root(src, tmp_path / "again")
    shard = sorted(small_run["shards"])[2]
    ops = {name: entry["config"] for name, entry in SMALL["ops"].items()}
    ops["candidate_scores"] = {"methods": ["gist", "gist_sketch"]}
    ops["baseline_selections"] = ops["selected_subset"]  # as the CLI does (CONFIG_FALLBACKS)
    with fresh_instance(small_run["shards"]) as instance:
        for names, partition, tags in (
            (["warmup_checkpoint"], None, None),
            (["target_gradients"], None, {RECOMPUTE_TAG: "all"}),  # not carried over: computed again
            (["spectral_basis"], None, None),
            (
                ["candidate_features", "candidate_sketches", "less_candidate_features", "representation_features"],
                shard,
                None,
            ),
            (["candidate_scores", "selected_subset", "baseline_scores", "baseline_selections"], None, None),
        ):
            result = materialize(names, root, instance, ops, partition_key=partition, tags=tags)
            assert result.success, user_error(result)
            if "target_gradients" in names:
                assert metadata(result, "target_gradients")["carried_over"] == []
    written = {"warmup", "target_gradients", "basis", "selections"}  # scores: compared as rows below
    written |= {f"{folder}/{shard}" for folder in FEATURE_FOLDERS}
    compared = [
        p.relative_to(src)
        for folder in sorted(written)
        for p in (src / folder).rglob("*")
        if p.is_file() and p.name not in ("manifest.json", "meta.json", "README.md")
    ]
    assert {p.parts[0] for p in compared} >= {"warmup", "target_gradients", "basis", "selections"}, compared
    for rel in compared:
        again = root / rel
        assert again.stat().st_mtime_ns != (src / rel).stat().st_mtime_ns, f"{rel} was not written again"
        if rel.name == "adapter_config.json":  # PEFT records where the base model was loaded from
            mine, theirs = (json.loads(f.read_text()) for f in (again, src / rel))
            assert mine.pop("base_model_name_or_path") == str(root / "models" / "base_model")
            theirs.pop("base_model_name_or_path")
            assert mine == theirs, rel
        else:
            assert again.read_bytes() == (src / rel).read_bytes(), rel
    with (
        duckdb.connect(str(src / "gist.duckdb"), read_only=True) as a,
        duckdb.connect(str(root / "gist.duckdb"), read_only=True) as b,
    ):
        for query in (
            "SELECT candidate_id, target, method, score, rank, best_subtask FROM candidate_scores ORDER BY ALL",
            "SELECT * FROM selections ORDER BY ALL",
        ):
            assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_failed_export_keeps_the_published_selections_and_a_rerun_finishes(small_run, tmp_path, monkeypatch):
    """A new selection (other budgets) that fails in its exports (disk full in the second budget of the first
    (target, method); the first budget's files are written by then) leaves the published selections table and
    every selection file as they were; the re-run publishes each new selection once and leaves nothing staged."""
    root = copy_root(small_run["root"], tmp_path / "root")
    store = ScoreStore(database=str(root / "gist.duckdb"))
    assert SMALL["ops"]["selected_subset"]["config"]["fraction"] == [0.05, 0.1]
    config = {"selected_subset": {"fraction": [0.02, 0.1]}}

    def published() -> pl.DataFrame:
        with store.get_connection() as conn:
            return conn.sql("SELECT * FROM selections ORDER BY target, method, budget, rank").pl()

    def staged_rows() -> int:
        with store.get_connection() as conn:
            return conn.execute("SELECT count(*) FROM selection_staging").fetchone()[0]

    def selection_files() -> dict:
        return {p.relative_to(root): p.read_bytes() for p in (root / "selections").rglob("*") if p.is_file()}

    rows_before, files_before = published(), selection_files()
    assert rows_before.height and staged_rows() == 0
    exports, export = [], ScoreStore.staged_with_file_columns

    def disk_full_on_the_second(self, target, method, *args, **kwargs):
        exports.append((target, method))
        if len(exports) == 2:
            raise OSError(28, "No space left on device (simulated)")
        return export(self, target, method, *args, **kwargs)

    monkeypatch.setattr(ScoreStore, "staged_with_file_columns", disk_full_on_the_second)
    with fresh_instance() as instance:
        failed = materialize(["selected_subset"], root, instance, ops=config, checks=False)
    assert "No space left on device" in user_error(failed)
    assert exports[0] == exports[1] and staged_rows() == 0  # both budgets of one selection, dropped unpublished
    assert published().equals(rows_before)
    assert selection_files() == files_before  # the first budget's new files were not swapped in
    monkeypatch.undo()

    with fresh_instance() as instance:
        result = materialize(["selected_subset"], root, instance, ops=config)
    assert result.success, user_error(result)
    assert staged_rows() == 0
    gist_methods = ~pl.col("method").is_in(BASELINE_METHODS)  # baseline_selections' rows are not rewritten here
    after, before = published().filter(gist_methods), rows_before.filter(gist_methods)
    assert set(after["method"]) == {"gist", "gist_sketch"} and set(after["budget"]) == {"p0.02", "p0.1"}
    assert not after.select("target", "method", "budget", "candidate_id").is_duplicated().any()
    assert after.filter(pl.col("budget") == "p0.1").equals(before.filter(pl.col("budget") == "p0.1"))
    for _, rows in after.group_by("target", "method"):
        assert rows.filter(pl.col("budget") == "p0.02")["rank"].to_list() == list(range(1, rows.height // 6 + 1))
