"""Asset checks guarding what downstream consumes."""

import dagster as dg
import numpy as np
import polars as pl

from gist_core.selection import selection_size
from gist_resources import ArtifactStore, ScoreStore

from .baselines import baseline_scores
from .basis import spectral_basis
from .partitions import candidate_shards
from .scores import candidate_scores
from .selection import selected_subset


@dg.asset_check(asset=spectral_basis, blocking=True, description="V_k^T V_k is close to the identity")
def basis_columns_orthonormal(storage: ArtifactStore) -> dg.AssetCheckResult:
    bases = storage.read_basis_manifest()
    worst = {}
    for target, per in bases["targets"].items():
        for ckpt in per:
            V = np.asarray(storage.basis_vectors(ckpt, target), dtype=np.float64)
            worst[f"{ckpt}/{target}"] = float(np.abs(V.T @ V - np.eye(V.shape[1])).max())
    top = max(worst.values())
    return dg.AssetCheckResult(
        passed=top < 1e-3, metadata={"max_abs_deviation": top, "per_basis": dg.MetadataValue.json(worst)}
    )


def _integrity_metadata(found: dict) -> dict:
    return {
        "duplicated_keys": found["duplicated_keys"],
        "duplicates": dg.MetadataValue.json(found["duplicates"]),
        "nonfinite_scores": found["nonfinite"],
        "nonfinite_rows": dg.MetadataValue.json(found["nonfinite_rows"]),
    }


def _scores_valid(context, storage: ArtifactStore, score_store: ScoreStore) -> dg.AssetCheckResult:
    found = score_store.integrity("candidate_scores")
    bad = score_store.out_of_range_scores(-1.000001, 1.000001)
    excluded = set()
    for shard in context.instance.get_dynamic_partitions(candidate_shards.name):
        for kind in ("gist", "gist_sketch"):
            side = storage.read_shard_candidates(kind, shard)
            if side is not None:
                excluded |= set(side.filter(~pl.col("included"))["candidate_id"].to_list())
    wrongly_scored = score_store.scored_among(sorted(excluded))
    ok = bad == 0 and not wrongly_scored and found["duplicated_keys"] == 0 and found["nonfinite"] == 0
    return dg.AssetCheckResult(
        passed=ok,
        metadata={
            "out_of_range_or_nonfinite": int(bad),
            "excluded_candidates": len(excluded),
            "excluded_but_scored": dg.MetadataValue.json(wrongly_scored[:20]),
            **_integrity_metadata(found),
        },
    )


@dg.asset_check(
    asset=candidate_scores,
    blocking=True,
    description="Scores are finite and in [-1, 1]; candidates without completion tokens are not scored",
)
def scores_valid(
    context: dg.AssetCheckExecutionContext, storage: ArtifactStore, score_store: ScoreStore
) -> dg.AssetCheckResult:
    return _scores_valid(context, storage, score_store)


@dg.asset_check(
    asset=baseline_scores,
    blocking=True,
    name="scores_valid",
    description="Baseline scores are finite and in [-1, 1]; no candidate without completion tokens",
)
def baseline_scores_valid(
    context: dg.AssetCheckExecutionContext, storage: ArtifactStore, score_store: ScoreStore
) -> dg.AssetCheckResult:
    return _scores_valid(context, storage, score_store)


@dg.asset_check(
    asset=selected_subset,
    blocking=True,
    description="The selections table holds each (candidate, target, method) once, with a finite score",
)
def selections_valid(score_store: ScoreStore) -> dg.AssetCheckResult:
    found = score_store.integrity("selections")
    return dg.AssetCheckResult(
        passed=found["duplicated_keys"] == 0 and found["nonfinite"] == 0, metadata=_integrity_metadata(found)
    )


@dg.asset_check(
    asset=selected_subset, description="Each selection has the configured size at every budget, in every output"
)
def selection_size_as_configured(storage: ArtifactStore, score_store: ScoreStore) -> dg.AssetCheckResult:
    bases = storage.read_basis_manifest()
    report, ok = {}, True
    # The selections made (a method not requested in the last scoring run has none for a newer target).
    for (method, target, label), in_db in score_store.selection_sizes().items():
        if target not in bases["targets"]:
            continue
        manifest = storage.read_selection_manifest(target, method, label)
        expected = selection_size(
            manifest["scored_candidates"], manifest["config"]["fraction"], manifest["config"]["n"]
        )
        counts = storage.selection_line_counts(target, method, label)
        report[f"{target}/{method}/{label}"] = {"expected": expected, "duckdb": in_db, **counts}
        ok &= expected == in_db == counts["selection.jsonl"] == counts["selection.messages.jsonl"]
    return dg.AssetCheckResult(passed=ok, metadata={"sizes": dg.MetadataValue.json(report)})
