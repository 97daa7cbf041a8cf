"""The code location: assets, checks, resources, jobs, the sensor and the schedule.

Every job takes the same run-config shape (``gist_assets.config``), so one file
is valid for all of them, in the launchpad and with ``python -m gist_assets.run``.
"""

import dagster as dg

from gist_resources import ArtifactStore, ComputeResource, ScoreStore
from gist_resources.score_store import DATABASE_NAME

from .automation import automation_sensor, new_candidate_data, periodic_refresh, refresh_job
from .baselines import baseline_scores, baseline_selections, less_candidate_features, representation_features
from .basis import spectral_basis
from .checks import (
    baseline_scores_valid,
    basis_columns_orthonormal,
    scores_valid,
    selection_size_as_configured,
    selections_valid,
)
from .config import job_config
from .evaluation import selection_evaluation
from .features import candidate_gradient_pass
from .inputs import candidate_pool, target_sets
from .model import base_model, warmup_checkpoint
from .parallel import parallel_features_job
from .scores import candidate_scores
from .selection import selected_subset
from .target_gradients import target_gradients

ASSETS = [
    candidate_pool,
    target_sets,
    base_model,
    warmup_checkpoint,
    target_gradients,
    spectral_basis,
    candidate_gradient_pass,
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
    "select_job": "GIST scores (DuckDB: the methods of candidate_scores) and the selections",
    "baseline_features_job": "LESS and representation features of one shard (backfill: every shard)",
    "compare_job": "Baseline scores and selections, then fine-tune on every selection and compare held-out loss",
}


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
    storage = ArtifactStore(root=root)
    return {
        "storage": storage,
        "compute": ComputeResource(),
        "score_store": ScoreStore(database=str(storage.root_path / DATABASE_NAME)),
    }


def build_definitions(root: str = "", executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    """The code location; ``executor`` (default in-process) also runs what sensors and automation launch, so a
    refresh loads the model once per run rather than once per step."""
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        resources=make_resources(root),
        jobs=[*make_jobs(executor), refresh_job, parallel_features_job],
        sensors=[new_candidate_data, automation_sensor],
        schedules=[periodic_refresh],
        executor=executor or dg.in_process_executor,
    )


defs = build_definitions()


def parallel_features_job_def() -> dg.JobDefinition:
    """For dagster.build_reconstructable_job: the fan-out job with the code location's resources bound."""
    return defs.get_job_def("parallel_features_job")
