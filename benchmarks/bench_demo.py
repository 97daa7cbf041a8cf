"""End-to-end wall time of the embedded default (what `make demo` runs), split by asset.

Runs ``gist_assets.run.run_all({}, root, instance=...)`` inside
``dagster.instance_for_test()`` with a temporary storage root, then reads every
run's event log (STEP_START / STEP_SUCCESS per step key) for each step's duration,
so the table shows where the time goes: one row per asset (the feature shards are
summed, with their count), asset checks as their own rows, and the Dagster overhead
(run wall time not inside any step: run launch, storage, event log).

    .venv/bin/python benchmarks/bench_demo.py            # the embedded default, goal < 3 minutes
    .venv/bin/python benchmarks/bench_demo.py --quick    # a tiny run config (seconds), smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, BackgroundLoad, add_wait_quiet, machine_line, table, wait_for_quiet  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from small_config import SMALL  # noqa: E402

# The tests' small config of the embedded default, minus the evaluation asset run_all does not run.
QUICK = {"ops": {op: cfg for op, cfg in SMALL["ops"].items() if op != "selection_evaluation"}}
GOAL_S = 180.0


def step_durations(instance) -> tuple[dict, list[dict]]:
    """Per step key: [durations] from STEP_START/STEP_SUCCESS; plus per-run wall times."""
    import dagster as dg

    steps: dict[str, list[float]] = defaultdict(list)
    runs = []
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE}
    for run in reversed(instance.get_runs()):
        start: dict[str, float] = {}
        in_steps = 0.0
        for entry in instance.all_logs(run.run_id, of_type=kinds):
            ev = entry.dagster_event
            if ev.event_type == dg.DagsterEventType.STEP_START:
                start[ev.step_key] = entry.timestamp
            elif ev.step_key in start:
                d = entry.timestamp - start.pop(ev.step_key)
                steps[ev.step_key].append(d)
                in_steps += d
        stats = instance.get_run_stats(run.run_id)
        wall = (stats.end_time or 0) - (stats.start_time or 0)
        runs.append(
            {
                "run": run.run_id[:8],
                "partition": run.tags.get("dagster/partition", "-"),
                "wall": wall,
                "in_steps": in_steps,
            }
        )
    return steps, runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny run config instead of the embedded default")
    p.add_argument("--dir", default=None, help="parent of the temporary storage root")
    add_wait_quiet(p)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Dagster's event log on stderr (default: kept in a file, shown on failure)",
    )
    args = p.parse_args(argv)

    import dagster as dg
    import torch

    from gist_assets.run import run_all

    run_config = QUICK if args.quick else {}
    print(
        f"# bench_demo: {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"dagster {dg.__version__}"
    )
    print(f"run config: {'QUICK (tiny)' if args.quick else 'embedded default ({})'}", flush=True)
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, dg.instance_for_test() as instance:
        root = str(Path(tmp) / "gist_root")
        t0 = time.perf_counter()
        log_path = Path(tmp) / "dagster_stderr.log"
        with (
            open(log_path, "w") as log_file,
            BackgroundLoad() as bg,
            contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(log_file),
        ):
            try:
                out = run_all(run_config, root, instance=instance, log=lambda s: None)
            except BaseException:
                log_file.flush()
                assert sys.__stderr__ is not None  # the process's own stderr, not the redirected one
                sys.__stderr__.write("".join(log_path.read_text().splitlines(True)[-60:]))
                raise
        total = time.perf_counter() - t0
        steps, runs = step_durations(instance)

    rows, in_steps = [], 0.0
    for key, ds in sorted(steps.items(), key=lambda kv: -sum(kv[1])):
        s = sum(ds)
        in_steps += s
        rows.append(
            {
                "step (asset / check)": key,
                "runs": len(ds),
                "seconds": f"{s:.1f}",
                "share": f"{s / total:.1%}",
                "per run s": f"{s / len(ds):.2f}" if len(ds) > 1 else "-",
            }
        )
    run_wall = sum(r["wall"] for r in runs)
    rows.append(
        {
            "step (asset / check)": "(Dagster run overhead: run wall time outside steps)",
            "runs": len(runs),
            "seconds": f"{run_wall - in_steps:.1f}",
            "share": f"{(run_wall - in_steps) / total:.1%}",
            "per run s": f"{(run_wall - in_steps) / len(runs):.2f}",
        }
    )
    rows.append(
        {
            "step (asset / check)": "(outside runs: run_all's own work, instance calls)",
            "runs": "-",
            "seconds": f"{total - run_wall:.1f}",
            "share": f"{(total - run_wall) / total:.1%}",
            "per run s": "-",
        }
    )
    rows.append(
        {
            "step (asset / check)": "TOTAL wall time of run_all",
            "runs": len(runs),
            "seconds": f"{total:.1f}",
            "share": "100%",
            "per run s": "-",
        }
    )
    print("\nWall time by step (from the event log: STEP_START -> STEP_SUCCESS)")
    print(table(rows))
    print("\nrun_all's own phase timings:")
    for phase, secs in out["timings"].items():
        print(f"  {secs:6.1f}s  {phase}")
    sel = ", ".join(
        f"{t} [{b}]: {m['selected']} of {m['scored_candidates']}"
        for t, per in out["selections"].items()
        for b, m in per.items()
    )
    print(f"selections: {sel}")
    print(f"other processes used {bg.value:.2f} CPUs on average during the run")
    print("\nRATIOS")
    print(
        f"  total {total:.1f}s / goal {GOAL_S:.0f}s = {total / GOAL_S:.2f} -> "
        f"{'met' if total < GOAL_S else 'NOT met'}"
        f"{' (quick config; the goal is for the default)' if args.quick else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
