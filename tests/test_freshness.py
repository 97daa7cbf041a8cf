"""New data adds work, it does not redo work: the refresh sensor on added, changed and removed files."""

import json

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
import yaml

from gist_assets.automation import new_candidate_data
from gist_assets.config import CONFIG_NODES
from gist_assets.definitions import make_resources
from gist_assets.run import materialize, run_all
from gist_demo import synthetic
from small_config import SMALL

FILE_KEYS = {node: asset for asset, node in CONFIG_NODES.items()}


def _tick(instance, resources):
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": resources["storage"]})
    result = new_candidate_data(ctx)
    return result if isinstance(result, dg.SkipReason) else list(result)


def _drive(instance, resources, run_config):
    """Tick and run what the sensor asks until it says everything is up to date; return what ran."""
    ran = []
    for _ in range(10):
        requests = _tick(instance, resources)
        if isinstance(requests, dg.SkipReason):
            assert "up to date" in requests.skip_message, requests.skip_message
            return ran
        for req in requests:
            names = [k.to_user_string() for k in req.asset_selection]
            # A request carries its job's run config (the sketches' under the pass step): back to the file's shape.
            requested = {FILE_KEYS.get(k, k): v for k, v in ((req.run_config or {}).get("ops") or {}).items()}
            cfg = {"ops": {**run_config["ops"], **requested}}
            materialize(names, cfg, instance, resources["storage"].root, partition=req.partition_key)
            ran.append((tuple(names), req.partition_key))
    raise AssertionError(f"the sensor did not settle: {ran}")


def _scored_ids(root, method="gist"):
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT target, candidate_id FROM candidate_scores WHERE method = ?", [method]).fetchall()
    out = {}
    for target, cid in rows:
        out.setdefault(target, []).append(cid)
    return {t: sorted(ids) for t, ids in out.items()}


def _scores_by_id(root) -> dict[str, dict[str, float]]:
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT target, candidate_id, score FROM candidate_scores WHERE method = 'gist'").fetchall()
    out: dict = {}
    for target, cid, score in rows:
        out.setdefault(target, {})[cid] = score
    return out


def _watched_pool(tmp_path, monkeypatch):
    """160 embedded candidates in a watched folder, the run config pointing at it, the sensor's environment."""
    root, watch = tmp_path / "root", tmp_path / "watch"
    synthetic.write_pool(watch, n_examples=160, seed=0)
    run_config = {
        "ops": {
            **SMALL["ops"],
            "candidate_pool": {"config": {"paths": [str(watch / "**" / "*.jsonl")], "shard_size": 40}},
        }
    }
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config))
    monkeypatch.setenv("GIST_WATCH_DIR", str(watch))
    monkeypatch.setenv("GIST_RUN_CONFIG", str(config_file))
    return root, watch, run_config, make_resources(str(root))


