"""gist_sketch against exact GIST: agreement (per target, against d), held-out loss, cost of a new target.

All through the project's run path (``gist_assets.run.run_all`` on a test instance):

1. first run: two targets, ``methods: [gist, gist_sketch]``, sketches of dimension ``--dim``;
2. a third target is added, ``methods: [gist_sketch]``: the time to add a target with the sketch
   (target gradients + SVD + scoring; the report must show no pool pass);
3. ``methods: [gist]`` on the same three targets: the exact pool pass the new target costs without it;
4. agreement of gist_sketch with gist per target at every d' of ``--curve`` (a CountSketch folded
   mod d', or a dense projection's first d' columns rescaled by sqrt(d/d'), is a d'-dimensional sketch
   of the same kind; at d' = d the scores are the stored ones, which is checked): Spearman, top-5% and
   top-1% overlap;
5. ``selection_evaluation`` (gist and gist_sketch selections, top 5%) for each of ``--seeds`` seeds.

    .venv/bin/python benchmarks/bench_sketch.py                  # embedded default (~1 h on a busy 2-core machine)
    .venv/bin/python benchmarks/bench_sketch.py --pool realtext  # benchmarks/data/realtext pool
    .venv/bin/python benchmarks/bench_sketch.py --quick          # tiny config, smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, BackgroundLoad, machine_line, table  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from small_config import SMALL  # noqa: E402

TARGETS = ("arithmetic_sums", "word_reversal", "geography")  # the last is the one added later
CURVE = (512, 1024, 2048, 4096, 8192, 16384)
LESS_DIM = 8192  # LESS's projection dimension (per checkpoint)
POOL_STEP = "candidate_gradient_pass"  # the step of candidate_features and candidate_sketches (one pass per shard)


def spearman(a, b) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    import numpy as np
    import polars as pl

    ra, rb = (pl.Series(x).rank("average").to_numpy() for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(exact, approx, ids, fraction: float) -> float:
    """|top(exact) & top(approx)| / n, top n = ceil(fraction * M), ties by id as the selection breaks them."""
    from gist_core.selection import rank_order, selection_size

    n = selection_size(len(ids), fraction, None)
    a = set(rank_order(exact, ids)[:n].tolist())
    b = set(rank_order(approx, ids)[:n].tolist())
    return len(a & b) / n


def sketch_scores_at(storage, bases, weights, sketches, projector, dims):
    """{d': {target: score (M,)}}: gist_sketch scores from the first d' sketch columns, rescaled."""
    import numpy as np

    from gist_assets.scores import target_scorers

    ckpts = [c["name"] for c in bases["checkpoints"]]
    scorers = target_scorers(storage, bases, weights)
    PV = {}
    for c in ckpts:
        V, slices = storage.bases_side_by_side(c, sorted(scorers))
        PV[c] = (projector.project_columns(V), slices)

    def smaller(x, d):
        """The d-dimensional sketch (rows of x are sketches or columns of P^T V) of the same kind."""
        if projector.kind == "countsketch":  # bucket b -> b mod d: a CountSketch with d buckets, same signs
            return x.reshape(x.shape[0], projector.dim // d, d).sum(axis=1)
        return x[:, :d] * np.sqrt(projector.dim / d)  # the first d columns of a dense projection, rescaled

    out = {}
    for d in dims:
        if projector.dim % d:
            raise ValueError(f"curve dimension {d} does not divide the sketch dimension {projector.dim}")
        per_target = {}
        for target, scorer in scorers.items():
            z = []
            for c in ckpts:
                pv, slices = PV[c]
                a, b = slices[target]
                z.append(smaller(sketches[c].astype(np.float64), d) @ smaller(pv[:, a:b].T, d).T)
            per_target[target] = scorer.subtask_scores(z).max(axis=1)
        out[d] = per_target
    return out


def run_timed(label, fn, log):
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    log(f"{label}: {secs:.1f}s")
    return out, secs


def steps_since(instance, before: set[str]) -> dict[str, float]:
    """Seconds per asset (shards summed) over the runs not in ``before``."""
    import dagster as dg

    totals: dict[str, float] = {}
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    for run in instance.get_runs():
        if run.run_id in before:
            continue
        start = {}
        for entry in instance.all_logs(run.run_id, of_type=kinds):
            ev = entry.dagster_event
            if ev.event_type == dg.DagsterEventType.STEP_START:
                start[ev.step_key] = entry.timestamp
            elif ev.step_key in start:
                totals[ev.step_key] = totals.get(ev.step_key, 0.0) + entry.timestamp - start.pop(ev.step_key)
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tests' tiny config (smoke test; figures not comparable)")
    p.add_argument(
        "--pool",
        choices=["embedded", "realtext"],
        default="embedded",
        help="embedded synthetic pool and targets, or benchmarks/data/realtext (pool and targets)",
    )
    p.add_argument("--dim", type=int, default=None, help="sketch dimension of the run (default: the config default)")
    p.add_argument("--curve", default=",".join(map(str, CURVE)), help="dimensions of the agreement curve (<= --dim)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds (fine-tunes per selection); 0: no evaluation")
    p.add_argument(
        "--pool-size", type=int, default=None, help="the embedded pool's size (default 4000): the cost's growth with N"
    )
    p.add_argument("--verbose", action="store_true", help="Dagster's event log on stderr")
    args = p.parse_args(argv)
    if args.pool_size and (args.quick or args.pool != "embedded"):
        p.error("--pool-size sizes the embedded pool: it goes with neither --quick nor --pool realtext")

    import dagster as dg
    import duckdb
    import numpy as np
    import polars as pl
    import torch

    from gist_assets.config import SKETCH_DIM
    from gist_assets.run import materialize, run_all
    from gist_assets.sketches import current_sketch_shards, sketch_rows
    from gist_core.scoring import checkpoint_weights
    from gist_demo import synthetic
    from gist_resources import ArtifactStore

    dim = args.dim or SKETCH_DIM
    dims = sorted({d for d in map(int, args.curve.split(",")) if d <= dim} | {dim})
    print(f"# bench_sketch: {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    log = lambda s: print(s, file=sys.__stdout__, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        root = str(Path(tmp) / "root")
        ops = dict(SMALL["ops"]) if args.quick else {}
        if args.quick:  # a smoke test of the steps: 160 embedded records in one file, two shards
            quick_pool = Path(tmp) / "quick_pool.jsonl"
            quick_pool.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate_pool(160)))
            ops["candidate_pool"] = {"config": {"paths": [str(quick_pool)], "shard_size": 80}}
        ops.pop("selection_evaluation", None)
        if args.pool_size:
            ops["candidate_pool"] = {"config": {"embedded_pool_size": args.pool_size}}
        ops.pop("selected_subset", None)  # the default 5%, as in the top-5% overlap
        if args.pool == "realtext":
            data = REPO / "benchmarks" / "data" / "realtext"
            ops["candidate_pool"] = {"config": {"paths": [str(data / "pool.jsonl")], "shard_size": 200}}
            target_files = {t: data / f"target_{t}.jsonl" for t in ("capitals", "past_tense", "antonyms")}
        else:
            target_files = synthetic.write_targets(Path(tmp) / "targets")
            target_files = {t: target_files[t] for t in TARGETS}
        names = list(target_files)
        spec = lambda t: {"name": t, "format": "jsonl", "path": str(target_files[t])}  # noqa: E731
        sketch_cfg = {"candidate_sketches": {"config": {"dim": dim}}}
        first = {"ops": {**ops, **sketch_cfg, "target_sets": {"config": {"targets": [spec(t) for t in names[:2]]}}}}
        later = {**ops, **sketch_cfg, "target_sets": {"config": {"targets": [spec(t) for t in names]}}}
        with_sketch = {"ops": {**later, "candidate_scores": {"config": {"methods": ["gist_sketch"]}}}}
        with_exact = {"ops": {**later, "candidate_scores": {"config": {"methods": ["gist"]}}}}

        log_file = open(Path(tmp) / "dagster.log", "w")
        with BackgroundLoad() as bg, contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(log_file):
            before: set[str] = set()
            _, t_first = run_timed(
                f"1. first run, targets {names[:2]}, gist + gist_sketch (d={dim})",
                lambda: run_all(first, root, instance=instance, log=lambda _: None),
                log,
            )
            s_first = steps_since(instance, before)
            before = {r.run_id for r in instance.get_runs()}
            out2, t_sketch = run_timed(
                f"2. add target {names[2]!r}, gist_sketch only",
                lambda: run_all(with_sketch, root, instance=instance, log=lambda _: None),
                log,
            )
            s_sketch = steps_since(instance, before)
            before = {r.run_id for r in instance.get_runs()}
            _, t_exact = run_timed(
                "3. the same targets, gist only (exact pool pass)",
                lambda: run_all(with_exact, root, instance=instance, log=lambda _: None),
                log,
            )
            s_exact = steps_since(instance, before)
            assert any(k.startswith(POOL_STEP) for k in s_first), f"no {POOL_STEP} step in the first run: {s_first}"
            pool_steps = [k for k in s_sketch if k.startswith(POOL_STEP)]
            assert not pool_steps, f"the gist_sketch run ran a pool pass: {pool_steps}"

            storage = ArtifactStore(root=root)
            bases = storage.read_basis_manifest()
            ckpts = [c["name"] for c in bases["checkpoints"]]
            avg_lr = {c["name"]: c["avg_lr"] for c in storage.read_warmup()["checkpoints"]}
            weights = checkpoint_weights([avg_lr[c] for c in ckpts])
            shards = sorted(instance.get_dynamic_partitions("candidate_shards"))
            _, projector = current_sketch_shards(storage, shards, ckpts)
            parts = [storage.read_shard_features("gist_sketch", s) for s in shards]
            sketches = {c: np.concatenate([sketch_rows(tensors, c) for _, tensors in parts]) for c in ckpts}
            # As stored (packed float16 rows and their scales), not as unpacked for scoring.
            stored_bytes = sum(t[k].nbytes for _, t in parts for c in ckpts for k in (c, f"{c}/scale") if k in t)
            side = pl.concat([p[0] for p in parts])
            exact_side = pl.concat([storage.read_shard_features("gist", s)[0] for s in shards])
            ids = side.filter(side["included"])["candidate_id"]
            assert ids.to_list() == exact_side.filter(exact_side["included"])["candidate_id"].to_list()
            curve = sketch_scores_at(storage, bases, weights, sketches, projector, dims)

            db = duckdb.connect(str(Path(root) / "gist.duckdb"), read_only=True)

            def stored(method, target):
                got = dict(
                    db.execute(
                        "SELECT candidate_id, score FROM candidate_scores WHERE method = ? AND target = ?",
                        [method, target],
                    ).fetchall()
                )
                return np.array([got[i] for i in ids])

            agreement, worst_check = [], 0.0
            for target in names:
                exact = stored("gist", target)
                worst_check = max(worst_check, float(np.abs(curve[dim][target] - stored("gist_sketch", target)).max()))
                for d in dims:
                    approx = curve[d][target]
                    agreement.append(
                        {
                            "target": target,
                            "d": d,
                            "spearman": spearman(exact, approx),
                            "top5_overlap": top_overlap(exact, approx, ids, 0.05),
                            "top1_overlap": top_overlap(exact, approx, ids, 0.01),
                        }
                    )
            db.close()

            eval_ops: dict[str, Any] = {
                **later,
                "selection_evaluation": {
                    "config": {"include_full_pool": False, **({"epochs": 1} if args.quick else {})}
                },
            }
            eval_ops["selection_evaluation"]["config"]["seeds"] = list(range(args.seeds))
            evals = []
            if args.seeds:
                run_timed(
                    f"5. selection_evaluation, seeds 0-{args.seeds - 1}",
                    lambda: materialize(["selection_evaluation"], {"ops": eval_ops}, instance, root),
                    log,
                )
                with duckdb.connect(str(Path(root) / "gist.duckdb"), read_only=True) as db:
                    evals = db.execute("SELECT seed, target, method, heldout_loss FROM evaluations").fetchall()

        n_scored, n_ckpt = len(ids), len(ckpts)
        sketch_bytes = round(stored_bytes / n_scored)
        print(
            f"\npool: {args.pool}{' (quick)' if args.quick else ''}; "
            f"{n_scored} scored candidates, {len(shards)} shards, "
            f"{n_ckpt} checkpoints, LoRA gradient D = {projector.layout.dim}, sketch d = {dim} "
            f"({projector.kind}, seed {projector.seed}); other processes used {bg.value:.2f} CPUs on average"
        )
        print(f"check: recomputed gist_sketch scores at d={dim} vs the stored ones: max |diff| {worst_check:.2e}")

        print("\nAgreement of gist_sketch with exact gist (per target and d)")
        print(table(agreement))
        print(
            "\nHeld-out loss after fine-tuning on each top-5% selection (selection_evaluation, "
            f"{args.seeds} seed(s); base = no fine-tuning)"
        )
        rows = []
        for target in names if evals else []:
            row = {"target": target}
            for method in ("base", "gist", "gist_sketch"):
                losses = [loss for s, t, m, loss in evals if t == target and m == method]
                if losses:
                    sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
                    row[method] = f"{statistics.mean(losses):.4f} +- {sd:.4f}"
            per_seed = [
                (dict(((m, loss) for s2, t2, m, loss in evals if s2 == s and t2 == target))) for s in range(args.seeds)
            ]
            diffs = [d["gist_sketch"] - d["gist"] for d in per_seed if "gist" in d and "gist_sketch" in d]
            row["sketch - exact (per seed)"] = ", ".join(f"{x:+.4f}" for x in diffs)
            rows.append(row)
        print(table(rows))

        shared = sum(v for k, v in s_sketch.items() if k.startswith(("target_gradients", "spectral_basis")))
        sketch_score = sum(v for k, v in s_sketch.items() if k.startswith("candidate_scores"))
        exact_pass = sum(v for k, v in s_exact.items() if k.startswith(POOL_STEP))  # features only
        exact_score = sum(v for k, v in s_exact.items() if k.startswith("candidate_scores"))
        first_pass = sum(v for k, v in s_first.items() if k.startswith(POOL_STEP))  # features and sketches
        cost = [
            {"step": "target gradients + SVD (all targets; both paths)", "seconds": shared},
            {"step": "gist_sketch: candidate_scores (all targets, from the sketches)", "seconds": sketch_score},
            {"step": "gist: candidate_features (exact pool pass, all shards)", "seconds": exact_pass},
            {"step": "gist: candidate_scores", "seconds": exact_score},
            {"step": "first run: one pass for features and sketches (2 targets)", "seconds": first_pass},
            {"step": "run_all wall: add a target with gist_sketch", "seconds": t_sketch},
            {"step": "run_all wall: then gist for it (exact)", "seconds": t_exact},
        ]
        print("\nCost of a new target (Dagster step durations, shards summed)")
        print(table(cost, floatfmt="{:.1f}"))
        storage_rows = [
            {
                "features": f"gist_sketch sketches (d={dim} float16 + a float32 scale, x {n_ckpt} ckpts)",
                "bytes/candidate": sketch_bytes,
            },
            {"features": f"LESS ({LESS_DIM} float32 x {n_ckpt} ckpts)", "bytes/candidate": LESS_DIM * 4 * n_ckpt},
        ]
        print("\nStorage per candidate")
        print(table(storage_rows))
        print("\nRATIOS")
        print(
            f"  new target, pool work: exact pass {exact_pass:.1f}s / gist_sketch scoring {sketch_score:.1f}s "
            f"= {exact_pass / sketch_score:.1f}x"
        )
        print(
            f"  new target, end to end (steps): (shared {shared:.1f} + exact {exact_pass + exact_score:.1f}) / "
            f"(shared {shared:.1f} + sketch {sketch_score:.1f}) = "
            f"{(shared + exact_pass + exact_score) / (shared + sketch_score):.1f}x"
        )
        print(
            f"  storage: LESS {LESS_DIM * 4 * n_ckpt} B / sketch {sketch_bytes} B = "
            f"{LESS_DIM * 4 * n_ckpt / sketch_bytes:.2f}x"
        )
        print(
            f"  one pass for features and sketches (first run) / exact features alone (step 3): "
            f"{first_pass:.1f}s / {exact_pass:.1f}s = {first_pass / max(exact_pass, 1e-9):.2f}"
        )
        at = [r for r in agreement if r["d"] == dim]
        print(f"  top-5% overlap at d={dim}: min over targets {min(r['top5_overlap'] for r in at):.3f} (goal >= 0.9)")
        del out2
    return 0


if __name__ == "__main__":
    sys.exit(main())
