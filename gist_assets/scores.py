"""candidate_scores (DuckDB) and selected_subset (JSONL + Parquet + manifest)."""

import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import NamedTuple, TypeVar, cast

import dagster as dg
import numpy as np
import polars as pl

from gist_core.scoring import checkpoint_weights, cosine_to_subtasks, subtask_directions, weighted_sum
from gist_core.selection import budgets, capped_top, round_robin, selection_size
from gist_resources import ScoreStore, StorageResource
from gist_resources.score_store import SCORE_SCHEMA, ScoreSetWriter
from gist_resources.storage import strict_json

from .config import CandidateScoresConfig, SelectionConfig
from .gradients import candidate_features, features_dir, read_basis_manifest, spectral_basis
from .model import read_model_ref, read_warmup, warmup_pool_ids_path
from .partitions import candidate_shards
from .paths import model_path, relative_checkpoints
from .plots import histogram, md_table
from .pool import candidate_pool, pool_path, read_pool_version
from .sketch import (
    candidate_sketches,
    current_sketch_shards,
    shard_sketches,
    sketch_projection,
    sketch_scores_inputs,
    sketched_coordinates,
)
from .versions import asset_fingerprint, data_version, fingerprint

METHOD = "gist"
T = TypeVar("T")
R = TypeVar("R")
# DuckDB allows one writing process: every asset that writes the database is in this
# pool, with a limit of 1 (deploy/k8s/dagster.yaml), so even concurrent runs never contend.
DUCKDB_POOL = "duckdb_writer"


def current_feature_shards(storage: StorageResource, shards: list[str], bases: dict) -> dict[str, str]:
    """{shard: features version} when every shard's features are present and made from the current shard
    contents and bases; otherwise an error naming the missing and stale shards."""
    missing, stale, versions = [], [], {}
    want = {t: {c: v["fingerprint"] for c, v in per.items()} for t, per in bases["targets"].items()}
    pool_shards = read_pool_version(storage)["shards"]
    for shard in shards:
        d = features_dir(storage, shard)
        if not (d / "meta.json").exists():
            missing.append(shard)
            continue
        meta = storage.read_json(d / "meta.json", "candidate_features", partition=shard)
        if meta["fingerprints"] != want or meta.get("shard_version") != pool_shards.get(shard):
            stale.append(shard)
            continue
        versions[shard] = meta["version"]
    if missing or stale:
        raise ValueError(
            f"candidate_features is missing for shards {missing} and stale (computed from other shard contents "
            f"or another basis) for {stale}; materialize those partitions of candidate_features first"
        )
    return versions


def shard_features(storage: StorageResource, shard: str) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """One shard's sidecar rows (with its name) and feature tensors."""
    d = features_dir(storage, shard)
    tensors = storage.load_tensors(d / "features.safetensors", "candidate_features", partition=shard)
    side = storage.read_parquet(d / "candidates.parquet", "candidate_features", partition=shard)
    return side.with_columns(pl.lit(shard).alias("shard")), tensors


def load_shard_features(storage: StorageResource, shards: list[str], bases: dict):
    """Every current shard's features concatenated (for comparisons on small pools; the scoring asset streams).

    Returns (sidecar rows, tensors, {shard: features version}).
    """
    versions = current_feature_shards(storage, shards, bases)
    parts = [shard_features(storage, shard) for shard in shards]
    side = pl.concat([p[0] for p in parts]) if parts else pl.DataFrame()
    tensors = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]} if parts else {}
    return side, tensors, versions


class ScoredRows(NamedTuple):
    """One target's score rows for a batch of candidates (SCORE_SCHEMA columns, finite scores only)."""

    rows: pl.DataFrame
    subtasks: list[str]
    nonfinite_ids: list[str]


