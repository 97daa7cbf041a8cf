"""Outputs stay strict: one row per (candidate, target, method), finite scores only, strict JSON exports.
Checked on copies of the custom graph's storage root, with its real DuckDB file and real feature tensors."""

import json
import shutil

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from safetensors.numpy import load_file, save_file

from gist_assets.checks import scores_valid, selections_valid
from gist_assets.definitions import make_resources
from gist_assets.scores import candidate_scores
from gist_assets.selection import selected_subset
from reliability_util import fresh_instance, materialize, metadata, user_error


def _strict_loads(text: str):
    def no_constant(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


def _run_checks(root, shards):
    """Only the two integrity checks, on what is in the database now."""
    with fresh_instance(shards) as instance:
        result = dg.materialize(
            [candidate_scores, selected_subset, scores_valid, selections_valid],
            instance=instance,
            resources=make_resources(str(root)),
            raise_on_error=False,
            selection=dg.AssetSelection.checks(scores_valid, selections_valid),
        )
    return {ev.asset_key.to_user_string(): ev for ev in result.get_asset_check_evaluations()}


def _damage_score_file(root, change):
    """Rewrites one Parquet part of the gist score set of target 'mixed' (scores live in files, not tables)."""
    part = sorted(root.glob("gist.scores/method=gist/*/target=mixed/*.parquet"))[0]
    change(pl.read_parquet(part)).write_parquet(part)


DAMAGE = {
    "duplicate_score_row": ("candidate_scores", lambda df: pl.concat([df, df.head(1)]), "duplicated_keys"),
    "nan_score": (
        "candidate_scores",
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) == 1).then(float("nan")).otherwise(pl.col("score")).alias("score")
        ),
        "nonfinite_scores",
    ),
    "duplicate_selection_row": (
        "selected_subset",
        "INSERT INTO selections SELECT * FROM selections WHERE rank = 1 AND target = 'single'",
        "duplicated_keys",
    ),
    "infinite_selection_score": (
        "selected_subset",
        "UPDATE selections SET score = 'Infinity'::DOUBLE WHERE rank = 1 AND target = 'single'",
        "nonfinite_scores",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_blocking_checks_fail_on_duplicated_keys_and_nonfinite_scores(custom_graph, tmp_path, case):
    asset, sql, counter = DAMAGE[case]
    root = tmp_path / "root"
    shutil.copytree(custom_graph["root"], root)
    before = _run_checks(root, custom_graph["shards"])
    assert before["candidate_scores"].passed and before["selected_subset"].passed
    if callable(sql):
        _damage_score_file(root, sql)
    else:
        with duckdb.connect(str(root / "gist.duckdb")) as db:
            db.execute(sql)
    after = _run_checks(root, custom_graph["shards"])
    assert not after[asset].passed
    assert after[asset].metadata[counter].value == 1
    other = "selected_subset" if asset == "candidate_scores" else "candidate_scores"
    assert after[other].passed  # the damage is reported where it is


def test_nonfinite_score_is_excluded_from_ranking_and_exports_stay_strict(custom_graph, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(custom_graph["root"], root)
    shard = custom_graph["shards"][0]
    feats = root / "features" / shard / "features.safetensors"
    tensors = load_file(str(feats))
    # An overflowed coordinate of the first scored candidate for `mixed`: its cosine is inf / inf = NaN.
    tensors["epoch_1/mixed"][0, 0] = np.inf
    save_file(tensors, str(feats))
    side = pl.read_parquet(root / "features" / shard / "candidates.parquet").filter(pl.col("included"))
    nan_id = side["candidate_id"][0]
    ops = {**custom_graph["ops"], "selected_subset": {"fraction": 1.0}}  # select everything: NaN would show
    with fresh_instance(custom_graph["shards"]) as instance:
        result = materialize(["candidate_scores", "selected_subset"], root, instance, ops)
    assert result.success, user_error(result)
    meta = metadata(result, "candidate_scores")
    assert meta["nonfinite_scores_excluded"] == 1 and nan_id in meta["rows_per_target"]
    with duckdb.connect(str(root / "gist.duckdb"), read_only=True) as db:
        mixed = db.execute(
            "SELECT candidate_id, rank FROM candidate_scores WHERE target = 'mixed' AND method = 'gist' ORDER BY rank"
        ).fetchall()
        single = db.execute(
            "SELECT count(*) FROM candidate_scores WHERE target = 'single' AND method = 'gist'"
        ).fetchone()[0]
    assert nan_id not in [c for c, _ in mixed] and [r for _, r in mixed] == list(range(1, side.height))
    assert single == side.height  # the other target is untouched
    folder = root / "selections" / "mixed" / "gist" / "p1"
    lines = (folder / "selection.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == side.height - 1 and all(_strict_loads(line) for line in lines)
    manifest = _strict_loads((folder / "manifest.json").read_text())
    assert np.isfinite(manifest["score_cut"])
    checks = {ev.check_name: ev.passed for ev in result.get_asset_check_evaluations()}
    assert checks["scores_valid"] and checks["selection_size_as_configured"]
