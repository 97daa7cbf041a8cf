"""The product as a user runs it: the CLI, `make ui` (webserver + daemon), runs launched through the UI's
GraphQL, re-execution of CLI runs, and a refresh fired by the daemon on a PostgreSQL-backed instance."""

import json
import os
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from gist_demo import synthetic
from gist_resources.files import MODEL_CACHE_ENV
from service_util import LOCATION, REPO, graphql, make_ui, postgres_bin, postgres_server, run_cli, wait_run
from small_config import TINY, TINY_EXACT, two_file_pool, write_jsonl

LAUNCH = """
mutation($p: ExecutionParams!) {
  launchRun(executionParams: $p) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
  }
}"""
REEXECUTE = """
mutation($id: String!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $id, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId jobName } }
    ... on PythonError { message }
  }
}"""
CLI_RUNS = """
query($job: String!) {
  runsOrError(filter: {pipelineName: $job, tags: [{key: "gist/launched_by", value: "cli"}]}) {
    ... on Runs { results { runId jobName status } }
  }
}"""
START_SENSOR = """
mutation($s: SensorSelector!) {
  startSensor(sensorSelector: $s) { __typename ... on Sensor { sensorState { status } } ... on PythonError { message } }
}"""
MATERIALIZATIONS = """
query($key: [String!]!, $partitions: [String!]) {
  assetOrError(assetKey: {path: $key}) {
    ... on Asset { assetMaterializations(partitions: $partitions, limit: 20) { timestamp partition runId } }
  }
}"""