def scored_rows(
    scored: pl.DataFrame, per_subtask: np.ndarray, subtask_names: list[str], fingerprint: str
) -> ScoredRows:
    """Rows of ``scored``: max over subtasks and the best one, every subtask's score.

    A candidate with a non-finite score (NaN or infinite in any subtask) is left out of the rows and the
    ranking, and is reported (``nonfinite_excluded``), so exports and the ranking stay strict.
    """
    finite = np.isfinite(per_subtask).all(axis=1)
    nonfinite: list[str] = []
    if not finite.all():
        nonfinite = scored["candidate_id"].filter(pl.Series(~finite)).to_list()
        scored, per_subtask = scored.filter(pl.Series(finite)), per_subtask[finite]
    if not len(per_subtask):
        return ScoredRows(pl.DataFrame(schema=SCORE_SCHEMA), subtask_names, nonfinite)
    names = pl.Series("best_subtask", subtask_names, dtype=pl.Utf8)
    rows = scored.select("candidate_id", "source", "shard", "n_tokens").with_columns(
        pl.Series("score", per_subtask.max(axis=1), dtype=pl.Float64),
        names.gather(per_subtask.argmax(axis=1)),
        pl.lit(fingerprint).alias("basis_fingerprint"),
        pl.Series("subtask_scores", per_subtask.astype(np.float64)).cast(pl.List(pl.Float64)),
    )
    return ScoredRows(rows, subtask_names, nonfinite)


def record_scored_rows(summary: dict, method: str, target: str, part: ScoredRows) -> None:
    """``summary[target]`` accumulates what the asset reports about rows written."""
    s = summary.setdefault(
        target,
        {
            "target": target,
            "method": method,
            "scored": 0,
            "sum": 0.0,
            "max": -np.inf,
            "min": np.inf,
            "nonfinite_ids": [],
        },
    )
    s["nonfinite_ids"] += part.nonfinite_ids
    if part.rows.height:
        score = part.rows["score"].to_numpy()
        s["scored"] += len(score)
        s["sum"] += float(score.sum())
        s["max"], s["min"] = max(s["max"], float(score.max())), min(s["min"], float(score.min()))


def add_method_scores(
    writer: ScoreSetWriter,
    summary: dict,
    target: str,
    scored: pl.DataFrame,
    per_subtask: np.ndarray,
    subtask_names: list[str],
    fingerprint: str,
) -> None:
    """``scored_rows`` of one batch, written to (target, writer's method) and recorded in ``summary``."""
    part = scored_rows(scored, per_subtask, subtask_names, fingerprint)
    writer.add(target, part.rows, part.subtasks)
    record_scored_rows(summary, writer.method, target, part)


def score_summary(summary: dict) -> list[dict]:
    """Per target, what ``add_method_scores`` accumulated; an error for a target with no finite score."""
    out = []
    for target, s in sorted(summary.items()):
        if not s["scored"]:
            raise ValueError(
                f"no candidate has a finite {s['method']!r} score for target {target!r} "
                f"({len(s['nonfinite_ids'])} non-finite); check the gradients of the target and the "
                "candidates"
            )
        out.append(
            {
                "target": target,
                "method": s["method"],
                "scored": s["scored"],
                "mean": s["sum"] / s["scored"],
                "max": s["max"],
                "min": s["min"],
                "nonfinite_excluded": len(s["nonfinite_ids"]),
                "nonfinite_ids": ", ".join(s["nonfinite_ids"][:10]),
            }
        )
    return out


def write_method_scores(score_store: ScoreStore, method: str, per_target: list[tuple]) -> list[dict]:
    """One method's whole score set from in-memory rows: ``per_target`` is (target, scored rows,
    per-subtask scores, subtask names, fingerprint) for each target."""
    summary: dict = {}
    with score_store.write_scores(method) as writer:
        for target, scored, per_subtask, names, fp in per_target:
            add_method_scores(writer, summary, target, scored, per_subtask, names, fp)
        rows = score_summary(summary)
    return rows


def target_directions(storage: StorageResource, ckpt: str, target: str) -> tuple[list[str], np.ndarray]:
    """The subtask names and unit directions t_s of one target's basis at one checkpoint."""
    meta = storage.read_json(storage.path("basis", ckpt, target, "meta.json"), "spectral_basis")
    Z = storage.open_npy(storage.path("basis", ckpt, target, "Z.npy"), "spectral_basis", mmap=False)
    return subtask_directions(Z, meta["subtasks"])


class ShardCounts:
    """What the scoring asset reports about the candidates, added up shard by shard."""

    def __init__(self) -> None:
        self.scored = self.excluded = self.truncated = 0
        self.excluded_rows: list[dict] = []

    def add(self, side: pl.DataFrame) -> None:
        """Count one shard's sidecar."""
        excluded = side.filter(~pl.col("included"))
        self.excluded += excluded.height
        self.truncated += int(side["truncated"].sum())
        if len(self.excluded_rows) < 20:
            self.excluded_rows += excluded.select("candidate_id", "source", "exclude_reason").head(20).to_dicts()
        self.scored += side.height - excluded.height


