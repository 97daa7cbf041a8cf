"""Materialize the graph: ``python -m gist_assets.run [--config run.yaml] [--compare] [--force]``.

Launches the code location's own jobs (``prepare_job``, ``features_job`` once per
shard, ``select_job``; with ``--compare`` also ``baseline_features_job`` and
``compare_job``) on the persistent Dagster instance in ``$DAGSTER_HOME`` (default
``<storage root>/dagster_home``), so every run shows in ``make ui`` under its job
name and can be re-executed or backfilled there.

Only what is missing or stale runs. An asset is stale when Dagster says so (a new
code version or an upstream's new data version) or when its own effective
config, or the resources' config, differs from the one of its last
materialization; within a stage, what depends on a recomputed asset recomputes
too. ``--force`` recomputes everything.
"""

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dagster as dg

from gist_core import targets as target_loaders
from gist_core.data import expand_paths, file_signatures
from gist_resources import ArtifactStore, default_storage_root
from gist_resources.dagster_home import ensure_dagster_home
from gist_resources.score_store import DATABASE_NAME

from .config import (
    ASSET_CONFIGS,
    SCORING_METHODS,
    RunConfigError,
    check_run_config,
    effective_config,
    for_assets,
    load_run_config,
)
from .definitions import ASSETS, JOB_ASSETS, PARTITIONED_JOBS
from .partitions import candidate_shards
from .scores import METHOD
from .sketches import ASSET as SKETCH_ASSET
from .sketches import KIND as SKETCH_KIND
from .sketches import made_with
from .steps import RECOMPUTE_TAG

LOCATION_NAME = "gist"  # workspace.yaml's location_name: CLI runs re-execute from the UI under it
DEFINITIONS_MODULE, DEFINITIONS_ATTR = "gist_assets.definitions", "defs"
REPO_DIR = str(Path(__file__).resolve().parents[1])
MAIN_STAGES = ["prepare_job", "features_job", "select_job"]
COMPARE_STAGES = ["baseline_features_job", "compare_job"]


class PipelineError(RuntimeError):
    """A step or a blocking check failed; the message carries the asset's own error."""


def with_storage(run_config: dict, root: str) -> dict:
    """The run config with the storage root and database bound, unless the file sets them."""
    resources = dict(run_config.get("resources") or {})
    storage = resources.setdefault("storage", {}).setdefault("config", {})
    storage.setdefault("root", str(Path(root).resolve()))
    db = resources.setdefault("score_store", {}).setdefault("config", {})
    db.setdefault("database", str(Path(storage["root"]) / DATABASE_NAME))
    return {**run_config, "resources": resources}


# ------------------------------------------------------------------ the plan


@dataclass
class StagePlan:
    job: str
    partition: str | None = None
    run: list[str] = field(default_factory=list)  # assets to materialize, in graph order
    reasons: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, float] = field(default_factory=dict)  # asset -> timestamp of its last materialization
    skipped: dict[str, str] = field(default_factory=dict)  # asset -> why it is not run at all


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0].event_log_entry if records else None


def _config_change(asset: str, before: dict, now: dict, recorded: dict | None = None) -> str | None:
    """What changed in the asset's effective config (or the resources) since the run that built it;
    ``recorded``: the config its stored output records, which outranks the run's (another job may have made it)."""
    try:
        old = recorded or (effective_config(before, asset) if asset in ASSET_CONFIGS else {})
    except RunConfigError:
        return "its config was invalid then"
    new = effective_config(now, asset) if asset in ASSET_CONFIGS else {}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        return "config changed: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    if _resources(before) != _resources(now):
        return "resource config changed"
    return None


def _resources(run_config: dict) -> dict:
    """The resources' config as a run used them: one launched without a storage root (from the UI) used the
    code location's default root and its database, as the CLI does unless told another root."""
    return with_storage(run_config, default_storage_root())["resources"]


