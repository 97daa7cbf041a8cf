"""The code location: assets, checks, resources, jobs, the sensor and the schedule.

Every job takes the same run-config shape (``gist_assets.config``), so one file
is valid for all of them, in the launchpad and with ``python -m gist_assets.run``.
"""

import dagster as dg

from gist_resources import ComputeResource, ScoreStore, StorageResource

from .automation import automation_sensor, new_candidate_data, periodic_refresh, refresh_job
from .baselines import baseline_scores, baseline_selections, less_candidate_features, representation_features
from .checks import (
    baseline_scores_valid,
    basis_columns_orthonormal,
    scores_valid,
    selection_size_as_configured,
    selections_valid,
)
from .config import job_config
from .evaluation import selection_evaluation
from .gradients import candidate_features, spectral_basis, target_gradients
from .model import base_model, warmup_checkpoint
from .parallel import parallel_features_job
from .pool import candidate_pool, target_sets
from .scores import candidate_scores, selected_subset
from .sketch import candidate_sketches

ASSETS = [
    candidate_pool,
    target_sets,
    base_model,
    warmup_checkpoint,
    target_gradients,
    spectral_basis,
    candidate_features,
    candidate_sketches,
    candidate_scores,
    selected_subset,
    less_candidate_features,
    representation_features,
    baseline_scores,
    baseline_selections,
    selection_evaluation,
]
CHECKS = [
    basis_columns_orthonormal,
    scores_valid,
    selection_size_as_configured,
    baseline_scores_valid,
    selections_valid,
]
RESOURCE_NAMES = ["storage", "compute", "score_store"]

# The graph in stages, each a job: the run path of the CLI and what a user launches in the UI.
# Partitioned stages run one shard per run (a backfill in the UI launches them all).
JOB_ASSETS = {
    "prepare_job": [
        "candidate_pool",
        "target_sets",
        "base_model",
        "warmup_checkpoint",
        "target_gradients",
        "spectral_basis",
    ],
    "features_job": ["candidate_features", "candidate_sketches"],
    "select_job": ["candidate_scores", "selected_subset"],
    "baseline_features_job": ["less_candidate_features", "representation_features"],
    "compare_job": ["baseline_scores", "baseline_selections", "selection_evaluation"],
}
JOB_DESCRIPTIONS = {
    "prepare_job": "Pool, targets, base model, LoRA warmup, target gradients and spectral bases",
    "features_job": "GIST candidate features (exact) and candidate sketches (reused by new targets) of one shard "
    "(backfill: every shard)",
    "select_job": "GIST scores (DuckDB: gist, gist_sketch) and the selections",
    "baseline_features_job": "LESS and representation features of one shard (backfill: every shard)",
    "compare_job": "Baseline scores and selections, then fine-tune on every selection and compare held-out loss",
}


# The feature asset each scoring method reads: the CLI runs only those of the requested methods
# (candidate_scores.methods), so a new target with only gist_sketch runs no pass over the pool.
METHOD_FEATURES = {"gist": "candidate_features", "gist_sketch": "candidate_sketches"}

# Dagster allows no ConfigMapping on a partitioned job: these take the standard shape (their own
# assets' entries and resources), and the CLI passes them only that part of the file.
PARTITIONED_JOBS = {"features_job", "baseline_features_job"}


def make_jobs(executor: dg.ExecutorDefinition | None = None) -> list:
    """The stage jobs; in-process by default (one process per run: steps share the loaded model)."""
    return [
        dg.define_asset_job(
            name,
            selection=dg.AssetSelection.assets(*assets),
            description=JOB_DESCRIPTIONS[name],
            config=None if name in PARTITIONED_JOBS else job_config(assets, RESOURCE_NAMES),
            executor_def=executor or dg.in_process_executor,
        )
        for name, assets in JOB_ASSETS.items()
    ]


def make_resources(root: str = "") -> dict:
    storage = StorageResource(root=root)
    return {
        "storage": storage,
        "compute": ComputeResource(),
        "score_store": ScoreStore(database=str(storage.root_path / "gist.duckdb")),
    }


def build_definitions(root: str = "", executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        resources=make_resources(root),
        jobs=[*make_jobs(executor), refresh_job, parallel_features_job],
        sensors=[new_candidate_data, automation_sensor],
        schedules=[periodic_refresh],
    )


defs = build_definitions()