def _env(tmp_path: Path, **extra) -> dict:
    # The suite's embedded-model cache stays (conftest), so a service test does not pretrain again.
    env = {k: v for k, v in os.environ.items() if k == MODEL_CACHE_ENV or not k.startswith(("DAGSTER_", "GIST_"))}
    return {
        **env,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "GIST_STORAGE_ROOT": str(tmp_path / "root"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }


def _assets_lines(stdout: str) -> dict[str, str]:
    block = stdout.split("=== assets ===", 1)[1].split("===", 1)[0]
    return dict(line.strip().split(": ", 1) for line in block.strip().splitlines())


@pytest.mark.slow
def test_cli_reruns_only_what_changed_and_the_ui_launches_and_reexecutes(tmp_path):
    config = tmp_path / "run.yaml"
    run = {"ops": {**TINY["ops"], "candidate_pool": two_file_pool(tmp_path / "input")}}  # 4 shards
    config.write_text(yaml.safe_dump(run))
    env = _env(tmp_path)

    first = run_cli(env, "--config", str(config))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (tmp_path / "home" / "dagster.yaml").read_text().count("enabled: false") == 1  # telemetry off

    # Nothing changed: nothing runs.
    start = time.perf_counter()
    again = run_cli(env, "--config", str(config))
    wall = time.perf_counter() - start
    assert again.returncode == 0, again.stderr[-4000:]
    lines = _assets_lines(again.stdout)
    assert "recomput" not in again.stdout, again.stdout
    partitioned = {"candidate_features", "candidate_sketches"}
    assert all(v.startswith("up to date") for k, v in lines.items() if k not in partitioned), lines
    assert all(lines[k] == "4 shards up to date" for k in partitioned), lines
    assert wall < 15, f"a rerun with nothing to do took {wall:.1f}s"

    # Only the selection's budget changed: only the selection recomputes.
    changed = {"ops": {**run["ops"], "selected_subset": {"config": {"fraction": 0.2}}}}
    config.write_text(yaml.safe_dump(changed))
    third = run_cli(env, "--config", str(config))
    assert third.returncode == 0, third.stderr[-4000:]
    lines = _assets_lines(third.stdout)
    recomputed = sorted(k for k, v in lines.items() if v.startswith("recomputed"))
    assert recomputed == ["selected_subset"], lines
    assert "fraction [0.05, 0.1] -> 0.2" in lines["selected_subset"]

    # A misspelt key is refused before any compute, naming the key and the valid ones, without a traceback.
    config.write_text(yaml.safe_dump({"ops": {"spectral_basis": {"config": {"kk": 3}}}}))
    bad = run_cli(env, "--config", str(config))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "ops.spectral_basis.config: unknown keys ['kk']" in bad.stderr and "memory_budget_mb" in bad.stderr

    with make_ui(env, tmp_path) as ui:
        base, logs = ui["base"], ui["logs"]
        # The same file, pasted into the launchpad of select_job, is valid there and the daemon runs it.
        params = {"selector": {**LOCATION, "jobName": "select_job"}, "runConfigData": changed, "mode": "default"}
        launched = graphql(base, LAUNCH, {"p": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        assert wait_run(base, launched["run"]["runId"], 240, logs) == "SUCCESS", logs()

        # ... and so is it for prepare_job (it names every stage's assets); a wrong key is refused at launch.
        wrong = {"ops": {**changed["ops"], "selected_subset": {"config": {"percentag": 0.2}}}}
        refused = graphql(base, LAUNCH, {"p": {**params, "runConfigData": wrong}})["launchRun"]
        assert refused["__typename"] == "RunConfigValidationInvalid", refused
        assert "percentag" in json.dumps(refused["errors"])

        # A CLI run shows under its job and re-executes from the UI.
        cli_runs = graphql(base, CLI_RUNS, {"job": "select_job"})["runsOrError"]["results"]
        assert cli_runs and all(r["jobName"] == "select_job" for r in cli_runs), cli_runs
        again = graphql(base, REEXECUTE, {"id": cli_runs[0]["runId"]})["launchRunReexecution"]
        assert again["__typename"] == "LaunchRunSuccess", again
        assert wait_run(base, again["run"]["runId"], 240, logs) == "SUCCESS", logs()


def _write_fresh_candidates(path: Path, n: int, seed: int) -> list[str]:
    """New candidates from the embedded generator (another seed), with ids of their own."""
    records = [{**r, "id": f"fresh-{r['id']}"} for r in synthetic.generate_pool(n, seed=seed)]
    write_jsonl(path, records)
    return [r["id"] for r in records]


def _materializations(base: str, key: str, partitions: list[str] | None = None) -> list[dict]:
    data = graphql(base, MATERIALIZATIONS, {"key": [key], "partitions": partitions})["assetOrError"]
    return data["assetMaterializations"]


@pytest.mark.slow
def test_refresh_fires_through_the_daemon_on_postgres(tmp_path):
    if not postgres_bin("initdb"):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing in CI: .ci/run must install postgresql")
        pytest.skip("PostgreSQL server not installed (apt-get install postgresql)")
    watch = tmp_path / "watch"
    pool = two_file_pool(watch, shard_size=80)  # two shards
    pool["config"]["paths"] = [str(watch / "**" / "*.jsonl")]  # the fresh folder below too
    cfg = {
        "ops": {
            **TINY_EXACT["ops"],  # the sensor's sketch runs are the freshness test's
            "candidate_pool": pool,
        }
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with postgres_server() as url:
        env = _env(
            tmp_path,
            DAGSTER_PG_URL=url,
            GIST_WATCH_DIR=str(watch),
            GIST_RUN_CONFIG=str(config),
            GIST_SENSOR_INTERVAL_S="3",
            INSTANCE=str(REPO / "deploy" / "postgres" / "dagster.yaml"),
        )
        with make_ui(env, tmp_path) as ui:  # it installs the PostgreSQL dagster.yaml in DAGSTER_HOME
            base, logs = ui["base"], ui["logs"]
            first = run_cli(env, "--config", str(config))
            assert first.returncode == 0, first.stderr[-4000:]
            old_shards = sorted({m["partition"] for m in _materializations(base, "candidate_features")})
            assert old_shards == ["part_0-0000", "part_1-0000"], old_shards

            started = graphql(base, START_SENSOR, {"s": {**LOCATION, "sensorName": "new_candidate_data"}})
            assert started["startSensor"]["__typename"] == "Sensor", started
            dropped = time.time()
            fresh_ids = _write_fresh_candidates(watch / "fresh" / "fresh_data.jsonl", 30, seed=7)

            deadline = time.monotonic() + 300
            while True:
                latest = _materializations(base, "selected_subset")
                if any(float(m["timestamp"]) / 1000 > dropped for m in latest):
                    break
                assert time.monotonic() < deadline, f"no refreshed selection 300s after the new file:\n{logs()}"
                time.sleep(2)
            elapsed = time.time() - dropped
            # Only the new shard's features were computed; every old shard has its one materialization.
            new_shard = [
                m["partition"]
                for m in _materializations(base, "candidate_features")
                if m["partition"] not in old_shards
            ]
            assert new_shard == ["fresh_data-0000"], new_shard
            for shard in old_shards:
                assert len(_materializations(base, "candidate_features", [shard])) == 1, shard
    print(f"refresh through the daemon: {elapsed:.1f}s from the new file to the refreshed selection")
    with duckdb.connect(str(tmp_path / "root" / "gist.duckdb"), read_only=True) as db:
        scored = {
            r[0]
            for r in db.execute("SELECT DISTINCT candidate_id FROM candidate_scores WHERE method = 'gist'").fetchall()
        }
    assert set(fresh_ids) <= scored
