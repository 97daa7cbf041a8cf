"""Reliability matrix, bad input: each case gives a clear error (file, line or id, what to do), or, where a
skip policy is configured, is skipped and counted. Checked through `dagster.materialize`, reading the
innermost error of the failed step: the text `python -m gist_assets.run` prints and the UI shows.

The record-level rules themselves are unit-tested in tests/test_candidate_data.py.
"""

import contextlib
import json
import subprocess
import sys
import time

import duckdb
import numpy as np
import polars as pl
import pytest

from gist_assets.steps import RECOMPUTE_TAG
from gist_resources import ScoreStore
from reliability_util import (
    check_results,
    conv,
    fresh_instance,
    materialize,
    metadata,
    truncate_file,
    user_error,
    warnings_logged,
    write_jsonl,
)

GOOD = conv("What is the capital of France?", "Paris.")

# name -> (lines of the file, line the error names, words of the reason). Line 1 is a good record
# unless the case is about the whole file.
BAD_RECORDS = {
    "malformed_json": ([GOOD, '{"messages": [{"role": "user"'], 2, "malformed JSON"),
    "wrong_shape": ([GOOD, "[1, 2, 3]"], 2, "expected a JSON object, got list"),
    "wrong_type": (
        [GOOD, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}],
        2,
        "messages[0].content must be a string, got int",
    ),
    "empty_messages": ([GOOD, {"messages": []}], 2, "'messages' is empty"),
    "no_assistant_turn": ([GOOD, {"messages": [{"role": "user", "content": "Hi"}]}], 2, "no non-empty assistant turn"),
    "unknown_role": (
        [GOOD, {"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}],
        2,
        "unknown role 'bot'",
    ),
    "missing_completion": ([GOOD, {"prompt": "What is 1 + 1?"}], 2, "no 'completion' field"),
    "missing_prompt": ([GOOD, {"completion": "2"}], 2, "no 'prompt' field"),
    "empty_file": ([], 0, "file is empty"),
    "not_utf8": ([GOOD, b'{"prompt": "caf\xe9", "completion": "ok"}'], 2, "not valid UTF-8"),
}


def _bad_file(folder, name):
    lines, line, reason = BAD_RECORDS[name]
    path = folder / f"{name}.jsonl"
    if lines:
        write_jsonl(path, lines)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return path, line, reason


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_record_stops_with_file_line_and_fix(tmp_path, name):
    path, line, reason = _bad_file(tmp_path / "data", name)
    with fresh_instance() as instance:
        result = materialize(
            ["candidate_pool"], tmp_path / "root", instance, {"candidate_pool": {"paths": [str(path)]}}
        )
    msg = user_error(result)
    assert msg.startswith(f"gist_core.data.BadRecordError: {path}:{line}: "), msg
    assert reason in msg, msg
    assert "on_bad_record: skip" in msg, msg  # says how to get past it
    assert not (tmp_path / "root" / "pool" / "candidate_pool.parquet").exists()


def test_bad_records_skipped_and_counted_with_skip_policy(tmp_path):
    data = tmp_path / "data"
    bad = {name: _bad_file(data, name) for name in BAD_RECORDS}
    write_jsonl(data / "good.jsonl", [conv("Name a prime.", "7."), conv("Name a planet.", "Mars.")])
    with fresh_instance() as instance:
        result = materialize(
            ["candidate_pool"],
            tmp_path / "root",
            instance,
            {"candidate_pool": {"paths": [str(data / "*.jsonl")], "on_bad_record": "skip"}},
        )
    assert result.success, user_error(result)
    meta = metadata(result, "candidate_pool")
    assert meta["records_skipped"] == len(BAD_RECORDS)
    for name, (path, line, reason) in bad.items():
        assert f"{path}:{line}: " in meta["skip_reasons"] and reason in meta["skip_reasons"], name
    # The good line 1 of every non-empty file is kept (a non-UTF-8 line costs that line only).
    pool = pl.read_parquet(tmp_path / "root" / "pool" / "candidate_pool.parquet")
    assert meta["rows"] == pool.height == 2 + 1  # good.jsonl, plus one copy of GOOD (the rest are duplicates)
    assert meta["duplicates_dropped"] == len(BAD_RECORDS) - 2  # GOOD repeated in the 9 non-empty bad files


def test_very_long_record_is_truncated_and_counted(custom_graph):
    side = pl.read_parquet(custom_graph["root"] / "features" / "mypool-0000" / "candidates.parquet")
    truncated = side.filter(pl.col("truncated"))
    assert truncated.height == 2  # the long reply (still scored) and the long prompt (cut off)
    assert (truncated["n_tokens"] == 128).all()  # max_length of the embedded model
    long_reply = truncated.filter(pl.col("included"))
    assert long_reply.height == 1 and long_reply["n_label_tokens"][0] > 0
    assert metadata(custom_graph["features"], "candidate_features")["truncated"] == 2
    scores_meta = metadata(custom_graph["select"], "candidate_scores")
    assert scores_meta["candidates_truncated"] == 2
    with duckdb.connect(str(custom_graph["root"] / "gist.duckdb"), read_only=True) as db:
        n = db.execute(
            "SELECT count(*) FROM candidate_scores WHERE candidate_id = ?", [long_reply["candidate_id"][0]]
        ).fetchone()[0]
    assert n == 2  # scored for both targets


def test_completion_cut_off_by_truncation_is_excluded_with_reason(custom_graph):
    side = pl.read_parquet(custom_graph["root"] / "features" / "mypool-0000" / "candidates.parquet")
    excluded = side.filter(~pl.col("included"))
    assert excluded.height == 1 and excluded["n_label_tokens"][0] == 0
    assert excluded["exclude_reason"][0] == "no completion tokens within max_length=128"
    cut_id = excluded["candidate_id"][0]
    with duckdb.connect(str(custom_graph["root"] / "gist.duckdb"), read_only=True) as db:
        assert db.execute("SELECT count(*) FROM candidate_scores WHERE candidate_id = ?", [cut_id]).fetchone()[0] == 0
        assert (
            db.execute("SELECT count(*) FROM candidate_scores WHERE isnan(score) OR NOT isfinite(score)").fetchone()[0]
            == 0
        )
        per_target = db.execute("SELECT target, count(*) FROM candidate_scores GROUP BY 1").fetchall()
    assert dict(per_target) == {"single": side.height - 1, "mixed": side.height - 1}
    meta = metadata(custom_graph["select"], "candidate_scores")
    assert meta["candidates_excluded"] == 1 and cut_id in meta["excluded_no_completion"]
    check = check_results(custom_graph["select"])["candidate_scores:scores_valid"]
    assert check.passed
    assert check.metadata["excluded_candidates"].value == 1
    assert check.metadata["excluded_but_scored"].value == []


def test_duplicate_ids_with_different_content_get_derived_ids(custom_graph):
    meta = metadata(custom_graph["prepare"], "candidate_pool")
    assert meta["ids_rederived"] == 2
    pool = pl.read_parquet(custom_graph["root"] / "pool" / "candidate_pool.parquet")
    ids = pool.sort("line")["candidate_id"].to_list()
    assert "dup" not in ids and "keep-me" in ids  # a unique own id is kept
    dups = pool.filter(pl.col("line").is_in([9, 10]))["candidate_id"].to_list()
    assert len(set(dups)) == 2 and all(i.startswith("mypool-") for i in dups)
    assert pool["candidate_id"].n_unique() == pool.height


def test_single_example_target_and_single_example_subtask_stay_in_the_basis(custom_graph):
    root = custom_graph["root"]
    targets = pl.read_parquet(root / "targets" / "target_sets.parquet")
    basis = targets.filter(pl.col("split") == "basis")
    assert basis.filter(pl.col("target") == "single").height == 1
    assert basis.filter((pl.col("target") == "mixed") & (pl.col("subtask") == "rare")).height == 1
    assert targets.filter(pl.col("split") == "heldout").height == 3  # half of `sums` (4), single's own held-out
    for ckpt in ("epoch_1", "epoch_2"):
        V = np.load(root / "basis" / ckpt / "single" / "V.npy", allow_pickle=False)
        Z = np.load(root / "basis" / ckpt / "single" / "Z.npy", allow_pickle=False)
        assert V.shape[1] == 1 and Z.shape == (1, 1) and np.isfinite(V).all()
        assert abs(float(V[:, 0] @ V[:, 0]) - 1) < 1e-4  # a unit vector: the N=1 basis is well defined
    assert check_results(custom_graph["prepare"])["spectral_basis:basis_columns_orthonormal"].passed
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        rows = db.execute(
            "SELECT target, min(score), max(score), count(DISTINCT best_subtask) "
            "FROM candidate_scores GROUP BY 1 ORDER BY 1"
        ).fetchall()
        selected = db.execute("SELECT target, count(*) FROM selections GROUP BY 1 ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["mixed", "single"]
    assert all(-1 - 1e-6 <= r[1] <= r[2] <= 1 + 1e-6 for r in rows)
    assert rows[0][3] >= 1 and rows[1][3] == 1
    assert selected == [("mixed", 1), ("single", 1)]


def test_k_larger_than_target_examples_is_clamped_with_a_warning(custom_graph):
    result = custom_graph["prepare"]
    meta = metadata(result, "spectral_basis")
    assert meta["k"] == {"epoch_1/mixed": 3, "epoch_2/mixed": 3, "epoch_1/single": 1, "epoch_2/single": 1}
    logged = warnings_logged(custom_graph["instance"], result)
    assert any(
        "epoch_1/single: k=8 exceeds the 1 non-zero singular values" in m and "using k=1" in m for m in logged
    ), logged
    assert any("epoch_1/mixed: k=8 exceeds" in m and "using k=3" in m for m in logged), logged
    notes = json.loads((custom_graph["root"] / "basis" / "epoch_1" / "single" / "meta.json").read_text())["notes"]
    assert notes and "using k=1" in notes[0]


@pytest.mark.parametrize(
    "config, shown",
    [
        ({"fraction": 0.0}, "fraction=0.0 must be in (0, 1]"),
        ({"fraction": 1.5}, "fraction=1.5 must be in (0, 1]"),
        ({"fraction": None, "n": 1000}, "n=1000 must be between 1 and the number of scored candidates (10)"),
        ({"fraction": 0.1, "n": 3}, "set exactly one of fraction"),
    ],
)
def test_selection_size_out_of_range_names_value_and_range(custom_graph, config, shown):
    root = custom_graph["root"]
    before = {p: p.stat().st_mtime_ns for p in (root / "selections").rglob("*")}
    with fresh_instance(custom_graph["shards"]) as instance:
        result = materialize(["selected_subset"], root, instance, {"selected_subset": config}, checks=False)
    assert shown in user_error(result), user_error(result)
    assert {p: p.stat().st_mtime_ns for p in (root / "selections").rglob("*")} == before  # nothing written


@pytest.mark.parametrize("kind", ["missing", "no_config_json"])
def test_model_path_that_does_not_exist(tmp_path, kind):
    model = tmp_path / "models" / "my-model"
    if kind == "no_config_json":
        model.mkdir(parents=True)
    with fresh_instance() as instance:
        result = materialize(
            ["base_model"], tmp_path / "root", instance, {"base_model": {"model_name_or_path": str(model)}}
        )
    msg = user_error(result)
    assert str(model) in msg, msg
    assert ("download it first" in msg) if kind == "missing" else ("has no config.json" in msg), msg
    assert not (tmp_path / "root" / "models" / "model_ref.json").exists()


def test_adapter_for_another_model_names_the_adapter_dir(tmp_path):
    from gist_core import modeling
    from gist_demo import tiny_model

    def tiny(hidden):
        spec = tiny_model.TinyLlamaSpec(hidden_size=hidden, layers=1, heads=2, kv_heads=1, intermediate_size=64)
        return tiny_model.tiny_llama(64, spec)

    adapter = tmp_path / "adapter_h32"
    modeling.attach_lora(tiny(32), 4, 16, 0.0, ["q_proj", "v_proj"], seed=0).save_pretrained(str(adapter))
    modeling.load_adapter(tiny(32), str(adapter))  # fits the model it was made for
    with pytest.raises(ValueError) as err:
        modeling.load_adapter(tiny(48), str(adapter))
    msg = str(err.value)
    assert f"adapter {str(adapter)!r} does not fit the base model" in msg
    assert "Re-materialize warmup_checkpoint" in msg and "size mismatch" in msg
    assert err.value.__cause__ is None  # the message itself is what Dagster shows
    with pytest.raises(FileNotFoundError, match="is not a PEFT adapter directory"):
        modeling.load_adapter(tiny(32), str(tmp_path))


# (file to damage, asset to re-materialize, what the message must name)
CORRUPTED = {
    "basis_V": ("basis/epoch_1/mixed/V.npy", "candidate_features", "re-materialize the `spectral_basis` asset"),
    "basis_Z": ("basis/epoch_2/single/Z.npy", "candidate_scores", "re-materialize the `spectral_basis` asset"),
    "features": (
        "features/mypool-0000/features.safetensors",
        "candidate_scores",
        "re-materialize the `candidate_features` asset for partition 'mypool-0000'",
    ),
    "target_gradients": (
        "target_gradients/epoch_1/single.npy",
        "spectral_basis",
        "re-materialize the `target_gradients` asset",
    ),
    "target_gradient_labels": (
        "target_gradients/epoch_1/mixed.parquet",
        "spectral_basis",
        "re-materialize the `target_gradients` asset",
    ),
    "adapter_weights": ("warmup/epoch_1/adapter_model.safetensors", "target_gradients", "is damaged or truncated"),
    "adapter_weights_of_a_shard": (
        "warmup/epoch_2/adapter_model.safetensors",
        "candidate_features",
        "re-materialize the `warmup_checkpoint` asset",
    ),
    "feature_sidecar": (
        "features/mypool-0000/candidates.parquet",
        "candidate_scores",
        "re-materialize the `candidate_features` asset for partition 'mypool-0000'",
    ),
    "feature_meta": (
        "features/mypool-0000/meta.json",
        "candidate_scores",
        "re-materialize the `candidate_features` asset for partition 'mypool-0000'",
    ),
    "basis_manifest": ("basis/manifest.json", "candidate_scores", "re-materialize the `spectral_basis` asset"),
    "pool": ("pool/candidate_pool.parquet", "selected_subset", "re-materialize the `candidate_pool` asset"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTED))
def test_corrupted_tensor_file_names_file_and_asset_to_rematerialize(custom_graph, tmp_path, case):
    import shutil

    rel, asset, fix = CORRUPTED[case]
    root = tmp_path / "root"
    shutil.copytree(custom_graph["root"], root)
    truncate_file(root / rel)
    shard = custom_graph["shards"][0]
    with fresh_instance(custom_graph["shards"]) as instance:
        result = materialize(
            [asset],
            root,
            instance,
            custom_graph["ops"],
            partition_key=shard if asset == "candidate_features" else None,
            checks=False,
            # Unchanged targets' gradients are carried over without loading the adapter; a recompute
            # (the CLI's --force) reads it.
            tags={RECOMPUTE_TAG: "all"} if asset == "target_gradients" else None,
        )
    msg = user_error(result)
    assert str(root / rel) in msg and fix in msg, msg
    # Re-running cannot fix a damaged file: no retries even on the gradient steps (which have a retry policy).
    assert "STEP_UP_FOR_RETRY" not in [e.event_type_value for e in result.all_events]


@contextlib.contextmanager
def _database_held(database, seconds: float):
    """Another process holding a write connection to ``database`` for ``seconds``."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
            f"print('holding', flush=True); time.sleep({seconds})",
            str(database),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_score_database_held_by_another_process(custom_graph, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(custom_graph["root"], root)
    database = root / "gist.duckdb"
    with _database_held(database, seconds=120) as holder:
        store = ScoreStore(database=str(database), lock_timeout_s=1.0)
        with fresh_instance(custom_graph["shards"]) as instance:
            start = time.monotonic()
            result = materialize(["candidate_scores"], root, instance, resources={"score_store": store}, checks=False)
            waited = time.monotonic() - start
    msg = user_error(result)
    assert f"the score database {database} is locked: another process holds a write connection" in msg, msg
    assert f"PID {holder.pid}" in msg and "lock_timeout_s" in msg, msg
    assert waited < 30, waited  # bounded: not dagster-duckdb's ~100 s of retries
    # Once the other process is gone, the same step goes through.
    with fresh_instance(custom_graph["shards"]) as instance:
        again = materialize(["candidate_scores"], root, instance, resources={"score_store": store}, checks=False)
    assert again.success, user_error(again)


def test_score_database_lock_wait_succeeds_when_the_holder_finishes(tmp_path):
    database = tmp_path / "scores.duckdb"
    with _database_held(database, seconds=1.0):
        store = ScoreStore(database=str(database), lock_timeout_s=60)
        with store.get_connection() as conn:  # waits for the holder to exit, then connects
            assert conn.execute("SELECT 42").fetchone() == (42,)