def shard_scores(
    side: pl.DataFrame,
    coords: dict[tuple[str, str], np.ndarray],
    directions: dict,
    ckpts: list[str],
    weights: np.ndarray,
    fingerprints: dict[str, str],
) -> list[tuple[str, ScoredRows]]:
    """cos(z, t_s) per checkpoint, weighted, max over subtasks, for every target, on one shard's included rows;
    ``coords[ckpt, target]`` is their z, ``directions[ckpt, target]`` the (subtask names, t_s)."""
    scored = side.filter(pl.col("included"))
    out = []
    for target in sorted(fingerprints):
        cosines = [cosine_to_subtasks(coords[ckpt, target], directions[ckpt, target][1]) for ckpt in ckpts]
        part = scored_rows(
            scored, weighted_sum(cosines, weights), directions[ckpts[0], target][0], fingerprints[target]
        )
        out.append((target, part))
    return out


def exact_shard(
    shard: str,
    writer: ScoreSetWriter,
    storage: StorageResource,
    directions: dict,
    ckpts: list[str],
    weights,
    fingerprints: dict,
):
    """One shard's ``shard_scores`` from candidate_features (exact z), written; its sidecar and the parts."""
    side, tensors = shard_features(storage, shard)
    coords = {(c, t): tensors[f"{c}/{t}"] for c in ckpts for t in fingerprints}
    return side, write_parts(writer, shard_scores(side, coords, directions, ckpts, weights, fingerprints))


def sketched_shard(
    shard: str,
    writer: ScoreSetWriter,
    storage: StorageResource,
    projected: dict,
    directions: dict,
    ckpts: list[str],
    weights,
    fingerprints: dict,
):
    """One shard's ``shard_scores`` from candidate_sketches (z estimated), written; its sidecar and the parts."""
    side, sketches = shard_sketches(storage, shard, ckpts)
    z = {c: sketched_coordinates(projected[c], sketches[c]) for c in ckpts}
    coords = {(c, t): z[c][t] for c in ckpts for t in fingerprints}
    return side, write_parts(writer, shard_scores(side, coords, directions, ckpts, weights, fingerprints))


def write_parts(writer: ScoreSetWriter, parts: list[tuple[str, ScoredRows]]) -> list[tuple[str, ScoredRows]]:
    """Each (target, rows) of ``parts`` into the score set (on the shard's thread: Parquet encoding is costly)."""
    for target, part in parts:
        writer.add(target, part.rows, part.subtasks)
    return parts


# Shards read and scored at once: numpy, safetensors and polars release the GIL, so threads overlap the
# reads and the arithmetic of neighbouring shards; two in flight per thread bound the memory.
SCORING_THREADS = max(1, min(4, os.cpu_count() or 1))