def _input_files_changed(asset: str, run_config: dict) -> str | None:
    """For the assets that read the user's files: those changed (size or modification time) or added or
    removed since the asset last read them. Dagster cannot see them: they are not assets."""
    if asset not in ("candidate_pool", "target_sets"):
        return None
    storage = ArtifactStore(root=run_config["resources"]["storage"]["config"]["root"])
    config = effective_config(run_config, asset)
    try:
        if asset == "candidate_pool":
            if not config["paths"]:  # the embedded pool: written by the asset itself
                return None
            recorded, now = storage.pool_record().get("files"), file_signatures(expand_paths(config["paths"]))
        else:
            paths = target_loaders.source_files([spec["path"] for spec in config["targets"]])
            recorded, now = storage.targets_record().get("files"), file_signatures(paths)
    except FileNotFoundError as exc:  # input files gone, or the asset's own record: it runs and says so
        return f"input files changed: {exc}"
    if recorded is None or recorded == now:  # a record from before files were kept: nothing to compare
        return None
    moved = sorted(p for p in set(recorded) | set(now) if recorded.get(p) != now.get(p))
    return "input files changed: " + ", ".join(moved[:3]) + (f" (+{len(moved) - 3} more)" if len(moved) > 3 else "")


def _made_with(asset: str, partition: str | None, run_config: dict) -> dict | None:
    """The config a shard's sketches were made with, from their meta: parallel_features_job and the UI make them
    under other keys than the run-config file's."""
    if asset != SKETCH_ASSET or partition is None:
        return None
    meta = ArtifactStore(root=run_config["resources"]["storage"]["config"]["root"]).shard_features_meta(
        SKETCH_KIND, partition
    )
    return made_with(meta) if meta else None


def _label(asset: str, partition: str | None) -> str:
    return f"{asset}[{partition}]" if partition else asset


def _stale_reason(resolver, key: dg.AssetKey, partition: str | None) -> str | None:
    from dagster._core.definitions.data_version import StaleStatus

    if resolver.get_status(key, partition) != StaleStatus.STALE:
        return None
    causes = resolver.get_stale_root_causes(key, partition)
    parts = sorted({f"{_label(c.key.asset_key.to_user_string(), c.key.partition_key)} {c.reason}" for c in causes})
    return "stale: " + "; ".join(parts[:3]) + (f" (+{len(parts) - 3} more)" if len(parts) > 3 else "")


def plan_stage(
    instance: dg.DagsterInstance,
    job: str,
    run_config: dict,
    partition: str | None = None,
    force: bool = False,
    changed: frozenset[str] = frozenset(),
) -> StagePlan:
    """Which of the stage's assets to materialize, and why; the others are up to date.

    ``changed``: assets an earlier stage of this invocation gave a new data version. Dagster's own
    marker misses some of those (past 100 upstream partitions it stops tracking), so they are named here.
    """
    from dagster._utils.test.data_versions import get_stale_status_resolver

    resolver = get_stale_status_resolver(instance, ASSETS)
    graph = {key.to_user_string(): (a, key) for a in ASSETS for key in a.keys}
    plan = StagePlan(job, partition)
    methods = effective_config(run_config, "candidate_scores")["methods"]
    # The feature assets no requested method reads (a new target with only gist_sketch runs no pool pass).
    unused = set(SCORING_METHODS.values()) - {SCORING_METHODS[m] for m in methods}
    for name in JOB_ASSETS[job]:
        if name in unused:
            plan.skipped[name] = "not read by the requested methods (candidate_scores.methods)"
            continue
        assets_def, key = graph[name]
        upstream = {k.to_user_string() for k in assets_def.asset_deps[key]}
        entry = _latest(instance, key, partition)
        reason = None
        if force:
            reason = "--force"
        elif entry is None:
            reason = "never materialized"
        elif recomputing := sorted(upstream & set(plan.run)):
            reason = f"upstream {', '.join(recomputing)} recomputes"
        elif moved := sorted(upstream & changed):
            verb = "has a new data version" if len(moved) == 1 else "have new data versions"
            reason = f"upstream {', '.join(moved)} {verb}"
        else:
            prior = instance.get_run_by_id(entry.run_id)
            reason = (
                _config_change(
                    name, dict(prior.run_config) if prior else {}, run_config, _made_with(name, partition, run_config)
                )
                or _input_files_changed(name, run_config)
                or _stale_reason(resolver, key, partition)
            )
        if reason:
            plan.run.append(name)
            plan.reasons[name] = reason
        else:
            plan.fresh[name] = entry.timestamp
    return plan


