"""Scoring and selection at pool scale, through the assets' own code.

For each pool size (default 1M and 10M candidates; ``--quick``: 20K and 200K) a storage root is
laid out as the upstream assets leave it (not timed): the candidate pool Parquet file (text
included), one feature shard per 100K candidates as candidate_features writes it (safetensors of
z per checkpoint and target, the candidates sidecar, meta.json), spectral bases (k=16, 3 subtasks,
2 checkpoints) for 3 targets, the warmup and pool manifests and the dynamic partitions. Then, in a
fresh process per measurement:

* ``asset path``: the CLI's own ``select_job`` run (``gist_assets.run.materialize``: Dagster, the
  in-process executor, candidate_scores streamed shard by shard into the score store, its asset
  checks, selected_subset's bounded top-n and its JSONL/messages/Parquet exports at the 5% budget
  for every target).
* ``in memory (plain)``: the fairest plain baseline: every shard's features loaded into one array,
  the same cosine/max scores with the same numpy calls, and the top 5% per target by
  ``rank_order``; no Dagster, no files written.

Reported per size: wall time and peak RSS of each process (its own ``ru_maxrss`` at exit), the asset
path's step times, the ratios between the sizes (10 = linear for a 10x pool) and between the
variants, and the other processes' CPU use while each ran.

    .venv/bin/python benchmarks/bench_scoring_scale.py           # 1M and 10M (~10 min, ~6 GB disk)
    .venv/bin/python benchmarks/bench_scoring_scale.py --quick   # 20K and 200K (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, BackgroundLoad, add_wait_quiet, machine_line, median, spread, table, wait_for_quiet  # noqa: E402

K, SUBTASKS, CHECKPOINTS, N_TARGET = 16, ("algebra", "geometry", "logic"), ("ckpt-1", "ckpt-2"), 60
TARGETS = ("arithmetic", "geography", "reversal")
SOURCES = ("flan_v2", "cot", "dolly", "oasst1")
PERCENT = 0.05
GOAL_SECONDS, GOAL_RSS_GB, GOAL_RSS_GROWTH = 60.0, 3.0, 1.2


# ------------------------------------------------------------------ the storage root (not timed)


def _ids(rng, source_idx):
    import numpy as np
    import polars as pl

    h = rng.integers(0, 2**62, len(source_idx), dtype=np.int64)
    digits = (h[:, None] >> (4 * np.arange(15, -1, -1))) & 15
    hexes = np.ascontiguousarray(np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[digits]).view("S16").ravel()
    src = pl.Series("source", np.asarray(SOURCES)[source_idx])
    return (src + "-" + pl.Series(hexes).cast(pl.Utf8)).alias("candidate_id"), src


def build_root(root: Path, m: int, shard_size: int, seed: int = 0) -> dict:
    """Lay out what candidate_scores and selected_subset read, for ``m`` candidates."""
    import dagster as dg
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from gist_assets.partitions import CANDIDATE_SHARDS

    rng = np.random.default_rng(seed)
    (root / "pool").mkdir(parents=True)
    shard_versions, writer, ids_writer, excluded = {}, None, None, 0
    n_shards = -(-m // shard_size)
    for s in range(n_shards):
        n = min(shard_size, m - s * shard_size)
        shard = f"bench-{s:04d}"
        ids, src = _ids(rng, rng.integers(0, len(SOURCES), n))
        q = pl.Series(rng.integers(0, 10**6, n)).cast(pl.Utf8)
        messages = (
            '[{"role": "user", "content": "Question '
            + q
            + ": what is "
            + q
            + ' plus one?"}, {"role": "assistant", "content": "'
            + q
            + ' plus one is the next number."}]'
        )
        original = '{"id": "' + ids + '", "messages": ' + messages + "}"
        pool = pl.DataFrame(
            [
                ids,
                src,
                pl.Series("shard", [shard] * n),
                pl.Series("file", ["pool.jsonl"] * n),
                pl.Series("line", np.arange(s * shard_size, s * shard_size + n) + 1),
                pl.Series("format", ["messages"] * n),
                messages.alias("messages"),
                original.alias("original"),
                (q.str.len_chars() * 2 + 40).alias("n_chars"),
            ]
        )
        table_ = pool.to_arrow()
        writer = writer or pq.ParquetWriter(root / "pool" / "candidate_pool.parquet", table_.schema)
        writer.write_table(table_)
        ids_table = pool.select("candidate_id").to_arrow()
        ids_writer = ids_writer or pq.ParquetWriter(root / "pool_ids.parquet", ids_table.schema)
        ids_writer.write_table(ids_table)
        shard_versions[shard] = f"shard-{seed}-{s}"
        included = rng.random(n) > 0.005
        excluded += int((~included).sum())
        n_tokens = rng.integers(20, 2048, n)
        side = pl.DataFrame(
            [
                ids,
                src,
                pl.Series("n_tokens", n_tokens),
                pl.Series("n_label_tokens", n_tokens // 2),
                pl.Series("truncated", rng.random(n) < 0.01),
                pl.Series("included", included),
                pl.Series("exclude_reason", [None if ok else "no completion tokens" for ok in included], dtype=pl.Utf8),
            ]
        )
        d = root / "features" / shard
        d.mkdir(parents=True)
        n_in = int(included.sum())
        save_file(
            {f"{c}/{t}": rng.standard_normal((n_in, K), dtype=np.float32) for c in CHECKPOINTS for t in TARGETS},
            str(d / "features.safetensors"),
        )
        side.write_parquet(d / "candidates.parquet")
        fps = {t: {c: f"fp-{t}-{c}" for c in CHECKPOINTS} for t in TARGETS}
        (d / "meta.json").write_text(
            json.dumps(
                {"shard": shard, "fingerprints": fps, "version": f"f-{s}", "shard_version": shard_versions[shard]}
            )
        )
    assert writer is not None and ids_writer is not None  # set by the first shard
    writer.close()
    ids_writer.close()
    (root / "pool" / "shards.json").write_text(json.dumps({"version": f"pool-{seed}", "shards": shard_versions}))
    (root / "warmup").mkdir()
    (root / "pool_ids.parquet").rename(root / "warmup" / "pool_ids.parquet")
    (root / "warmup" / "manifest.json").write_text(
        json.dumps(
            {
                "version": "warm",
                "checkpoints": [{"name": c, "avg_lr": lr} for c, lr in zip(CHECKPOINTS, (1e-3, 5e-4), strict=True)],
            }
        )
    )
    (root / "models").mkdir()
    (root / "models" / "model_ref.json").write_text(json.dumps({"embedded": True, "max_length": 2048}))
    manifest: dict[str, Any] = {"version": "basis", "checkpoints": [{"name": c} for c in CHECKPOINTS], "targets": {}}
    for t in TARGETS:
        for c in CHECKPOINTS:
            d = root / "basis" / c / t
            d.mkdir(parents=True)
            np.save(d / "Z.npy", rng.standard_normal((N_TARGET, K)))
            subtasks = [SUBTASKS[i % len(SUBTASKS)] for i in range(N_TARGET)]
            (d / "meta.json").write_text(json.dumps({"k": K, "subtasks": subtasks, "fingerprint": f"fp-{t}-{c}"}))
            manifest["targets"].setdefault(t, {})[c] = {"k": K, "fingerprint": f"fp-{t}-{c}"}
    (root / "basis" / "manifest.json").write_text(json.dumps(manifest))
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(CANDIDATE_SHARDS, sorted(shard_versions))
    return {
        "shards": n_shards,
        "excluded": excluded,
        "pool_bytes": (root / "pool" / "candidate_pool.parquet").stat().st_size,
        "feature_bytes": sum(f.stat().st_size for f in (root / "features").rglob("*") if f.is_file()),
    }


# ------------------------------------------------------------------ the measured processes


def child_asset_path(root: Path) -> dict:
    import resource

    import dagster as dg

    from gist_assets.run import materialize

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = {
        "ops": {
            "candidate_scores": {"config": {"methods": ["gist"]}},
            "selected_subset": {"config": {"fraction": PERCENT}},
        }
    }
    with dg.DagsterInstance.from_config(str(root / "dagster_home")) as instance:
        t0 = time.perf_counter()
        result = materialize(["candidate_scores", "selected_subset"], config, instance, str(root))
        seconds = time.perf_counter() - t0
        steps: dict[str, float] = {}
        for s in instance.get_run_step_stats(result.run_id):
            assert s.start_time is not None and s.end_time is not None  # the run has finished
            steps[s.step_key] = s.end_time - s.start_time
    return {"seconds": seconds, "steps": steps, "rss_after_imports_kb": rss_before}


def child_in_memory(root: Path) -> dict:
    import numpy as np
    import polars as pl
    from safetensors.numpy import load_file

    from gist_core.scoring import checkpoint_weights, cosine_to_subtasks, subtask_directions, weighted_sum
    from gist_core.selection import rank_order, selection_size

    t0 = time.perf_counter()
    shards = sorted(p for p in (root / "features").iterdir())
    parts = [load_file(str(d / "features.safetensors")) for d in shards]
    tensors = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    del parts
    ids = pl.concat(
        [
            pl.read_parquet(d / "candidates.parquet", columns=["candidate_id", "included"]).filter(pl.col("included"))[
                "candidate_id"
            ]
            for d in shards
        ]
    )
    weights = checkpoint_weights([1e-3, 5e-4])
    top = {}
    for t in TARGETS:
        cosines = []
        for c in CHECKPOINTS:
            meta = json.loads((root / "basis" / c / t / "meta.json").read_text())
            _, directions = subtask_directions(np.load(root / "basis" / c / t / "Z.npy"), meta["subtasks"])
            cosines.append(cosine_to_subtasks(tensors[f"{c}/{t}"], directions))
        score = weighted_sum(cosines, weights).max(axis=1)
        top[t] = ids.gather(rank_order(score, ids)[: selection_size(len(ids), PERCENT)]).to_list()
    return {
        "seconds": time.perf_counter() - t0,
        "selected": {t: len(v) for t, v in top.items()},
        "first": {t: v[:5] for t, v in top.items()},
    }


def run_child(kind: str, root: Path) -> dict:
    """One measured process; its wall time, peak RSS and result, and other processes' CPU use meanwhile."""
    with BackgroundLoad() as bg:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, f"--child-{kind.replace('_', '-')}", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        out, err = proc.communicate()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} process failed ({proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"], result["background_cpus"] = wall, bg.value
    result["maxrss_kb"] = result.pop("_maxrss_kb")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20K and 200K candidates (a smoke run)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="candidate counts (default 1000000 10000000)")
    p.add_argument("--shard-size", type=int, default=100_000, help="candidates per feature shard (default 100000)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2)")
    p.add_argument("--dir", default=None, help="where the storage roots go (default a temporary directory)")
    add_wait_quiet(p)
    p.add_argument("--child-asset-path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-in-memory", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for kind, root in (("asset_path", args.child_asset_path), ("in_memory", args.child_in_memory)):
        if root is not None:
            import resource

            out = child_asset_path(root) if kind == "asset_path" else child_in_memory(root)
            out["_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps(out))
            return 0
    sizes = args.sizes or ([20_000, 200_000] if args.quick else [1_000_000, 10_000_000])
    shard_size = min(args.shard_size, 20_000) if args.quick else args.shard_size

    import duckdb
    import numpy as np
    import polars as pl

    print(
        f"# bench_scoring_scale: {machine_line()}; numpy {np.__version__}, polars {pl.__version__}, "
        f"duckdb {duckdb.__version__}"
    )
    print(
        f"k={K}, {len(SUBTASKS)} subtasks, {len(CHECKPOINTS)} checkpoints, {len(TARGETS)} targets, top {PERCENT:.0%}; "
        f"sizes {sizes}, {shard_size:,} candidates per shard, {args.repeats} interleaved repeats"
    )
    results: dict[int, dict[str, list[dict]]] = {m: {"asset_path": [], "in_memory": []} for m in sizes}
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench_scoring_"))
    try:
        roots, layout = {}, {}
        for m in sizes:
            t0 = time.perf_counter()
            roots[m] = tmp / f"root-{m}"
            layout[m] = build_root(roots[m], m, shard_size)
            print(
                f"  storage root for {m:,} candidates ({layout[m]['shards']} shards, pool file "
                f"{layout[m]['pool_bytes'] / 1e9:.2f} GB, features {layout[m]['feature_bytes'] / 1e9:.2f} GB) "
                f"in {time.perf_counter() - t0:.0f}s (not timed)",
                flush=True,
            )
        # The roots were just written: flush them now, or the first timed runs share the disk with writeback.
        os.sync()
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        for rep in range(args.repeats):
            order = [(m, kind) for m in sizes for kind in ("asset_path", "in_memory")]
            shift = rep % len(order)
            for m, kind in order[shift:] + order[:shift]:
                r = run_child(kind, roots[m])
                results[m][kind].append(r)
                print(
                    f"  rep {rep + 1}/{args.repeats} {m:,} {kind}: {r['process_seconds']:.1f}s process, "
                    f"peak RSS {r['maxrss_kb'] / 2**20:.2f} GB (other processes: {r['background_cpus']:.2f} CPUs)",
                    flush=True,
                )
        check_agreement(roots, results, sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, sizes, layout)
    return 0


def check_agreement(roots: dict, results: dict, sizes: list[int]) -> None:
    """The asset path's selections are the plain computation's (sizes and first ids per target)."""
    import polars as pl

    for m in sizes:
        plain = results[m]["in_memory"][-1]
        for t in TARGETS:
            got = pl.read_parquet(roots[m] / "selections" / t / "gist" / "p0.05" / "selection.parquet")
            want = plain["selected"][t]
            if got.height != want or got["candidate_id"].head(5).to_list() != plain["first"][t]:
                raise AssertionError(
                    f"{m:,} {t}: the asset path selected {got.height} (first "
                    f"{got['candidate_id'].head(5).to_list()}), the plain computation {want} "
                    f"(first {plain['first'][t]})"
                )
    print("check: every target's selection (size and top 5 ids) equals the plain computation's at every size")


def report(results: dict, sizes: list[int], layout: dict) -> None:
    def med(m, kind, key):
        return median([r[key] for r in results[m][kind]])

    rows = []
    for m in sizes:
        for kind, label in (("asset_path", "asset path (select_job)"), ("in_memory", "in memory (plain)")):
            rs = results[m][kind]
            row = {
                "candidates": f"{m:,}",
                "variant": label,
                "process s": f"{med(m, kind, 'process_seconds'):.1f}",
                "min-max": spread([r["process_seconds"] for r in rs]),
                "peak RSS GB": f"{med(m, kind, 'maxrss_kb') / 2**20:.2f}",
                "background CPUs": "/".join(f"{r['background_cpus']:.2f}" for r in rs),
            }
            if kind == "asset_path":
                row["job s"] = f"{med(m, kind, 'seconds'):.1f}"
                steps = {k for r in rs for k in r["steps"]}
                row["steps s"] = ", ".join(
                    f"{k} {median([r['steps'].get(k, 0) for r in rs]):.1f}" for k in sorted(steps)
                )
            else:
                row["job s"], row["steps s"] = f"{med(m, kind, 'seconds'):.1f}", "scores + top 5%, no writes"
            rows.append(row)
    print("\nMedians over repeats (process: start to exit, imports included; job: the run itself)")
    print(table(rows))
    big, small = sizes[-1], sizes[0]
    t_big, rss_big = med(big, "asset_path", "process_seconds"), med(big, "asset_path", "maxrss_kb") / 2**20
    rss_small = med(small, "asset_path", "maxrss_kb") / 2**20
    print("\nRATIOS")
    for m in sizes:
        time_ratio = med(m, "asset_path", "process_seconds") / med(m, "in_memory", "process_seconds")
        rss_ratio = med(m, "asset_path", "maxrss_kb") / med(m, "in_memory", "maxrss_kb")
        print(f"  {m:,}: asset path / in memory: time {time_ratio:.2f}, peak RSS {rss_ratio:.2f}")
    if len(sizes) > 1:
        for kind in ("asset_path", "in_memory"):
            time_ratio = med(big, kind, "process_seconds") / med(small, kind, "process_seconds")
            rss_ratio = med(big, kind, "maxrss_kb") / med(small, kind, "maxrss_kb")
            print(
                f"  {kind}: {big:,} / {small:,}: time {time_ratio:.1f} "
                f"(linear = {big / small:.0f}), peak RSS {rss_ratio:.2f}"
            )
    if big == 10_000_000:
        ok = t_big < GOAL_SECONDS
        print(
            f"  goal: 10M x {len(TARGETS)} targets end to end under {GOAL_SECONDS:.0f} s: {t_big:.1f}s -> "
            f"{'met' if ok else 'NOT met'}"
        )
        print(
            f"  goal: peak RSS under {GOAL_RSS_GB:.0f} GB: {rss_big:.2f} GB -> "
            f"{'met' if rss_big < GOAL_RSS_GB else 'NOT met'}"
        )
    if len(sizes) > 1:
        growth = rss_big / rss_small
        print(
            f"  goal: peak RSS within {GOAL_RSS_GROWTH - 1:.0%} between {small:,} and {big:,}: {growth:.2f} -> "
            f"{'met' if growth <= GOAL_RSS_GROWTH else 'NOT met'}"
        )


if __name__ == "__main__":
    sys.exit(main())
