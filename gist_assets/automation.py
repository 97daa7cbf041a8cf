"""Freshness: a sensor for new candidate data, a periodic refresh schedule, declarative automation.

All are off by default (turn them on in the UI, Automation tab).

The sensor watches ``$GIST_WATCH_DIR`` (every ``*.jsonl`` below it). Each tick
moves the refresh one step, and only when needed:

1. a new, changed or removed file -> a ``candidate_pool`` run (re-reads the files,
   registers new shard partitions, removes those of deleted files);
2. one run per shard whose features are due (content hash or basis changed:
   ``candidate_features``) or whose sketches are due (content or warmup changed:
   ``candidate_sketches``), for the scoring methods of the run config
   (``candidate_scores.methods``) only; a shard due for both gets both from one
   gradient pass; unchanged shards are not recomputed;
3. every shard up to date but the scores made from other inputs -> a run of
   ``candidate_scores`` and ``selected_subset``.

Run keys make each request idempotent. ``$GIST_RUN_CONFIG`` may name a run-config
YAML (the same file as ``python -m gist_assets.run --config``) applied to these runs.
"""

import glob
import os

import dagster as dg

from gist_core.data import file_signatures
from gist_resources import ArtifactStore

from .config import SCORING_METHODS, effective_config, for_assets, load_run_config
from .features import FEATURES, SKETCHES, candidate_gradient_pass, gist_shard_state
from .inputs import candidate_pool
from .partitions import CANDIDATE_SHARDS
from .scores import METHOD, SKETCH_METHOD, candidate_scores, scores_inputs
from .selection import selected_subset
from .sketches import sketch_shard_state, sketch_shards_due
from .versions import fingerprint

WATCH_ENV = "GIST_WATCH_DIR"
RUN_CONFIG_ENV = "GIST_RUN_CONFIG"
CRON_ENV = "GIST_REFRESH_CRON"
INTERVAL_ENV = "GIST_SENSOR_INTERVAL_S"  # seconds between the sensor's ticks (default 60)


def _user_ops(names: list[str]) -> dict:
    """The part of ``$GIST_RUN_CONFIG`` (checked like the CLI's --config) that runs of ``names`` take."""
    path = os.environ.get(RUN_CONFIG_ENV)
    return for_assets(load_run_config(path), names) if path else {"ops": {}}


def watched_files(watch_dir: str) -> list[str]:
    return sorted(os.path.abspath(p) for p in glob.glob(os.path.join(watch_dir, "**", "*.jsonl"), recursive=True))


def pool_run_config(watch_dir: str) -> dict:
    cfg = _user_ops(["candidate_pool"])
    pool = cfg["ops"].setdefault("candidate_pool", {}).setdefault("config", {})
    pool["paths"] = [os.path.join(os.path.abspath(watch_dir), "**", "*.jsonl")]
    return cfg