# ------------------------------------------------------------------ running


def _recon_job(job: str):
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repo = ReconstructableRepository.for_module(DEFINITIONS_MODULE, DEFINITIONS_ATTR, working_directory=REPO_DIR)
    return repo.get_reconstructable_job(job)


def _remote_origin(job: str):
    """The origin the UI's workspace gives this job, so the UI can re-execute a CLI run."""
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    target = LoadableTargetOrigin(
        executable_path=sys.executable,
        module_name=DEFINITIONS_MODULE,
        attribute=DEFINITIONS_ATTR,
        working_directory=REPO_DIR,
    )
    repo = RemoteRepositoryOrigin(ManagedGrpcPythonEnvCodeLocationOrigin(target, LOCATION_NAME), "__repository__")
    return RemoteJobOrigin(repo, job)


def _root_error(result) -> str:
    errors = [e.step_failure_data.error for e in result.get_step_failure_events() if e.step_failure_data.error]
    if errors:
        # The step's error wraps the asset's own; the innermost cause is what the user can act on.
        err = errors[0]
        while err.cause is not None:
            err = err.cause
        return err.message.strip()
    failed = [e for e in result.all_events if e.is_failure]
    return failed[0].message if failed else "see the run's logs in the UI"


def launch(
    instance: dg.DagsterInstance,
    job: str,
    assets: list[str],
    run_config: dict,
    partition: str | None = None,
    recompute: bool = False,
):
    """One run of ``job`` for ``assets`` (and their checks), executed here, recorded as the UI records its own;
    ``recompute``: nothing is carried over from earlier materializations (``--force``)."""
    from dagster._core.execution.api import execute_run

    recon = _recon_job(job)
    if job in PARTITIONED_JOBS:
        run_config = for_assets(run_config, JOB_ASSETS[job])
    tags = {"dagster/partition": partition} if partition else {}
    if recompute:
        tags[RECOMPUTE_TAG] = "all"
    run = instance.create_run_for_job(
        job_def=recon.get_definition(),
        run_config=run_config,
        tags={**tags, "gist/launched_by": "cli"},
        asset_selection=frozenset(dg.AssetKey(a) for a in assets),
        remote_job_origin=_remote_origin(job),
        job_code_origin=recon.get_python_origin(),
    )
    result = execute_run(recon, run, instance)
    where = f"{job} ({', '.join(assets)}{', partition ' + partition if partition else ''}, run {run.run_id[:8]})"
    if not result.success:
        raise PipelineError(f"{where} failed: {_root_error(result)}")
    for ev in result.get_asset_check_evaluations():
        if not ev.passed:
            raise PipelineError(f"{where}: asset check {ev.check_name} failed: {ev.metadata}")
    return result


def materialize(
    assets: list[str], run_config: dict, instance: dg.DagsterInstance, root: str, partition: str | None = None
):
    """Launch ``assets`` through the stage job that holds them (all must be in one job), no staleness check."""
    jobs = [j for j, names in JOB_ASSETS.items() if set(assets) <= set(names)]
    if not jobs:
        raise ValueError(f"assets {assets} are not all in one job; jobs: {JOB_ASSETS}")
    ordered = [a for a in JOB_ASSETS[jobs[0]] if a in assets]
    return launch(instance, jobs[0], ordered, with_storage(run_config or {}, root), partition)


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _data_version(instance: dg.DagsterInstance, name: str, partition: str | None) -> str | None:
    entry = _latest(instance, dg.AssetKey(name), partition)
    return entry.asset_materialization.tags.get("dagster/data_version") if entry else None


