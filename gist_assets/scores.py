"""candidate_scores: GIST scores of every candidate for every target, streamed shard by shard into the score
store (Parquet score sets with DuckDB views over them), for each requested method: `gist` from
candidate_features (exact coordinates z), `gist_sketch` from candidate_sketches (z estimated), and the
opt-in variant `gist_fullspace` (candidate_features: the cosine in the full gradient space)."""

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import NamedTuple, TypeVar

import dagster as dg
import numpy as np
import polars as pl

from gist_core.projection import sketched_coordinates
from gist_core.scoring import TargetScorer, checkpoint_weights
from gist_resources import ArtifactStore, ScoreStore
from gist_resources.score_store import SCORE_SCHEMA, ScoreSetWriter

from .basis import spectral_basis
from .config import CandidateScoresConfig
from .features import FEATURES, SKETCHES, current_feature_shards
from .inputs import candidate_pool
from .partitions import candidate_shards
from .plots import md_table
from .sketches import current_sketch_shards, projected_bases
from .steps import DUCKDB_POOL
from .versions import asset_fingerprint, data_version, fingerprint

METHOD = "gist"
SKETCH_METHOD = "gist_sketch"
FULLSPACE_METHOD = "gist_fullspace"
T = TypeVar("T")
R = TypeVar("R")


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


def target_scorers(storage: ArtifactStore, bases: dict, weights: np.ndarray) -> dict[str, TargetScorer]:
    """Every target's scorer, from its bases' coordinates Z at each checkpoint."""
    ckpts = [c["name"] for c in bases["checkpoints"]]
    scorers = {}
    for target in sorted(bases["targets"]):
        coordinates = [storage.basis_coordinates(c, target) for c in ckpts]
        subtasks = coordinates[0][1]["subtasks"]
        scorers[target] = TargetScorer.from_coordinates([Z for Z, _ in coordinates], subtasks, weights)
    return scorers


def score_shard(
    shard: str,
    writer: ScoreSetWriter,
    coordinates: Callable[[str], tuple[pl.DataFrame, dict[str, list[np.ndarray]], list[np.ndarray] | None]],
    scorers: dict[str, TargetScorer],
    fingerprints: dict[str, str],
) -> tuple[pl.DataFrame, list[tuple[str, ScoredRows]]]:
    """One shard's scores for every target, written into the score set (on the shard's thread: Parquet
    encoding is costly); its sidecar and the rows. ``coordinates(shard)`` gives the sidecar, per target the
    included candidates' z at each checkpoint, and their gradient norms per checkpoint when the method
    scores in the full gradient space (else None)."""
    side, z, gradient_norms = coordinates(shard)
    included = side.filter(pl.col("included"))
    parts = []
    for target, scorer in scorers.items():
        per_subtask = scorer.subtask_scores(z[target], gradient_norms)
        part = scored_rows(included, per_subtask, scorer.subtasks, fingerprints[target])
        writer.add(target, part.rows, part.subtasks)
        parts.append((target, part))
    return side, parts


def exact_coordinates(storage: ArtifactStore, ckpts: list[str], targets: list[str], fullspace: bool, shard: str):
    """A shard's sidecar and its candidates' exact z (candidate_features) per target and checkpoint; with
    ``fullspace``, also their gradient norms |g| per checkpoint."""
    side, tensors = storage.read_shard_features("gist", shard)
    norms = [tensors[f"{c}/grad_norm"] for c in ckpts] if fullspace else None
    return side, {t: [tensors[f"{c}/{t}"] for c in ckpts] for t in targets}, norms


def sketched_shard_coordinates(storage: ArtifactStore, ckpts: list[str], projected: dict, shard: str):
    """A shard's sidecar and its candidates' z estimated from candidate_sketches, per target and checkpoint."""
    side, tensors = storage.read_shard_features(SKETCH_METHOD, shard)
    # Packed shards carry a scale per row (pack_rows); shards written before packing are float32 rows.
    per_ckpt = [
        sketched_coordinates(tensors[c], projected[c][0], projected[c][1], tensors.get(f"{c}/scale")) for c in ckpts
    ]
    return side, {t: [z[t] for z in per_ckpt] for t in projected[ckpts[0]][1]}, None


def scores_inputs(shard_versions: dict[str, str], basis_version: str) -> str:
    """What a method's scores are a function of; the refresh sensor compares it to decide on a re-score."""
    return fingerprint(sorted(shard_versions.items()), basis_version)


