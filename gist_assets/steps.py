"""How the steps run: concurrency pools, retries, Kubernetes resource requests, progress logs."""

import time
from typing import Any

import dagster as dg

from .partitions import candidate_shards

# Concurrency pool of the gradient steps: set its limit to the number of GPUs
# (`dagster instance concurrency set gpu N`, or dagster.yaml), so at most N run at once.
GPU_POOL = "gpu"
# DuckDB allows one writing process: every asset that writes the score database is in this pool, with a
# limit of 1 (deploy/k8s/dagster.yaml), so even concurrent runs never contend.
DUCKDB_POOL = "duckdb_writer"
# On Kubernetes (k8s_job_executor) each model step's pod asks for one GPU.
GPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}
    }
}
# A run tagged gist/recompute=all computes every output afresh instead of carrying unchanged parts over from
# the last materialization (target_gradients' per-target gradients); the CLI's --force sets it.
RECOMPUTE_TAG = "gist/recompute"
# Gradient passes can fail for passing reasons (a preempted node, a CUDA error); a damaged input does
# not retry (ArtifactError sets allow_retries=False).
GRADIENT_RETRY = dg.RetryPolicy(max_retries=2, delay=5)


def progress_logger(log, what: str, every_s: float = 10.0):
    """A gradient_pass progress callback that logs counts and rates at most every ``every_s``."""
    last = [0.0]

    def report(done: int, total: int, stats) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            log.info(
                f"{what}: {done}/{total} examples, {stats.examples_per_s:.1f} ex/s, {stats.tokens_per_s:.0f} tok/s"
            )

    return report


# A model pass over one shard of the pool (a partition): GPU pool and request, retries; what it writes.
SHARD_KINDS = {"pytorch", "safetensors"}
SHARD_PASS: dict[str, Any] = {
    "partitions_def": candidate_shards,
    "retry_policy": GRADIENT_RETRY,
    "pool": GPU_POOL,
    "op_tags": GPU_STEP_TAGS,
}


def shard_features_asset(**kwargs: Any):
    """``dg.asset`` for a model pass over one shard of the pool (``SHARD_PASS``)."""
    return dg.asset(kinds=SHARD_KINDS, **SHARD_PASS, **kwargs)
