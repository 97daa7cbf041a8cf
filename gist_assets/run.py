"""Materialize the whole graph: ``python -m gist_assets.run [--config run.yaml]``.

Runs against a persistent Dagster instance (``$DAGSTER_HOME``, default
``<storage root>/dagster_home``) so `make ui` shows the same runs and lineage.
Three steps: everything up to the spectral bases, one run per candidate shard
(each shard can also be launched, retried or backfilled alone in the UI),
then scores and selections.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import dagster as dg
import yaml

from gist_resources.storage import default_storage_root

from .definitions import ASSETS, CHECKS, make_resources
from .partitions import candidate_shards
from .scores import METHOD

PREPARE = ["candidate_pool", "target_sets", "base_model", "warmup_checkpoint", "target_gradients", "spectral_basis"]
SHARD = ["candidate_features"]
SELECT = ["candidate_scores", "selected_subset"]
# --compare adds the baselines and the fine-tune-and-evaluate stage.
COMPARE_SHARD = ["less_candidate_features", "representation_features"]
COMPARE_SELECT = ["baseline_scores"]
EVALUATE = ["selection_evaluation"]


class PipelineError(RuntimeError):
    """A step or a blocking check failed; the message carries Dagster's error."""


def ensure_dagster_home(root: str) -> str:
    home = os.environ.get("DAGSTER_HOME") or str(Path(root) / "dagster_home")
    Path(home).mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = home
    return home


def _ops_config(run_config: dict, names: list[str]) -> dict:
    ops = run_config.get("ops", {})
    return {"ops": {k: v for k, v in ops.items() if k in names}}


def _materialize(names, run_config, instance, resources, partition_key=None):
    selection = [a for a in ASSETS if a.key.to_user_string() in names]
    checks = [c for c in CHECKS if any(k.asset_key.to_user_string() in names for k in c.check_keys)]
    result = dg.materialize([*selection, *checks], instance=instance, resources=resources,
                            run_config=_ops_config(run_config, names), partition_key=partition_key,
                            raise_on_error=False)
    if not result.success:
        failed = [e for e in result.all_events if e.is_failure]
        msg = failed[0].message if failed else "see the Dagster logs"
        # The event message only says "Execution of step ... failed"; the asset's own error is the
        # innermost cause of the step's (wrapped) error.
        errors = [e.step_failure_data.error for e in result.get_step_failure_events() if e.step_failure_data.error]
        if errors:
            err = errors[0]
            while err.cause is not None:
                err = err.cause
            msg = err.message.strip()
        raise PipelineError(f"materialization of {names} (partition {partition_key}) failed: {msg}")
    for ev in result.get_asset_check_evaluations():
        if not ev.passed:
            raise PipelineError(f"asset check {ev.check_name} failed: {ev.metadata}")
    return result


def run_all(run_config: dict | None = None, root: str = "", instance: dg.DagsterInstance | None = None,
            log=print, compare: bool = False) -> dict:
    """Materialize everything; return the selections' manifests, step timings and the database path."""
    run_config = run_config or {}
    root = root or default_storage_root()
    resources = make_resources(root)
    if instance is None:
        ensure_dagster_home(root)
        with dg.DagsterInstance.get() as instance:
            return run_all(run_config, root, instance, log, compare)
    timings = {}
    t = time.perf_counter()
    _materialize(PREPARE, run_config, instance, resources)
    timings["prepare (pool, targets, model, warmup, target gradients, basis)"] = time.perf_counter() - t
    shards = sorted(instance.get_dynamic_partitions(candidate_shards.name))
    t = time.perf_counter()
    shard_assets = SHARD + (COMPARE_SHARD if compare else [])
    for i, shard in enumerate(shards, 1):
        _materialize(shard_assets, run_config, instance, resources, partition_key=shard)
        log(f"{', '.join(shard_assets)} {i}/{len(shards)}: {shard}")
    timings[f"{', '.join(shard_assets)} ({len(shards)} shards)"] = time.perf_counter() - t
    t = time.perf_counter()
    _materialize(SELECT + (COMPARE_SELECT if compare else []), run_config, instance, resources)
    timings["scores and selection"] = time.perf_counter() - t
    if compare:
        t = time.perf_counter()
        _materialize(EVALUATE, run_config, instance, resources)
        timings["evaluation (fine-tune on each selection)"] = time.perf_counter() - t
    storage = resources["storage"]
    manifests = {}
    for path in sorted(storage.path("selections").glob(f"*/{METHOD}/manifest.json")):
        m = json.loads(path.read_text())
        manifests[m["target"]] = m
    return {"selections": manifests, "timings": timings, "database": resources["score_store"].database}


def print_evaluations(database: str) -> None:
    """The evaluations table as markdown, best held-out loss first within each target."""
    import duckdb

    with duckdb.connect(database, read_only=True) as db:
        rows = db.execute("SELECT target, method, train_examples, heldout_loss, accuracy, bytes_per_candidate, "
                          "feature_pass_seconds FROM evaluations ORDER BY target, heldout_loss").fetchall()
    print("\n| target | method | train examples | held-out loss | accuracy | feature bytes/candidate | "
          "feature pass s |\n|---|---|---|---|---|---|---|")
    for t, m, n, loss, acc, nbytes, secs in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"| {t} | {m} | {n} | {loss:.3f} | {fmt(acc, '.3f')} | {fmt(nbytes, '.0f')} | {fmt(secs, '.1f')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run-config YAML (ops: {asset_name: {config: {...}}})")
    parser.add_argument("--root", default="", help="storage root (default $GIST_STORAGE_ROOT or ./.gist)")
    parser.add_argument("--compare", action="store_true", help="also run the baselines (random, less, "
                        "representation) and fine-tune on every selection to compare held-out loss")
    args = parser.parse_args(argv)
    run_config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    start = time.perf_counter()
    try:
        out = run_all(run_config, args.root, compare=args.compare)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n=== GIST selection ===")
    for target, m in out["selections"].items():
        mix = ", ".join(f"{s} {n}" for s, n in sorted(m["counts_per_source"].items(), key=lambda kv: -kv[1]))
        print(f"{target}: {m['selected']} of {m['scored_candidates']} candidates ({mix})")
        print(f"    {m['files']['jsonl']}")
    print(f"scores: {out['database']} (tables candidate_scores, subtask_scores, selections)")
    if args.compare:
        print_evaluations(out["database"])
    for step, secs in out["timings"].items():
        print(f"  {secs:6.1f}s  {step}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
