"""Scoring, ranking and the DuckDB round trip at pool scale.

Synthetic feature rows (k=16, 3 subtasks, 2 checkpoints) for 1M and 10M candidates
(``--quick``: 100K and 1M) go through the same calls ``candidate_scores`` and
``selected_subset`` make, stage by stage:

    subtask_directions -> cosine_to_subtasks (per checkpoint) -> combine_and_max ->
    rank_order on the candidate_id Series (+ rank column) -> the polars frame of the
    candidate_scores columns (built as write_method_scores builds it) ->
    ScoreStore.replace_scores into a new DuckDB file -> replace_scores again (a rerun:
    DELETE + INSERT) -> read_selection_rows for the top 5% (as selected_subset: a count,
    ``WHERE rank <= n``, a check that no lower-ranked row beats the cut, and the score
    column for the histogram) -> choose (strategy 'top') on those rows.
    For comparison (in parentheses, not in the total): reading every row back with
    read_scores, what the per-source cap and round-robin strategies still do.

Sizes are interleaved over repeats (rotating order) and medians reported. The growth
ratio is (large time) / (small time): 10 means linear for a 10x size step.

    .venv/bin/python benchmarks/bench_scoring_scale.py           # 1M and 10M
    .venv/bin/python benchmarks/bench_scoring_scale.py --quick   # 100K and 1M
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BackgroundLoad, machine_line, median, spread, table, wait_for_quiet  # noqa: E402

K, SUBTASKS, CHECKPOINTS, N_TARGET = 16, ("algebra", "geometry", "logic"), 2, 60
SOURCES = ("flan_v2", "cot", "dolly", "oasst1")
TARGET, METHOD, PERCENT = "bench_target", "gist", 0.05


def make_data(m: int, seed: int = 0) -> dict:
    """Features as candidate_scores loads them (float32 rows from safetensors) and the side table."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    z = [rng.standard_normal((m, K), dtype=np.float32) for _ in range(CHECKPOINTS)]
    Z = [rng.standard_normal((N_TARGET, K)) for _ in range(CHECKPOINTS)]
    subtasks = [SUBTASKS[i % len(SUBTASKS)] for i in range(N_TARGET)]
    # Ids shaped like the pipeline's derived ids: "<source>-<16 hex digits>", in shuffled order.
    src_idx = rng.integers(0, len(SOURCES), m)
    h = rng.integers(0, 2 ** 62, m, dtype=np.int64)
    digits = (h[:, None] >> (4 * np.arange(15, -1, -1))) & 15
    hexes = np.ascontiguousarray(np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[digits]).view("S16").ravel()
    src = pl.Series("source", np.asarray(SOURCES)[src_idx])
    ids = (src + "-" + pl.Series(hexes).cast(pl.Utf8)).alias("candidate_id")
    scored = pl.DataFrame({
        "candidate_id": ids, "source": src,
        "shard": "shard-" + pl.Series(np.arange(m) // 1000).cast(pl.Utf8),
        "n_tokens": pl.Series(rng.integers(20, 2048, m)),
    })
    return {"z": z, "Z": Z, "subtasks": subtasks, "scored": scored}


def run_once(data: dict, db_dir: Path) -> dict:
    """Every stage once; returns seconds per stage."""
    import numpy as np
    import polars as pl

    from gist_core.scoring import checkpoint_weights, combine_and_max, cosine_to_subtasks, subtask_directions
    from gist_assets.config import SelectionConfig
    from gist_assets.scores import choose, read_selection_rows
    from gist_core.selection import rank_order, selection_size
    from gist_resources.score_store import ScoreStore

    t: dict[str, float] = {}

    def stage(name):
        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                t[name] = t.get(name, 0.0) + time.perf_counter() - self.t0
        return _T()

    scored = data["scored"]
    weights = checkpoint_weights([1e-3, 5e-4])
    cosines = []
    for c in range(CHECKPOINTS):
        with stage("subtask_directions"):
            names, directions = subtask_directions(data["Z"][c], data["subtasks"])
        with stage("cosine_to_subtasks"):
            cosines.append(cosine_to_subtasks(data["z"][c], directions))
    with stage("combine_and_max"):
        score, best = combine_and_max(cosines, weights)
    del cosines
    ids = scored["candidate_id"]
    with stage("rank_order + rank"):
        order = rank_order(score, ids)
        rank = np.empty(len(ids), dtype=np.int64)
        rank[order] = np.arange(1, len(ids) + 1)
    with stage("frame (as the asset)"):
        df = scored.select("candidate_id", "source", "shard", "n_tokens").with_columns(
            pl.lit(TARGET).alias("target"), pl.lit(METHOD).alias("method"),
            pl.Series("score", score), pl.Series("rank", rank),
            pl.Series("best_subtask", names, dtype=pl.Utf8).gather(best),
            pl.lit("fp0+fp1").alias("basis_fingerprint"),
        )
    db = db_dir / "scores.duckdb"
    store = ScoreStore(database=str(db))
    with stage("replace_scores (new table)"):
        store.replace_scores(TARGET, METHOD, df)
    with stage("replace_scores (rerun)"):
        store.replace_scores(TARGET, METHOD, df)
    n = selection_size(df.height, percentage=PERCENT)
    config = SelectionConfig(percentage=PERCENT)
    with stage("read_selection_rows top 5%"):
        rows, n_scored, all_scores = read_selection_rows(store, TARGET, METHOD, config, with_all_scores=True)
    with stage("choose top 5%"):
        got = choose(config, rows, None, n_scored)
    with stage("  (read every row: read_scores)"):
        every = store.read_scores(TARGET, METHOD)
    # Sanity (not timing): the stages agree with each other.
    top = order[:n]
    assert rows.height == got.height == n and n_scored == df.height == len(all_scores) == every.height
    assert got["candidate_id"].to_list() == ids.gather(top).to_list() == every["candidate_id"].head(n).to_list()
    del df, rows, got, every, all_scores
    gc.collect()
    for f in db_dir.glob("scores.duckdb*"):
        f.unlink()
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100K and 1M candidates, 1 repeat")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="candidate counts (default 1000000 10000000)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    p.add_argument("--dir", default=None, help="where the DuckDB files go (default a temporary directory)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="first wait up to S seconds for other processes to leave the CPUs idle")
    args = p.parse_args(argv)
    sizes = args.sizes or ([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
    repeats = args.repeats or (1 if args.quick else 3)

    import duckdb
    import numpy as np
    import polars as pl

    print(f"# bench_scoring_scale: {machine_line()}; numpy {np.__version__}, polars {pl.__version__}, "
          f"duckdb {duckdb.__version__}")
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    print(f"k={K}, {len(SUBTASKS)} subtasks, {CHECKPOINTS} checkpoints, sizes {sizes}, {repeats} repeat(s), "
          f"sizes interleaved")
    data = {}
    for m in sizes:
        t0 = time.perf_counter()
        data[m] = make_data(m)
        print(f"  synthetic data for {m:,} candidates in {time.perf_counter() - t0:.1f}s (not timed)", flush=True)
    times: dict[int, list[dict]] = {m: [] for m in sizes}
    loads: dict[int, list[float]] = {m: [] for m in sizes}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for rep in range(repeats):
            shift = rep % len(sizes)
            for m in sizes[shift:] + sizes[:shift]:
                with BackgroundLoad() as bg:
                    t = run_once(data[m], Path(tmp))
                times[m].append(t)
                loads[m].append(bg.value)
                main_total = sum(v for k, v in t.items() if not k.startswith("  "))
                print(f"  rep {rep + 1}/{repeats} {m:,}: {main_total:.2f}s (other processes: {bg.value:.2f} CPUs)",
                      flush=True)

    stages = list(times[sizes[0]][0])
    small, large = sizes[0], sizes[-1]
    rows = []
    totals = {m: [sum(v for k, v in t.items() if not k.startswith("  ")) for t in times[m]] for m in sizes}
    for s in stages:
        row = {"stage": s}
        for m in sizes:
            row[f"{m:,} s"] = f"{median([t[s] for t in times[m]]):.3f}"
        if len(sizes) > 1:
            a, b = median([t[s] for t in times[small]]), median([t[s] for t in times[large]])
            row[f"growth {large // small}x size"] = f"{b / a:.1f}" if a > 0 else "-"
        rows.append(row)
    row = {"stage": "TOTAL (rows without parentheses)"}
    for m in sizes:
        row[f"{m:,} s"] = f"{median(totals[m]):.3f}"
    if len(sizes) > 1:
        row[f"growth {large // small}x size"] = f"{median(totals[large]) / median(totals[small]):.1f}"
    rows.append(row)
    print("\nSeconds per stage (median over repeats); rows in parentheses are alternatives, not in the total")
    print(table(rows))
    print("\nRATIOS")
    for m in sizes:
        print(f"  {m:,} candidates: total {median(totals[m]):.2f}s (min-max {spread(totals[m])}), "
              f"{m / median(totals[m]):,.0f} candidates/s; other processes used "
              + "/".join(f"{x:.2f}" for x in loads[m]) + " CPUs")
    if len(sizes) > 1:
        print(f"  growth {large:,} / {small:,}: {median(totals[large]) / median(totals[small]):.1f} "
              f"(linear = {large / small:.0f})")
    if 1_000_000 in sizes:
        t1 = median(totals[1_000_000])
        print(f"  goal: 1M candidates in under 10 s: {t1:.2f}s -> {'met' if t1 < 10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