def run_stage(instance, job: str, run_config: dict, force: bool, log, changed: set[str]) -> dict:
    """Plan and run one stage (each shard of a partitioned one); {asset[partition]: what happened}.

    Adds to ``changed`` the assets whose data version this stage changed.
    """
    partitions = sorted(instance.get_dynamic_partitions(candidate_shards.name)) if job in PARTITIONED_JOBS else [None]
    report = {}
    for partition in partitions:
        plan = plan_stage(instance, job, run_config, partition, force, frozenset(changed))
        for name, ts in plan.fresh.items():
            report[_label(name, partition)] = f"up to date (materialized at {_stamp(ts)})"
        for name, why in plan.skipped.items():
            report[_label(name, partition)] = f"skipped ({why})"
        if plan.run:
            for name in plan.run:
                log(f"  {_label(name, partition)}: recomputing ({plan.reasons[name]})")
            before = {name: _data_version(instance, name, partition) for name in plan.run}
            start = time.perf_counter()
            launch(instance, job, plan.run, run_config, partition, recompute=force)
            secs = time.perf_counter() - start
            changed.update(n for n in plan.run if _data_version(instance, n, partition) != before[n])
            for name in plan.run:
                report[_label(name, partition)] = f"recomputed ({plan.reasons[name]}) by {job}, a {secs:.1f}s run"
    return report


def quiet_console(run_config: dict) -> dict:
    """Dagster's console logger at INFO (its DEBUG events are one line per engine step), unless configured."""
    return (
        run_config
        if run_config.get("loggers")
        else {**run_config, "loggers": {"console": {"config": {"log_level": "INFO"}}}}
    )


def run_all(
    run_config: dict | None = None,
    root: str = "",
    instance: dg.DagsterInstance | None = None,
    log=print,
    compare: bool = False,
    force: bool = False,
) -> dict:
    """Materialize what is missing or stale; return the selections, what each asset did, timings, the database."""
    root = str(Path(root or default_storage_root()).resolve())
    run_config = with_storage(run_config or {}, root)
    check_run_config(run_config)
    if instance is None:
        ensure_dagster_home(root)
        with dg.DagsterInstance.get() as instance:
            return run_all(run_config, root, instance, log, compare, force)
    timings: dict[str, float] = {}
    report: dict[str, str] = {}
    changed: set[str] = set()
    for job in MAIN_STAGES + (COMPARE_STAGES if compare else []):
        start = time.perf_counter()
        log(f"{job}:")
        report.update(run_stage(instance, job, run_config, force, log, changed))
        timings[job] = time.perf_counter() - start
    database = run_config["resources"]["score_store"]["config"]["database"]
    methods = effective_config(run_config, "candidate_scores")["methods"]
    return {
        "selections": current_selections(root),
        "selections_by_method": {m: current_selections(root, m) for m in methods},
        "report": report,
        "timings": timings,
        "database": database,
        "root": root,
    }


def summarize(report: dict[str, str]) -> list[str]:
    """One line per asset; a partitioned asset's shards that are up to date or skipped are counted, not listed."""
    lines: list[str] = []
    grouped: dict[tuple[str, str], list[str]] = {}
    for name, what in report.items():
        base = name.split("[", 1)[0]
        if base != name and what.startswith(("up to date", "skipped")):
            status = "up to date" if what.startswith("up to date") else what
            grouped.setdefault((base, status), []).append(name)
        else:
            lines.append(f"{name}: {what}")
    for (base, status), names in grouped.items():
        lines.append(f"{base}: {len(names)} shard{'s' if len(names) != 1 else ''} {status}")
    return lines


