"""Helpers shared by the reliability matrix: materialize by asset name, read what the user sees."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import dagster as dg

from gist_assets.config import CONFIG_NODES
from gist_assets.definitions import ASSETS, CHECKS, make_resources


def materialize(
    names: list[str],
    root: Path,
    instance,
    ops: dict | None = None,
    partition_key: str | None = None,
    resources: dict | None = None,
    checks: bool = True,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize the named assets (and their checks) into ``root``; never raises on a failed step."""
    known = {key.to_user_string(): a for a in ASSETS for key in a.keys}
    assets = list({id(known[n]): known[n] for n in names}.values())  # a multi-asset once
    selection: dg.AssetSelection = dg.AssetSelection.assets(*names)
    if checks:
        assets += [c for c in CHECKS if any(k.asset_key.to_user_string() in names for k in c.check_keys)]
    else:
        selection = selection.without_checks()
    res = make_resources(str(root))
    res.update(resources or {})
    # These tests are about the exact path's inputs and outputs; gist_sketch has its own (tests/test_sketch.py).
    ops = {"candidate_scores": {"methods": ["gist"]}, **(ops or {})}
    run_config = {"ops": {CONFIG_NODES.get(name, name): {"config": cfg} for name, cfg in ops.items() if name in names}}
    return dg.materialize(
        assets,
        selection=selection,
        instance=instance,
        resources=res,
        run_config=run_config,
        partition_key=partition_key,
        raise_on_error=False,
        tags=tags,
    )


def user_error(result: dg.ExecuteInProcessResult) -> str:
    """What a user reads: the innermost error of the first failed step (as gist_assets.run shows it)."""
    assert not result.success, "expected the run to fail"
    errors = [e.step_failure_data.error for e in result.get_step_failure_events() if e.step_failure_data.error]
    assert errors, "no step failure event"
    err = errors[0]
    while err.cause is not None:
        err = err.cause
    return err.message.strip()


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    mats = [
        e.step_materialization_data.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(asset)
    ]
    assert len(mats) == 1, mats
    return {k: v.value for k, v in mats[0].metadata.items()}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    return {f"{ev.asset_key.to_user_string()}:{ev.check_name}": ev for ev in result.get_asset_check_evaluations()}


def warnings_logged(instance, result: dg.ExecuteInProcessResult) -> list[str]:
    import logging

    return [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.dagster_event is None and e.level >= logging.WARNING
    ]


@contextlib.contextmanager
def fresh_instance(shards=()):
    """An in-memory Dagster instance that knows the given candidate shards (a tenth of the set-up time of a
    SQLite one; these tests read the runs they make, never another process)."""
    with dg.DagsterInstance.ephemeral() as instance:
        if shards:
            instance.add_dynamic_partitions("candidate_shards", list(shards))
        yield instance


def copy_root(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def write_jsonl(path: Path, records: list) -> Path:
    """dict items are dumped; str items written verbatim; bytes items written raw (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for r in records:
            raw = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode("utf-8")
            fh.write(raw + b"\n")
    return path


def conv(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def truncate_file(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}