def in_order(work: Callable[[T], R], items: list[T], threads: int | None = None) -> Iterator[R]:
    """``work(item)`` for every item on ``threads`` (default SCORING_THREADS) threads, in the items' order."""
    threads = SCORING_THREADS if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dg.asset(
    group_name="gist",
    deps=[candidate_features, candidate_sketches, spectral_basis, candidate_pool],
    code_version="4",
    pool=DUCKDB_POOL,
    kinds={"duckdb", "parquet"},
)
def candidate_scores(
    context: dg.AssetExecutionContext, config: CandidateScoresConfig, storage: StorageResource, score_store: ScoreStore
) -> dg.MaterializeResult:
    """Per requested method, cosine of each candidate to each subtask direction, checkpoint-weighted, max over
    subtasks: `gist` from candidate_features (exact z), `gist_sketch` from candidate_sketches (z estimated).
    Streamed shard by shard into the score store."""
    bases = read_basis_manifest(storage)
    shards = sorted(context.instance.get_dynamic_partitions(candidate_shards.name))
    avg_lr = {c["name"]: c["avg_lr"] for c in read_warmup(storage)["checkpoints"]}
    ckpts = [c["name"] for c in bases["checkpoints"]]
    weights = checkpoint_weights([avg_lr[c] for c in ckpts])
    targets = sorted(bases["targets"])
    directions = {(c, t): target_directions(storage, c, t) for c in ckpts for t in targets}
    exact_fps = {t: "+".join(bases["targets"][t][c]["fingerprint"] for c in ckpts) for t in targets}
    summary, inputs, seconds, removed, counts = [], {}, {}, {}, None
    for method in config.methods:
        start = time.perf_counter()
        before = score_store.scored_targets(method)
        per_target: dict = {}
        shard_counts = ShardCounts()
        with score_store.write_scores(method) as writer:
            if method == METHOD:
                inputs[method] = scores_inputs(current_feature_shards(storage, shards, bases), bases["version"])
                work = partial(exact_shard, storage=storage, directions=directions, ckpts=ckpts, weights=weights)
                fps = exact_fps
            else:
                versions, projector = current_sketch_shards(storage, shards, ckpts)
                inputs[method] = sketch_scores_inputs(versions, bases["version"])
                projected = {c: sketch_projection(storage, projector, c, targets) for c in ckpts}
                tag = f"sketch-{projector.kind}-{projector.dim}-seed-{projector.seed}"
                fps = {t: f"{tag}+{fp}" for t, fp in exact_fps.items()}
                work = partial(
                    sketched_shard,
                    storage=storage,
                    projected=projected,
                    directions=directions,
                    ckpts=ckpts,
                    weights=weights,
                )
            # The threads write the parts; the main thread adds up the report in shard order.
            for side, parts in in_order(partial(work, writer=writer, fingerprints=fps), shards):
                shard_counts.add(side)
                for target, part in parts:
                    record_scored_rows(per_target, method, target, part)
            summary += score_summary(per_target)
        counts = counts or shard_counts
        removed[method] = sorted(set(before) - set(targets))
        seconds[method] = round(time.perf_counter() - start, 3)
    assert counts is not None  # set by the loop above: config.methods is never empty
    newer = newer_than_warmup(context, storage, score_store, targets[0], config.methods[0], config.warn_new_share)
    version = asset_fingerprint(context, inputs, read_warmup(storage)["version"])
    # "inputs": per method, what its scores are a function of (the refresh sensor compares it); "methods":
    # what selected_subset selects.
    storage.write_json(
        scores_version_path(storage, METHOD), {"version": version, "inputs": inputs, "methods": list(config.methods)}
    )
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "methods": dg.MetadataValue.json(list(config.methods)),
            "rows_per_target": dg.MetadataValue.md(md_table(summary)),
            "scoring_seconds": dg.MetadataValue.json(seconds),
            "candidates_scored": counts.scored,
            "candidates_excluded": counts.excluded,
            "candidates_truncated": counts.truncated,
            **newer,
            "excluded_no_completion": dg.MetadataValue.md(md_table(counts.excluded_rows)),
            "checkpoint_weights": dg.MetadataValue.json(dict(zip(ckpts, weights.tolist(), strict=True))),
            "targets_removed": dg.MetadataValue.json(removed),
            "nonfinite_scores_excluded": sum(s["nonfinite_excluded"] for s in summary),
            "database": dg.MetadataValue.path(score_store.database),
            "score_files": dg.MetadataValue.path(str(score_store.score_root)),
            "shards": len(shards),
        },
    )


def newer_than_warmup(
    context, storage: StorageResource, score_store: ScoreStore, target: str, method: str, warn_share: float
) -> dict:
    """How many scored candidates joined the pool after the warmup was trained; a warning past ``warn_share``."""
    path = warmup_pool_ids_path(storage)
    if not path.exists():
        return {}
    n_scored = score_store.count_scores(target, method)
    n_new = score_store.count_absent_from(target, method, str(path))
    share = n_new / max(1, n_scored)
    if share > warn_share:
        context.log.warning(
            f"{n_new} of {n_scored} scored candidates ({share:.0%}) joined the pool after "
            f"the warmup checkpoint was trained (warn_new_share={warn_share}); re-materialize "
            "warmup_checkpoint and what follows it to train on the current pool"
        )
    return {"candidates_newer_than_warmup": n_new, "share_newer_than_warmup": round(share, 4)}


def scores_inputs(shard_versions: dict[str, str], basis_version: str) -> str:
    """What the GIST scores are a function of; the refresh sensor compares it to decide on a re-score."""
    return fingerprint(sorted(shard_versions.items()), basis_version)


def scores_version_path(storage: StorageResource, group: str):
    return storage.path("scores", f"{group}_version.json")


def selection_dir(storage: StorageResource, target: str, method: str = METHOD, budget: str | None = None):
    """``selections/<target>/<method>``, or one budget's folder in it."""
    return storage.path("selections", target, method, *([budget] if budget else []))