@dg.asset(
    group_name="gist",
    deps=[FEATURES, SKETCHES, spectral_basis, candidate_pool],
    code_version="5",
    pool=DUCKDB_POOL,
    kinds={"duckdb", "parquet"},
)
def candidate_scores(
    context: dg.AssetExecutionContext, config: CandidateScoresConfig, storage: ArtifactStore, score_store: ScoreStore
) -> dg.MaterializeResult:
    """Per requested method, cosine of each candidate to each subtask direction, checkpoint-weighted, max over
    subtasks: `gist` from candidate_features (exact z), `gist_sketch` from candidate_sketches (z estimated),
    `gist_fullspace` the cosine in the full gradient space. Streamed shard by shard into the score store."""
    bases = storage.read_basis_manifest()
    shards = sorted(context.instance.get_dynamic_partitions(candidate_shards.name))
    avg_lr = {c["name"]: c["avg_lr"] for c in storage.read_warmup()["checkpoints"]}
    ckpts = [c["name"] for c in bases["checkpoints"]]
    weights = checkpoint_weights([avg_lr[c] for c in ckpts])
    scorers = target_scorers(storage, bases, weights)
    targets = sorted(scorers)
    exact_fps = {t: "+".join(bases["targets"][t][c]["fingerprint"] for c in ckpts) for t in targets}
    summary, inputs, seconds, removed, counts = [], {}, {}, {}, None
    for method in config.methods:
        start = time.perf_counter()
        before = score_store.scored_targets(method)
        if method in (METHOD, FULLSPACE_METHOD):
            inputs[method] = scores_inputs(current_feature_shards(storage, shards), bases["version"])
            coordinates = partial(exact_coordinates, storage, ckpts, targets, method == FULLSPACE_METHOD)
            fps = exact_fps if method == METHOD else {t: f"fullspace+{fp}" for t, fp in exact_fps.items()}
        else:
            versions, projector = current_sketch_shards(storage, shards, ckpts)
            inputs[method] = scores_inputs(versions, bases["version"])
            projected = {c: projected_bases(storage, projector, c, targets) for c in ckpts}
            coordinates = partial(sketched_shard_coordinates, storage, ckpts, projected)
            tag = f"sketch-{projector.kind}-{projector.dim}-seed-{projector.seed}"
            fps = {t: f"{tag}+{fp}" for t, fp in exact_fps.items()}
        per_target: dict = {}
        shard_counts = ShardCounts()
        with score_store.write_scores(method) as writer:
            work = partial(score_shard, writer=writer, coordinates=coordinates, scorers=scorers, fingerprints=fps)
            # The threads write the parts; the main thread adds up the report in shard order.
            for side, parts in in_order(work, shards):
                shard_counts.add(side)
                for target, part in parts:
                    record_scored_rows(per_target, method, target, part)
            summary += score_summary(per_target)
        counts = counts or shard_counts
        removed[method] = sorted(set(before) - set(targets))
        seconds[method] = round(time.perf_counter() - start, 3)
    assert counts is not None  # set by the loop above: config.methods is never empty
    newer = newer_than_warmup(context, storage, score_store, targets[0], config.methods[0], config.warn_new_share)
    version = asset_fingerprint(context, inputs, storage.read_warmup()["version"])
    # "inputs": per method, what its scores are a function of (the refresh sensor compares it); "methods":
    # what selected_subset selects.
    storage.write_scores_record(METHOD, {"version": version, "inputs": inputs, "methods": list(config.methods)})
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
    context, storage: ArtifactStore, score_store: ScoreStore, target: str, method: str, warn_share: float
) -> dict:
    """How many scored candidates joined the pool after the warmup was trained; a warning past ``warn_share``."""
    ids_file = storage.warmup_pool_ids_file()
    if ids_file is None:
        return {}
    n_scored = score_store.count_scores(target, method)
    n_new = score_store.count_absent_from(target, method, ids_file)
    share = n_new / max(1, n_scored)
    if share > warn_share:
        context.log.warning(
            f"{n_new} of {n_scored} scored candidates ({share:.0%}) joined the pool after "
            f"the warmup checkpoint was trained (warn_new_share={warn_share}); re-materialize "
            "warmup_checkpoint and what follows it to train on the current pool"
        )
    return {"candidates_newer_than_warmup": n_new, "share_newer_than_warmup": round(share, 4)}
