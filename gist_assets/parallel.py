"""Several shards at once on one machine: a fan-out job on the multiprocess executor.

``shards_to_compute`` lists the shards whose exact features or sketches are missing
or stale (for the scoring methods of its config, as ``candidate_scores.methods``);
each becomes a mapped ``shard_gradient_pass`` step in its own process, which makes
what is due for its shard from one gradient pass per checkpoint. The steps are in
the ``gpu`` concurrency pool (limit it to the number of GPUs), and the compute
resource gives each concurrent step its own GPU. Each step records a
materialization of the ``candidate_features`` / ``candidate_sketches`` partition it
made, with its data version, exactly as the partitioned assets do; shard steps
write only their own files, so they never contend for the DuckDB file.
"""

import re

import dagster as dg
from pydantic import Field, field_validator

from gist_resources import ArtifactStore, ComputeResource

from .config import DEFAULT_SCORING_METHODS, SCORING_METHODS, CandidateSketchesConfig, known_scoring_methods
from .features import FEATURES, SKETCHES, compute_shard, gist_shard_state
from .partitions import CANDIDATE_SHARDS
from .sketches import sketch_shard_state, sketch_shards_due
from .steps import GPU_POOL, GPU_STEP_TAGS, GRADIENT_RETRY


class FanOutConfig(dg.Config):
    all_shards: bool = False  # True: recompute every shard, not only missing or stale ones
    methods: list[str] = Field(
        default=DEFAULT_SCORING_METHODS,
        description="The scoring methods to make features for (as candidate_scores.methods): "
        "gist / gist_fullspace -> candidate_features, gist_sketch -> candidate_sketches",
    )
    # As candidate_sketches' config; None: the projection the pool's sketches were made with (the default if none).
    sketches: CandidateSketchesConfig | None = None

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        return known_scoring_methods(methods)


def due_shards(
    storage: ArtifactStore, shards: list[str], config: FanOutConfig
) -> tuple[dict[str, list[dg.AssetKey]], dict | None]:
    """({shard: the assets of it to compute}: those the methods read that are missing or stale, all with
    ``all_shards``; sketches made with another projection are stale), the sketches' config to make them with
    (None when the methods read no sketches)."""
    reads = {SCORING_METHODS[m] for m in config.methods}
    due: dict[str, list[dg.AssetKey]] = {}
    if FEATURES.to_user_string() in reads:
        missing, stale, _ = gist_shard_state(storage, shards)
        for shard in shards if config.all_shards else missing + stale:
            due.setdefault(shard, []).append(FEATURES)
    sketch_config = None
    if SKETCHES.to_user_string() in reads:
        asked = config.sketches.model_dump() if config.sketches else None
        sketches_due, sketch_config = sketch_shards_due(sketch_shard_state(storage, shards), asked)
        for shard in shards if config.all_shards else sketches_due:
            due.setdefault(shard, []).append(SKETCHES)
    return {s: due[s] for s in sorted(due)}, sketch_config


@dg.op(out=dg.DynamicOut(dict))
def shards_to_compute(context: dg.OpExecutionContext, config: FanOutConfig, storage: ArtifactStore):
    shards = sorted(context.instance.get_dynamic_partitions(CANDIDATE_SHARDS))
    due, sketch_config = due_shards(storage, shards, config)
    context.log.info(f"{len(due)} of {len(shards)} shards to compute")
    for shard, keys in due.items():
        yield dg.DynamicOutput(
            {
                "shard": shard,
                "features": FEATURES in keys,
                "sketches": sketch_config if SKETCHES in keys else None,
            },
            mapping_key=re.sub(r"[^A-Za-z0-9_]", "_", shard),
        )


@dg.op(pool=GPU_POOL, retry_policy=GRADIENT_RETRY, tags=GPU_STEP_TAGS)
def shard_gradient_pass(
    context: dg.OpExecutionContext, todo: dict, storage: ArtifactStore, compute: ComputeResource
) -> str:
    shard = todo["shard"]
    sketch = CandidateSketchesConfig(**todo["sketches"]) if todo["sketches"] else None
    for key, version, metadata in compute_shard(storage, compute, shard, context.log, todo["features"], sketch):
        context.log_event(
            dg.AssetMaterialization(
                asset_key=key, partition=shard, metadata=metadata, tags={"dagster/data_version": version}
            )
        )
    return shard


@dg.job(
    executor_def=dg.multiprocess_executor,
    description="Compute the missing or stale candidate_features and candidate_sketches shards in parallel "
    "processes (one gradient pass per shard for both)",
)
def parallel_features_job():
    shards_to_compute().map(shard_gradient_pass)