def read_selection_rows(
    score_store: ScoreStore, target: str, method: str, config: SelectionConfig
) -> tuple[pl.DataFrame, int]:
    """The candidate_scores rows ``choose`` needs, best first, and the number scored.

    The plain top-n (strategy 'top', no per-source cap) reads only the best n rows (a bounded
    top-n in DuckDB, ordered as ``rank_order``: score descending, ties by id). The per-source cap
    and round-robin can reach below rank n, so they read every row.
    """
    n_scored = score_store.count_scores(target, method)
    if n_scored and config.strategy == "top" and config.max_per_source is None:
        return score_store.top_scores(target, method, selection_size(n_scored, config.fraction, config.n)), n_scored
    return score_store.read_scores(target, method), n_scored


def choose(
    config: SelectionConfig, scores: pl.DataFrame, subtask_scores: pl.DataFrame | None, n_scored: int | None = None
) -> pl.DataFrame:
    """Apply the configured strategy to one (target, method): the chosen rows, best first.

    ``scores`` may be only the best rows (see ``read_selection_rows``); ``n_scored`` is then
    the number of scored candidates the selection size is a fraction of.
    """
    size = selection_size(scores.height if n_scored is None else n_scored, config.fraction, config.n)
    ids = scores["candidate_id"]
    sources = scores["source"].to_list()
    if config.strategy == "top":
        picked = capped_top(scores["score"].to_numpy(), ids, size, sources, config.max_per_source)
    elif config.strategy == "round_robin":
        assert subtask_scores is not None, "round_robin needs the per-subtask scores"
        wide = subtask_scores.pivot(on="subtask", index="candidate_id", values="score")
        wide = scores.select("candidate_id").join(wide, on="candidate_id", how="left")
        picked = round_robin(wide.drop("candidate_id").to_numpy(), ids, size, sources, config.max_per_source)
    else:
        raise ValueError(f"selection strategy must be 'top' or 'round_robin', got {config.strategy!r}")
    if len(picked) < size:
        raise ValueError(
            f"only {len(picked)} of {size} candidates can be selected with max_per_source="
            f"{config.max_per_source}; raise the cap or lower the selection size"
        )
    return scores[picked.tolist()].with_columns(pl.Series("selection_rank", np.arange(1, size + 1)))


MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
# Selected rows converted and written at a time: the decoded messages of a 5% budget of 10M candidates
# would otherwise be held whole.
EXPORT_CHUNK_ROWS = 50_000


def training_messages_column(messages_json: pl.Series) -> pl.Series:
    """Pool records' conversations (JSON text) as chat ``messages`` for SFT trainers (open-instruct, TRL).

    Turns after the last assistant turn carry no loss (only assistant tokens are trained on)
    and TRL's conversational format ends with the assistant, so they are left out.
    """
    turns = messages_json.str.json_decode(pl.List(MESSAGE))
    frame = pl.DataFrame({"m": turns}).with_columns(
        last=pl.col("m")
        .list.eval(pl.element().struct.field("role") == "assistant")
        .list.eval(pl.arg_where(pl.element()))
        .list.last()
    )
    return frame.select(pl.col("m").list.head(pl.col("last") + 1))["m"].alias("messages")


def training_messages(messages_json: str) -> list[dict]:
    """One record's ``training_messages_column``."""
    return training_messages_column(pl.Series([messages_json], dtype=pl.Utf8))[0].to_list()


def selection_budgets(config: SelectionConfig) -> list[tuple[str, SelectionConfig]]:
    """(label, the config with that one budget) for every configured budget."""
    return [
        (label, config.model_copy(update={"fraction": p, "n": n})) for label, p, n in budgets(config.fraction, config.n)
    ]


def remove_unconfigured_exports(storage: StorageResource, targets: list[str], methods: list[str]) -> list[str]:
    """Delete the export folders of ``methods`` for targets no longer configured; their names."""
    removed = []
    root = storage.path("selections")
    for folder in sorted(root.glob("*/*")) if root.exists() else []:
        if folder.is_dir() and folder.name in methods and folder.parent.name not in targets:
            shutil.rmtree(folder)
            removed.append(f"{folder.parent.name}/{folder.name}")
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
    return removed