def refresh_requests(storage: ArtifactStore, watch_dir: str, shards: list[str]) -> list[dg.RunRequest] | dg.SkipReason:
    """The next step of the refresh (see the module docstring), as run requests."""
    files = watched_files(watch_dir)
    if not files:
        return dg.SkipReason(f"no *.jsonl files under {watch_dir}")
    signatures = file_signatures(files)
    try:
        pool = storage.pool_record()
    except FileNotFoundError:
        pool = {"files": {}}
    if pool["files"] != signatures:
        return [
            dg.RunRequest(
                run_key=f"pool-{fingerprint(signatures)}",
                asset_selection=[candidate_pool.key],
                run_config=pool_run_config(watch_dir),
            )
        ]
    methods = effective_config(_user_ops(["candidate_scores"]), "candidate_scores")["methods"]
    sketch_config = _user_ops(["candidate_sketches"])
    try:
        missing, stale, versions = gist_shard_state(storage, shards)
        basis_version = storage.read_basis_manifest()["version"]
        # Sketches of another projection than the run config's are due too: the pool's sketches stay one kind.
        sketch_state = sketch_shard_state(storage, shards)
        sketches_due, _ = sketch_shards_due(sketch_state, effective_config(sketch_config, "candidate_sketches"))
        warmup_version = storage.read_warmup()["version"]
    except FileNotFoundError:
        return dg.SkipReason("no spectral basis yet: materialize the graph once (prepare_job) first")
    reads = {SCORING_METHODS[m] for m in methods}  # the feature assets the requested methods read
    read_keys = [k for k in (FEATURES, SKETCHES) if k.to_user_string() in reads]
    due = {FEATURES: set(missing + stale), SKETCHES: set(sketches_due)}
    made_from = {FEATURES: basis_version, SKETCHES: fingerprint(sketch_config, warmup_version)}
    requests = []
    for s in sorted(set().union(*(due[k] for k in read_keys))):
        # The key names every read asset's inputs, whichever are due: a tick while the pass is half written (one
        # output recorded, the other not yet) asks the same run again, which Dagster skips.
        key_parts = [s, str(pool["shards"].get(s)), *(f"{k.path[-1]}-{made_from[k]}" for k in read_keys)]
        requests.append(
            dg.RunRequest(
                run_key="-".join(key_parts),
                asset_selection=[k for k in read_keys if s in due[k]],
                partition_key=s,
                run_config=sketch_config,
            )
        )
    if requests:
        return requests
    sketch_versions = {s: m["version"] for s, m in sketch_state[2].items()}
    inputs = {m: scores_inputs(sketch_versions if m == SKETCH_METHOD else versions, basis_version) for m in methods}
    record = storage.scores_record_or_none(METHOD)
    if record is not None and record.get("inputs") == inputs:
        return dg.SkipReason("pool, features and scores are up to date")
    return [
        dg.RunRequest(
            run_key=f"select-{fingerprint(inputs)}",
            asset_selection=[candidate_scores.key, selected_subset.key],
            run_config=_user_ops(["candidate_scores", "selected_subset"]),
        )
    ]


@dg.sensor(
    name="new_candidate_data",
    minimum_interval_seconds=int(os.environ.get(INTERVAL_ENV, "60")),
    default_status=dg.DefaultSensorStatus.STOPPED,
    target=[candidate_pool, candidate_gradient_pass, candidate_scores, selected_subset],
    description=f"Refresh when candidate files under ${WATCH_ENV} are added, changed or removed",
)
def new_candidate_data(context: dg.SensorEvaluationContext, storage: ArtifactStore):
    watch_dir = os.environ.get(WATCH_ENV)
    if not watch_dir:
        return dg.SkipReason(f"set {WATCH_ENV} to the directory of candidate JSONL files to watch")
    shards = sorted(context.instance.get_dynamic_partitions(CANDIDATE_SHARDS))
    return refresh_requests(storage, watch_dir, shards)


refresh_job = dg.define_asset_job(
    "refresh_job",
    selection=dg.AssetSelection.assets(candidate_pool),
    description="Re-read the candidate files; the sensor or automation does the rest",
)


@dg.schedule(
    name="periodic_refresh",
    job=refresh_job,
    cron_schedule=os.environ.get(CRON_ENV, "0 3 * * 1"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=f"Re-read the candidate files on a cron (${CRON_ENV}, default Mondays 03:00)",
)
def periodic_refresh(context: dg.ScheduleEvaluationContext):
    watch_dir = os.environ.get(WATCH_ENV)
    return dg.RunRequest(run_config=pool_run_config(watch_dir) if watch_dir else _user_ops(["candidate_pool"]))


# Declarative automation where it is cheap and safe: the basis follows new target
# gradients, the selection follows new scores (the assets carry AutomationCondition.eager()).
# Evaluated only while this sensor runs (off by default).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "gist_automation",
    target=dg.AssetSelection.assets("spectral_basis", "selected_subset"),
    default_status=dg.DefaultSensorStatus.STOPPED,
)
