"""Several shards at once on one machine: a fan-out job on the multiprocess executor.

``shards_to_compute`` lists the shards whose GIST features are missing or stale;
each becomes a mapped ``shard_features`` step in its own process. The steps are
in the ``gpu`` concurrency pool (limit it to the number of GPUs), and the compute
resource gives each concurrent step its own GPU. Each step records a
materialization of that ``candidate_features`` partition, with its data version,
exactly as the partitioned asset does; shard steps write only their own files, so
they never contend for the DuckDB file.
"""

import re

import dagster as dg

from gist_resources import ArtifactStore, ComputeResource

from .features import compute_shard, gist_shard_state
from .partitions import CANDIDATE_SHARDS
from .steps import GPU_POOL, GPU_STEP_TAGS, GRADIENT_RETRY


class FanOutConfig(dg.Config):
    all_shards: bool = False  # True: recompute every shard, not only missing or stale ones


@dg.op(out=dg.DynamicOut(str))
def shards_to_compute(context: dg.OpExecutionContext, config: FanOutConfig, storage: ArtifactStore):
    shards = sorted(context.instance.get_dynamic_partitions(CANDIDATE_SHARDS))
    missing, stale, _ = gist_shard_state(storage, shards)
    todo = shards if config.all_shards else sorted(missing + stale)
    context.log.info(f"{len(todo)} of {len(shards)} shards to compute")
    for shard in todo:
        yield dg.DynamicOutput(shard, mapping_key=re.sub(r"[^A-Za-z0-9_]", "_", shard))


@dg.op(pool=GPU_POOL, retry_policy=GRADIENT_RETRY, tags=GPU_STEP_TAGS)
def shard_features(context: dg.OpExecutionContext, shard: str, storage: ArtifactStore, compute: ComputeResource) -> str:
    for key, version, metadata in compute_shard(storage, compute, shard, context.log):
        context.log_event(
            dg.AssetMaterialization(
                asset_key=key, partition=shard, metadata=metadata, tags={"dagster/data_version": version}
            )
        )
    return shard


@dg.job(
    executor_def=dg.multiprocess_executor,
    description="Compute the missing or stale candidate_features shards in parallel processes",
)
def parallel_features_job():
    shards_to_compute().map(shard_features)