def write_selections(
    context,
    config: SelectionConfig,
    storage: StorageResource,
    score_store: ScoreStore,
    methods: list[str],
    version_files: list[str],
) -> dg.MaterializeResult:
    """Per target, method and budget: the chosen candidates as JSONL in their own format, as chat
    ``messages`` JSONL, Parquet, and a manifest, under ``selections/<target>/<method>/<budget>/``."""
    bases = read_basis_manifest(storage)
    pool_mix = storage.count_parquet_values(pool_path(storage), "candidate_pool", "source")
    ref, warm = read_model_ref(storage), read_warmup(storage)
    targets = sorted(bases["targets"])
    per_budget = selection_budgets(config)
    meta: dict = {"budgets": dg.MetadataValue.json([label for label, _ in per_budget])}
    for method in methods:
        for target in targets:
            folder = selection_dir(storage, target, method)
            rows = []
            # Every budget is chosen before anything is written: a bad size touches no file.
            chosen_per_budget = [choose_budget(score_store, target, method, one) for _, one in per_budget]
            # Only the chosen records' text is read from the pool.
            ids = pl.concat([c["candidate_id"] for c in chosen_per_budget]).unique()
            pool = storage.read_parquet(
                pool_path(storage),
                "candidate_pool",
                columns=["candidate_id", "original", "messages"],
                candidate_ids=ids,
            )
            warmup_ids = warmup_pool_ids_path(storage)
            newer = score_store.ids_absent_from(ids, str(warmup_ids)) if warmup_ids.exists() else None
            hist = histogram_of(score_store, target, method) if method == METHOD else None
            with storage.atomic_dir(folder) as tmp:
                for (label, one), chosen in zip(per_budget, chosen_per_budget, strict=True):
                    chosen = chosen.join(pool, on="candidate_id", how="left", maintain_order="left")
                    rows.append(
                        chosen.select(
                            pl.lit(target).alias("target"),
                            pl.lit(method).alias("method"),
                            "candidate_id",
                            pl.col("selection_rank").alias("rank"),
                            "score",
                            "source",
                            pl.lit(label).alias("budget"),
                        )
                    )
                    manifest = write_budget(
                        storage,
                        tmp / label,
                        folder / label,
                        chosen,
                        one,
                        label,
                        target,
                        method,
                        bases,
                        ref,
                        warm,
                        score_store.database,
                        newer,
                    )
                    meta.update(
                        budget_metadata(manifest, chosen, pool_mix, label, target, method, folder / label, hist)
                    )
            score_store.replace_selection(target, method, pl.concat(rows))
    removed = remove_unconfigured_exports(storage, targets, methods)
    for method in methods:
        score_store.delete_selections_except(targets, method)
    if removed:
        context.log.info(f"removed the selections of targets no longer configured: {removed}")
    meta["removed_unconfigured"] = dg.MetadataValue.json(removed)
    inputs = [storage.read_json(scores_version_path(storage, f), "scores")["version"] for f in version_files]
    version = asset_fingerprint(context, inputs, read_pool_version(storage)["version"], methods)
    return dg.MaterializeResult(data_version=data_version(version), metadata=meta)


def choose_budget(score_store: ScoreStore, target: str, method: str, config: SelectionConfig) -> pl.DataFrame:
    """The selection of one (target, method) at the one budget of ``config``, best first."""
    scores, n_scored = read_selection_rows(score_store, target, method, config)
    if n_scored == 0:
        raise ValueError(f"no {method!r} scores for target {target!r}; materialize its scores asset first")
    subtasks = score_store.read_subtask_scores(target, method) if config.strategy == "round_robin" else None
    return choose(config, scores, subtasks, n_scored).with_columns(pl.lit(n_scored).alias("n_scored"))