def current_selections(root: str, method: str = METHOD) -> dict:
    """One method's selection manifests (default: exact GIST) of the configured targets (those of the current
    bases), by target and budget; exports of targets no longer configured are left out even if still on disk."""
    storage = ArtifactStore(root=root)
    try:
        targets = sorted(storage.read_basis_manifest()["targets"])
    except FileNotFoundError:
        return {}
    return {t: manifests for t in targets if (manifests := storage.selection_manifests(t, method))}


def print_summary(database: str) -> None:
    """The evaluation summary as markdown: mean ± std over seeds, held-out counts, the verdicts."""
    from gist_resources import ScoreStore

    print(summary_markdown(ScoreStore(database=database).read_evaluation_summary().to_dicts()))


def summary_markdown(rows: list[dict]) -> str:
    """The summary rows as the markdown table docs/evaluation.md shows."""

    def interval(r, ref):
        if r[f"diff_vs_{ref}"] is None:
            return ""
        if r[f"diff_vs_{ref}_lo"] is None:
            return f"{r[f'diff_vs_{ref}']:+.3f}"
        return f"{r[f'diff_vs_{ref}']:+.3f} [{r[f'diff_vs_{ref}_lo']:+.3f}, {r[f'diff_vs_{ref}_hi']:+.3f}]"

    lines = [
        "| target | budget | method | seeds | train examples | held-out examples | held-out loss "
        "(mean ± std) | vs random (95% CI) | better than random | vs full pool (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        std = "" if r["std_loss"] is None else f" ± {r['std_loss']:.3f}"
        lines.append(
            f"| {r['target']} | {r['budget'] or ''} | {r['method']} | {r['seeds']} | "
            f"{int(r['train_examples'])} | {r['heldout_examples']} | {r['mean_loss']:.3f}{std} | "
            f"{interval(r, 'random')} | {r['better_than_random'] or ''} | {interval(r, 'full_pool')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run-config YAML: ops: {asset_name: {config: {...}}}, resources: {...}")
    parser.add_argument("--root", default="", help="storage root (default $GIST_STORAGE_ROOT or ./.gist)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the baselines (random, less, "
        "representation) and fine-tune on every selection to compare held-out loss",
    )
    parser.add_argument("--force", action="store_true", help="recompute every asset, stale or not")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        run_config = load_run_config(args.config)
        out = run_all(
            run_config if args.debug else quiet_console(run_config), args.root, compare=args.compare, force=args.force
        )
    except (RunConfigError, PipelineError) as exc:
        if args.debug:
            traceback.print_exc()
        kind = "config error" if isinstance(exc, RunConfigError) else "error"
        print(f"{kind}: {exc}", file=sys.stderr)
        if not args.debug:
            print("(rerun with --debug for the traceback; the run's logs are in `make ui`)", file=sys.stderr)
        return 2 if isinstance(exc, RunConfigError) else 1
    print("\n=== assets ===")
    for line in summarize(out["report"]):
        print(f"  {line}")
    for method, selections in out["selections_by_method"].items():
        print(f"\n=== {method} selection ===")
        for target, per_budget in selections.items():
            for budget, m in per_budget.items():
                mix = ", ".join(f"{s} {n}" for s, n in sorted(m["counts_per_source"].items(), key=lambda kv: -kv[1]))
                print(f"{target} [{budget}]: {m['selected']} of {m['scored_candidates']} candidates ({mix})")
                print(f"    {Path(out['root'], m['files']['messages_jsonl'])}")
    print(f"scores: {out['database']} (views candidate_scores, subtask_scores; table selections)")
    if args.compare:
        print(f"\nevaluation ({out['database']}: table evaluations, view evaluation_summary):")
        print_summary(out["database"])
    for step, secs in out["timings"].items():
        print(f"  {secs:6.1f}s  {step}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