@pytest.mark.slow
def test_sensor_adds_changes_and_removes_only_what_changed_and_new_data_scores_on_the_same_scale(tmp_path, monkeypatch):
    root, watch, run_config, resources = _watched_pool(tmp_path, monkeypatch)
    with dg.instance_for_test() as instance:
        run_all(run_config, str(root), instance=instance, log=lambda _: None)
        assert _drive(instance, resources, run_config) == []  # nothing to do after a full run
        before = _scored_ids(root)
        shards_before = set(instance.get_dynamic_partitions("candidate_shards"))
        untouched = {s: (root / "features" / s / "meta.json").stat().st_mtime_ns for s in shards_before}

        # 1. A new file: only its shard computes features and sketches; the scores then cover it.
        new = watch / "new_task.jsonl"
        new.write_text(
            "".join(
                json.dumps({"prompt": f"Add {i} and {i + 7} together. Result:", "completion": str(2 * i + 7)}) + "\n"
                for i in range(25)
            )
        )
        ran = _drive(instance, resources, run_config)
        assert ran == [
            (("candidate_pool",), None),
            (("candidate_features", "candidate_sketches"), "new_task-0000"),  # one run: one gradient pass
            (("candidate_scores", "selected_subset"), None),
        ]
        after = _scored_ids(root)
        assert _scored_ids(root, "gist_sketch") == after
        for target, ids in after.items():
            assert len(ids) == len(before[target]) + 25 and len(set(ids)) == len(ids)
        assert {s: (root / "features" / s / "meta.json").stat().st_mtime_ns for s in shards_before} == untouched

        # 2. A changed file: only that file's shard recomputes.
        changed = next(watch.rglob("antonyms_data.jsonl"))
        with open(changed, "a", encoding="utf-8") as fh:
            fh.write(
                json.dumps(
                    {
                        "dataset": "antonyms",
                        "messages": [
                            {"role": "user", "content": "Opposite of 'early'?"},
                            {"role": "assistant", "content": "late"},
                        ],
                    }
                )
                + "\n"
            )
        ran = _drive(instance, resources, run_config)
        assert ran == [
            (("candidate_pool",), None),
            (("candidate_features", "candidate_sketches"), "antonyms_data-0000"),  # one run: one gradient pass
            (("candidate_scores", "selected_subset"), None),
        ]
        assert all(len(ids) == len(after[t]) + 1 for t, ids in _scored_ids(root).items())

        # 3. A removed file: its shard leaves the partitions and its candidates leave scores and selections.
        new.unlink()
        ran = _drive(instance, resources, run_config)
        assert ran == [(("candidate_pool",), None), (("candidate_scores", "selected_subset"), None)]
        assert "new_task-0000" not in instance.get_dynamic_partitions("candidate_shards")
        final = _scored_ids(root)
        assert all(not any(cid.startswith("new_task") for cid in ids) for ids in final.values())
        assert all(len(ids) == len(before[t]) + 1 for t, ids in final.items())
        with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
            leftover = db.execute(
                "SELECT count(*) FROM selections s LEFT JOIN candidate_scores c USING "
                "(candidate_id, target, method) WHERE c.candidate_id IS NULL"
            ).fetchone()[0]
        assert leftover == 0

        # 4. New candidates from the same generator as the old must not look special: a refresh keeps the base
        # model, the tokenizer and the warmup. Per target, the standardized mean difference
        # d = (mean(new) - mean(old)) / std(old) of the GIST scores; |d| < 0.5 (measured: |d| <= 0.09; with the
        # base model trained on the pool it first saw, |d| <= 0.16 on this data).
        old = _scores_by_id(root)
        later = watch / "later" / "later_data.jsonl"
        later.parent.mkdir()
        records = synthetic.generate_pool(80, seed=7)
        later.write_text("".join(json.dumps({**r, "id": f"later-{r['id']}"}) + "\n" for r in records))
        _drive(instance, resources, run_config)
        scores = _scores_by_id(root)
        md = instance.get_latest_materialization_event(dg.AssetKey("candidate_scores")).asset_materialization.metadata
        with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
            chosen = db.execute("SELECT target, budget, candidate_id FROM selections WHERE method = 'gist'").fetchall()

        # 5. Another sketch projection in $GIST_RUN_CONFIG: every shard's sketches are due (made with it, no
        # exact features), then the scores; the pool's sketches stay one kind.
        dim64 = {"ops": {**run_config["ops"], "candidate_sketches": {"config": {"dim": 64}}}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(dim64))
        ran = _drive(instance, resources, dim64)
        shards = sorted(instance.get_dynamic_partitions("candidate_shards"))
        assert ran == [(("candidate_sketches",), s) for s in shards] + [(("candidate_scores", "selected_subset"), None)]
        made = {
            json.loads((root / "features_gist_sketch" / s / "meta.json").read_text())["projection"]["dim"]
            for s in shards
        }
        assert made == {64}
    warmed = set(pl.read_parquet(root / "warmup" / "pool_ids.parquet")["candidate_id"])
    newer = {c for by_id in scores.values() for c in by_id} - warmed
    assert md["candidates_newer_than_warmup"].value == len(newer) == 80 + 1  # + the record appended in step 2
    # Each selection's manifest counts its candidates that came after the warmup.
    for target, budget in {(t, b) for t, b, _ in chosen}:
        manifest = json.loads((root / "selections" / target / "gist" / budget / "manifest.json").read_text())
        assert manifest["selected_newer_than_warmup"] == sum(
            1 for t, b, c in chosen if (t, b) == (target, budget) and c in newer
        )
    assert any(c.startswith("later-") for _, _, c in chosen)
    for target, by_id in scores.items():
        new = np.array([s for c, s in by_id.items() if c.startswith("later-")])
        before = np.array([s for c, s in by_id.items() if c in old[target]])
        assert len(new) == 80 and len(before) == len(old[target])
        d = (new.mean() - before.mean()) / before.std()
        print(f"{target}: old mean {before.mean():.3f} (std {before.std():.3f}), new mean {new.mean():.3f}, d={d:+.2f}")
        assert abs(d) < 0.5, (target, d)