def write_budget(
    storage: StorageResource,
    tmp,
    dest,
    chosen: pl.DataFrame,
    config: SelectionConfig,
    label: str,
    target: str,
    method: str,
    bases: dict,
    ref: dict,
    warm: dict,
    database: str,
    newer_than_warmup: set[str] | None,
) -> dict:
    """One budget's exports into ``tmp`` (swapped in at ``dest``); returns its manifest."""
    tmp.mkdir()
    manifest = {
        "target": target,
        "method": method,
        "budget": label,
        "config": config.model_dump(),
        "selected": chosen.height,
        "scored_candidates": int(chosen["n_scored"][0]),
        "score_cut": float(cast(float, chosen["score"].min())),
        "counts_per_source": source_counts(chosen),
        # Paths relative to the storage root (an external model stays as configured).
        "model": storage.relative(model_path(storage, ref)),
        "checkpoints": relative_checkpoints(
            storage, [c for c in warm["checkpoints"] if c["name"] in {x["name"] for x in bases["checkpoints"]}]
        ),
        "basis": {
            c: {**v, "dir": storage.relative(storage.path("basis", c, target))}
            for c, v in bases["targets"][target].items()
        }
        if method == METHOD
        else None,
        "artifacts": {
            "candidate_pool": storage.relative(pool_path(storage)),
            "database": storage.relative(database),
            **{
                name: storage.relative(storage.path(name))
                for name in ("warmup", "basis", "target_gradients", "features")
            },
        },
        "files": {
            "jsonl": storage.relative(dest / "selection.jsonl"),
            "messages_jsonl": storage.relative(dest / "selection.messages.jsonl"),
            "parquet": storage.relative(dest / "selection.parquet"),
        },
    }
    if newer_than_warmup is not None:
        manifest["selected_newer_than_warmup"] = int(chosen["candidate_id"].is_in(list(newer_than_warmup)).sum())
    with storage.selection_files(tmp) as files:
        for at in range(0, max(1, chosen.height), EXPORT_CHUNK_ROWS):  # an empty selection: empty files
            part = chosen.slice(at, EXPORT_CHUNK_ROWS)
            messages = training_messages_column(part["messages"])
            files.append(
                part["original"],
                pl.DataFrame([part["candidate_id"].alias("id"), part["source"], messages]),
                # Parquet: the chat messages (a list of {role, content} structs) beside the scores.
                part.drop("messages", "n_scored").with_columns(messages, pl.lit(label).alias("budget")),
            )
    (tmp / "manifest.json").write_text(strict_json(manifest))
    return manifest


def source_counts(rows: pl.DataFrame) -> dict[str, int]:
    counts = rows.group_by("source").len().sort("source")
    return dict(zip(counts["source"].to_list(), counts["len"].to_list(), strict=True))


def histogram_of(score_store: ScoreStore, target: str, method: str):
    """The score histogram of (target, method), counted in DuckDB (not every score in memory)."""
    return score_store.score_histogram(target, method)


def budget_metadata(
    manifest: dict,
    chosen: pl.DataFrame,
    pool_mix: dict,
    label: str,
    target: str,
    method: str,
    dest,
    hist: tuple[np.ndarray, np.ndarray] | None,
) -> dict:
    """The metadata a person reads for one selection: size, source mix, the top rows, the score histogram."""
    key = (target if method == METHOD else f"{target}/{method}") + f"/{label}"
    size, mix = chosen.height, manifest["counts_per_source"]
    mix_rows = [
        {
            "source": s,
            "selected": mix.get(s, 0),
            "selected_share": round(mix.get(s, 0) / size, 3),
            "pool_share": round(n / sum(pool_mix.values()), 3),
        }
        for s, n in sorted(pool_mix.items())
    ]
    meta = {
        f"{key}/selected": size,
        f"{key}/source_mix": dg.MetadataValue.md(md_table(mix_rows, limit=100)),
        f"{key}/manifest": dg.MetadataValue.path(str(dest / "manifest.json")),
    }
    if "selected_newer_than_warmup" in manifest:
        meta[f"{key}/selected_newer_than_warmup"] = manifest["selected_newer_than_warmup"]
    if hist is not None:
        meta[f"{key}/top"] = dg.MetadataValue.md(
            md_table(
                chosen.head(10).select("selection_rank", "candidate_id", "source", "score", "best_subtask").to_dicts()
            )
        )
        meta[f"{key}/histogram"] = histogram(*hist, f"{target}: scores", mark=manifest["score_cut"])
    return meta


@dg.asset(
    group_name="gist",
    deps=[candidate_scores, candidate_pool],
    code_version="5",
    pool=DUCKDB_POOL,
    kinds={"duckdb", "parquet"},
    automation_condition=dg.AutomationCondition.eager(),
)
def selected_subset(
    context: dg.AssetExecutionContext, config: SelectionConfig, storage: StorageResource, score_store: ScoreStore
) -> dg.MaterializeResult:
    """Per target, budget and scored GIST method (candidate_scores' methods): the selection as JSONL (own format
    and chat messages), Parquet, and a manifest."""
    methods = storage.read_json(scores_version_path(storage, METHOD), "candidate_scores").get("methods", [METHOD])
    return write_selections(context, config, storage, score_store, methods, [METHOD])
