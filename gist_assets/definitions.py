"""The code location: assets, checks, resources, and jobs."""


import dagster as dg

from gist_resources import ComputeResource, ScoreStore, StorageResource

from .automation import automation_sensor, new_candidate_data, periodic_refresh, refresh_job
from .baselines import baseline_scores, less_candidate_features, representation_features
from .checks import basis_columns_orthonormal, baseline_scores_valid, scores_valid, selection_size_as_configured
from .evaluation import selection_evaluation
from .gradients import candidate_features, spectral_basis, target_gradients
from .model import base_model, warmup_checkpoint
from .parallel import parallel_features_job
from .pool import candidate_pool, target_sets
from .scores import candidate_scores, selected_subset

ASSETS = [candidate_pool, target_sets, base_model, warmup_checkpoint, target_gradients, spectral_basis,
          candidate_features, candidate_scores, selected_subset,
          less_candidate_features, representation_features, baseline_scores, selection_evaluation]
CHECKS = [basis_columns_orthonormal, scores_valid, selection_size_as_configured, baseline_scores_valid]

# The graph in three jobs: everything up to the bases, the per-shard feature pass, then scoring.
prepare_job = dg.define_asset_job(
    "prepare_job", selection=dg.AssetSelection.assets(candidate_pool, target_sets, base_model, warmup_checkpoint,
                                                      target_gradients, spectral_basis))
features_job = dg.define_asset_job("features_job", selection=dg.AssetSelection.assets(candidate_features))
baseline_features_job = dg.define_asset_job(
    "baseline_features_job", selection=dg.AssetSelection.assets(less_candidate_features, representation_features))
select_job = dg.define_asset_job("select_job", selection=dg.AssetSelection.assets(candidate_scores, selected_subset))
compare_job = dg.define_asset_job("compare_job", selection=dg.AssetSelection.assets(
    baseline_scores, selected_subset, selection_evaluation))


def make_resources(root: str = "") -> dict:
    storage = StorageResource(root=root)
    return {
        "storage": storage,
        "compute": ComputeResource(),
        "score_store": ScoreStore(database=str(storage.root_path / "gist.duckdb")),
    }


def build_definitions(root: str = "") -> dg.Definitions:
    return dg.Definitions(assets=ASSETS, asset_checks=CHECKS, resources=make_resources(root),
                          jobs=[prepare_job, features_job, select_job, baseline_features_job, compare_job, refresh_job,
                                parallel_features_job],
                          sensors=[new_candidate_data, automation_sensor], schedules=[periodic_refresh])


defs = build_definitions()
