"""candidate_scores (DuckDB) and selected_subset (JSONL + Parquet + manifest)."""


import json
import shutil
import time
from collections import Counter

import dagster as dg
import numpy as np
import polars as pl

from gist_core.scoring import checkpoint_weights, cosine_to_subtasks, subtask_directions, weighted_sum
from gist_core.selection import budgets, capped_top, rank_order, round_robin, selection_size
from gist_resources import ScoreStore, StorageResource
from gist_resources.score_store import SCORES_DDL
from gist_resources.storage import strict_json

from .config import CandidateScoresConfig, SelectionConfig
from .gradients import candidate_features, features_dir, read_basis_manifest, spectral_basis
from .model import read_model_ref, read_warmup, warmup_pool_ids
from .partitions import candidate_shards
from .paths import model_path, relative_checkpoints
from .plots import histogram, md_table
from .pool import candidate_pool, pool_path, read_pool_version
from .sketch import candidate_sketches, load_sketches, sketch_scores_inputs, sketched_coordinates
from .versions import asset_fingerprint, data_version, fingerprint

METHOD = "gist"
# DuckDB allows one writing process: every asset that writes the database is in this
# pool, with a limit of 1 (deploy/k8s/dagster.yaml), so even concurrent runs never contend.
DUCKDB_POOL = "duckdb_writer"


def load_shard_features(storage: StorageResource, shards: list[str], bases: dict):
    """Concatenate every current shard's features; refuse missing or stale shards by name.

    Returns (sidecar rows, tensors, {shard: features version}).
    """
    missing, stale, parts, sides, versions = [], [], [], [], {}
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
        parts.append(storage.load_tensors(d / "features.safetensors", "candidate_features", partition=shard))
        sides.append(storage.read_parquet(d / "candidates.parquet", "candidate_features", partition=shard)
                     .with_columns(pl.lit(shard).alias("shard")))
    if missing or stale:
        raise ValueError(
            f"candidate_features is missing for shards {missing} and stale (computed from other shard contents "
            f"or another basis) for {stale}; materialize those partitions of candidate_features first")
    side = pl.concat(sides) if sides else pl.DataFrame()
    tensors = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return side, tensors, versions


def write_method_scores(score_store: ScoreStore, target: str, method: str, scored: pl.DataFrame,
                        per_subtask: np.ndarray, subtask_names: list[str], fingerprint: str) -> dict:
    """Max over subtasks, rank (ties by id), then both tables for (target, method) in one transaction.

    A candidate with a non-finite score (NaN or infinite in any subtask) is left out of both tables and
    the ranking, and is reported (``nonfinite_excluded``), so exports and the ranking stay strict.
    """
    finite = np.isfinite(per_subtask).all(axis=1)
    nonfinite_ids = scored["candidate_id"].filter(pl.Series(~finite)).to_list()
    scored, per_subtask = scored.filter(pl.Series(finite)), per_subtask[finite]
    score = per_subtask.max(axis=1) if len(per_subtask) else np.zeros(0)
    best = per_subtask.argmax(axis=1) if len(per_subtask) else np.zeros(0, dtype=np.int64)
    ids = scored["candidate_id"]
    m, n_sub = len(ids), len(subtask_names)
    if not m:
        raise ValueError(f"no candidate has a finite {method!r} score for target {target!r} "
                         f"({len(nonfinite_ids)} non-finite); check the gradients of the target and the candidates")
    rank = np.empty(m, dtype=np.int64)
    rank[rank_order(score, ids)] = np.arange(1, m + 1)
    names = pl.Series("best_subtask", subtask_names, dtype=pl.Utf8)
    df = scored.select("candidate_id", "source", "shard", "n_tokens").with_columns(
        pl.lit(target).alias("target"), pl.lit(method).alias("method"),
        pl.Series("score", score), pl.Series("rank", rank),
        names.gather(best),
        pl.lit(fingerprint).alias("basis_fingerprint"),
    )
    # One row per (candidate, subtask), candidate-major: per_subtask.reshape(-1)'s order.
    long = pl.DataFrame([
        ids.cast(pl.Utf8).gather(np.repeat(np.arange(m), n_sub)).alias("candidate_id"),
        names.gather(np.tile(np.arange(n_sub), m)).alias("subtask"),
        pl.Series("score", per_subtask.reshape(-1)),
    ]).with_columns(pl.lit(target).alias("target"), pl.lit(method).alias("method"))
    score_store.replace_method_scores(target, method, df, long)
    return {"target": target, "method": method, "scored": df.height, "mean": float(score.mean()),
            "max": float(score.max()), "min": float(score.min()), "nonfinite_excluded": len(nonfinite_ids),
            "nonfinite_ids": ", ".join(nonfinite_ids[:10])}


def target_directions(storage: StorageResource, ckpt: str, target: str) -> tuple[list[str], np.ndarray]:
    """The subtask names and unit directions t_s of one target's basis at one checkpoint."""
    meta = storage.read_json(storage.path("basis", ckpt, target, "meta.json"), "spectral_basis")
    Z = storage.open_npy(storage.path("basis", ckpt, target, "Z.npy"), "spectral_basis", mmap=False)
    return subtask_directions(Z, meta["subtasks"])


def _score_targets(storage, score_store, method: str, scored: pl.DataFrame, coords, bases: dict, ckpts: list[str],
                   weights: np.ndarray, tag: str) -> list[dict]:
    """cos(z, t_s) per checkpoint, weighted, max over subtasks, for every target; ``coords(ckpt, target)`` is z."""
    summary = []
    for target in sorted(bases["targets"]):
        cosines, names = [], None
        for ckpt in ckpts:
            names, directions = target_directions(storage, ckpt, target)
            cosines.append(cosine_to_subtasks(coords(ckpt, target), directions))
        fingerprint = "+".join(([tag] if tag else []) + [bases["targets"][target][c]["fingerprint"] for c in ckpts])
        summary.append(write_method_scores(score_store, target, method, scored, weighted_sum(cosines, weights),
                                           names, fingerprint))
    return summary


@dg.asset(group_name="gist", deps=[candidate_features, candidate_sketches, spectral_basis, candidate_pool],
          code_version="3", pool=DUCKDB_POOL, kinds={"duckdb"})
def candidate_scores(context: dg.AssetExecutionContext, config: CandidateScoresConfig, storage: StorageResource,
                     score_store: ScoreStore) -> dg.MaterializeResult:
    """Per requested method, cosine of each candidate to each subtask direction, checkpoint-weighted, max over
    subtasks: `gist` from candidate_features (exact z), `gist_sketch` from candidate_sketches (z estimated)."""
    bases = read_basis_manifest(storage)
    shards = sorted(context.instance.get_dynamic_partitions(candidate_shards.name))
    avg_lr = {c["name"]: c["avg_lr"] for c in read_warmup(storage)["checkpoints"]}
    ckpts = [c["name"] for c in bases["checkpoints"]]
    weights = checkpoint_weights([avg_lr[c] for c in ckpts])
    targets = sorted(bases["targets"])
    summary, inputs, seconds, removed, side = [], {}, {}, {}, None
    for method in config.methods:
        start = time.perf_counter()
        if method == METHOD:
            side, tensors, shard_versions = load_shard_features(storage, shards, bases)
            inputs[method] = scores_inputs(shard_versions, bases["version"])
            coords, tag = (lambda ckpt, target: tensors[f"{ckpt}/{target}"]), ""
        else:
            side, sketches, versions, projector = load_sketches(storage, shards, ckpts)
            inputs[method] = sketch_scores_inputs(versions, bases["version"])
            z = {c: sketched_coordinates(storage, projector, c, targets, sketches[c]) for c in ckpts}
            coords = lambda ckpt, target: z[ckpt][target]  # noqa: E731
            tag = f"sketch-{projector.kind}-{projector.dim}-seed-{projector.seed}"
        scored = side.filter(pl.col("included"))
        summary += _score_targets(storage, score_store, method, scored, coords, bases, ckpts, weights, tag)
        removed[method] = score_store.delete_targets_except(targets, method)
        seconds[method] = round(time.perf_counter() - start, 3)
    excluded = side.filter(~pl.col("included"))
    newer = newer_than_warmup(context, storage, scored["candidate_id"].to_list(), config.warn_new_share)
    version = asset_fingerprint(context, inputs, read_warmup(storage)["version"])
    # "inputs": per method, what its scores are a function of (the refresh sensor compares it); "methods":
    # what selected_subset selects.
    storage.write_json(scores_version_path(storage, METHOD), {"version": version, "inputs": inputs,
                                                              "methods": list(config.methods)})
    return dg.MaterializeResult(data_version=data_version(version), metadata={
        "methods": dg.MetadataValue.json(list(config.methods)),
        "rows_per_target": dg.MetadataValue.md(md_table(summary)),
        "scoring_seconds": dg.MetadataValue.json(seconds),
        "candidates_scored": scored.height,
        "candidates_excluded": excluded.height,
        "candidates_truncated": int(side["truncated"].sum()),
        **newer,
        "excluded_no_completion": dg.MetadataValue.md(
            md_table(excluded.select("candidate_id", "source", "exclude_reason").to_dicts())),
        "checkpoint_weights": dg.MetadataValue.json(dict(zip(ckpts, weights.tolist()))),
        "rows_of_removed_targets_deleted": dg.MetadataValue.json(removed),
        "nonfinite_scores_excluded": sum(s["nonfinite_excluded"] for s in summary),
        "database": dg.MetadataValue.path(score_store.database),
        "shards": len(shards),
    })


def newer_than_warmup(context, storage: StorageResource, candidate_ids: list[str], warn_share: float) -> dict:
    """How many scored candidates joined the pool after the warmup was trained; a warning past ``warn_share``."""
    known = warmup_pool_ids(storage)
    if known is None:
        return {}
    n_new = sum(1 for c in candidate_ids if c not in known)
    share = n_new / max(1, len(candidate_ids))
    if share > warn_share:
        context.log.warning(f"{n_new} of {len(candidate_ids)} scored candidates ({share:.0%}) joined the pool after "
                            f"the warmup checkpoint was trained (warn_new_share={warn_share}); re-materialize "
                            "warmup_checkpoint and what follows it to train on the current pool")
    return {"candidates_newer_than_warmup": n_new, "share_newer_than_warmup": round(share, 4)}


def scores_inputs(shard_versions: dict[str, str], basis_version: str) -> str:
    """What the GIST scores are a function of; the refresh sensor compares it to decide on a re-score."""
    return fingerprint(sorted(shard_versions.items()), basis_version)


def scores_version_path(storage: StorageResource, group: str):
    return storage.path("scores", f"{group}_version.json")


def selection_dir(storage: StorageResource, target: str, method: str = METHOD, budget: str | None = None):
    """``selections/<target>/<method>``, or one budget's folder in it."""
    return storage.path("selections", target, method, *([budget] if budget else []))


def _top_rows_are_complete(conn, where: str, params: list, rows: pl.DataFrame, size: int) -> bool:
    """True when ``rows`` (those with rank <= size) are the top ``size`` by (score desc, id asc).

    Their ranks must be exactly 1..size, and no row ranked below may beat the weakest of them
    (one filtered count, no sort). A NaN score falls back to reading every row (DuckDB orders
    NaN above all numbers, ``rank_order`` below).
    """
    if not np.array_equal(rows["rank"].to_numpy(), np.arange(1, size + 1)):
        return False
    score = rows["score"].to_numpy()
    if np.isnan(score).any():
        return False
    last = int(rank_order(score, rows["candidate_id"])[-1])
    cut_score, cut_id = float(score[last]), rows["candidate_id"][last]
    beaten = conn.execute(
        f"SELECT count(*) FROM candidate_scores WHERE {where} AND rank > ? "
        "AND (isnan(score) OR score > ? OR (score = ? AND candidate_id < ?))",
        [*params, size, cut_score, cut_score, cut_id]).fetchall()[0][0]
    return beaten == 0


def read_selection_rows(score_store: ScoreStore, target: str, method: str, config: SelectionConfig,
                        with_all_scores: bool = False) -> tuple[pl.DataFrame, int, pl.Series | None]:
    """The candidate_scores rows ``choose`` needs, best first; the number scored; all scores if asked.

    The plain top-n (strategy 'top', no per-source cap) needs only the rows with
    ``rank <= n``: ``write_method_scores`` stores rank = position in ``rank_order`` (score
    descending, ties by id), the order ``choose`` re-derives. If the stored ranks do not
    agree with that (rows written some other way: see ``_top_rows_are_complete``), every
    row is read instead, so the selection is always the one ``choose`` makes on all rows.
    The per-source cap and round-robin can reach below rank n, so they read every row.
    """
    where = "target = ? AND method = ?"
    with score_store.get_connection() as conn:
        conn.execute(SCORES_DDL)
        n_scored = conn.execute(f"SELECT count(*) FROM candidate_scores WHERE {where}",
                                [target, method]).fetchall()[0][0]
        rows = None
        if n_scored and config.strategy == "top" and config.max_per_source is None:
            size = selection_size(n_scored, config.percentage, config.n)
            rows = conn.sql(f"SELECT * FROM candidate_scores WHERE {where} AND rank <= ? ORDER BY rank",
                            params=[target, method, size]).pl()
            if not _top_rows_are_complete(conn, where, [target, method], rows, size):
                rows = None
        if rows is None:
            rows = conn.sql(f"SELECT * FROM candidate_scores WHERE {where} ORDER BY rank",
                            params=[target, method]).pl()
        all_scores = None
        if with_all_scores:
            all_scores = (rows["score"] if rows.height == n_scored else
                          conn.sql(f"SELECT score FROM candidate_scores WHERE {where}",
                                   params=[target, method]).pl()["score"])
    return rows, int(n_scored), all_scores


def choose(config: SelectionConfig, scores: pl.DataFrame, subtask_scores: pl.DataFrame | None,
           n_scored: int | None = None) -> pl.DataFrame:
    """Apply the configured strategy to one (target, method): the chosen rows, best first.

    ``scores`` may be only the best rows (see ``read_selection_rows``); ``n_scored`` is then
    the number of scored candidates the selection size is a fraction of.
    """
    size = selection_size(scores.height if n_scored is None else n_scored, config.percentage, config.n)
    ids = scores["candidate_id"]
    sources = scores["source"].to_list()
    if config.strategy == "top":
        picked = capped_top(scores["score"].to_numpy(), ids, size, sources, config.max_per_source)
    elif config.strategy == "round_robin":
        wide = subtask_scores.pivot(on="subtask", index="candidate_id", values="score")
        wide = scores.select("candidate_id").join(wide, on="candidate_id", how="left")
        picked = round_robin(wide.drop("candidate_id").to_numpy(), ids, size, sources, config.max_per_source)
    else:
        raise ValueError(f"selection strategy must be 'top' or 'round_robin', got {config.strategy!r}")
    if len(picked) < size:
        raise ValueError(f"only {len(picked)} of {size} candidates can be selected with max_per_source="
                         f"{config.max_per_source}; raise the cap or lower the selection size")
    return scores[picked.tolist()].with_columns(pl.Series("selection_rank", np.arange(1, size + 1)))


def training_messages(messages_json: str) -> list[dict]:
    """A pool record's conversation as chat ``messages`` for SFT trainers (open-instruct, TRL).

    Turns after the last assistant turn carry no loss (only assistant tokens are trained on)
    and TRL's conversational format ends with the assistant, so they are left out.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in json.loads(messages_json)]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last + 1]


def selection_budgets(config: SelectionConfig) -> list[tuple[str, SelectionConfig]]:
    """(label, the config with that one budget) for every configured budget."""
    return [(label, config.model_copy(update={"percentage": p, "n": n}))
            for label, p, n in budgets(config.percentage, config.n)]


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


def write_selections(context, config: SelectionConfig, storage: StorageResource, score_store: ScoreStore,
                     methods: list[str], version_files: list[str]) -> dg.MaterializeResult:
    """Per target, method and budget: the chosen candidates as JSONL in their own format, as chat
    ``messages`` JSONL, Parquet, and a manifest, under ``selections/<target>/<method>/<budget>/``."""
    bases = read_basis_manifest(storage)
    pool_df = storage.read_parquet(pool_path(storage), "candidate_pool")
    pool = pool_df.select("candidate_id", "original", "messages")
    pool_mix = Counter(pool_df["source"].to_list())
    ref, warm = read_model_ref(storage), read_warmup(storage)
    targets = sorted(bases["targets"])
    known_at_warmup = warmup_pool_ids(storage)
    per_budget = selection_budgets(config)
    meta: dict = {"budgets": dg.MetadataValue.json([label for label, _ in per_budget])}
    for method in methods:
        for target in targets:
            folder = selection_dir(storage, target, method)
            rows = []
            # Every budget is chosen before anything is written: a bad size touches no file.
            chosen_per_budget = [choose_budget(score_store, target, method, one).join(pool, on="candidate_id",
                                                                                      how="left")
                                 for _, one in per_budget]
            with storage.atomic_dir(folder) as tmp:
                for (label, one), chosen in zip(per_budget, chosen_per_budget):
                    rows.append(chosen.select(pl.lit(target).alias("target"), pl.lit(method).alias("method"),
                                              "candidate_id", pl.col("selection_rank").alias("rank"), "score",
                                              "source", pl.lit(label).alias("budget")))
                    manifest = write_budget(storage, tmp / label, folder / label, chosen, one, label, target,
                                            method, bases, ref, warm, score_store.database, known_at_warmup)
                    meta.update(budget_metadata(manifest, chosen, pool_mix, label, target, method,
                                                folder / label, score_store, one))
            score_store.replace_selection(target, method, pl.concat(rows))
    removed = remove_unconfigured_exports(storage, targets, methods)
    for method in methods:
        score_store.delete_targets_except(targets, method)
    if removed:
        context.log.info(f"removed the selections of targets no longer configured: {removed}")
    meta["removed_unconfigured"] = dg.MetadataValue.json(removed)
    inputs = [storage.read_json(scores_version_path(storage, f), "scores")["version"] for f in version_files]
    version = asset_fingerprint(context, inputs, read_pool_version(storage)["version"], methods)
    return dg.MaterializeResult(data_version=data_version(version), metadata=meta)


def choose_budget(score_store: ScoreStore, target: str, method: str, config: SelectionConfig) -> pl.DataFrame:
    """The selection of one (target, method) at the one budget of ``config``, best first."""
    scores, n_scored, _ = read_selection_rows(score_store, target, method, config)
    if n_scored == 0:
        raise ValueError(f"no {method!r} scores for target {target!r}; materialize its scores asset first")
    subtasks = score_store.read_subtask_scores(target, method) if config.strategy == "round_robin" else None
    return choose(config, scores, subtasks, n_scored).with_columns(pl.lit(n_scored).alias("n_scored"))


def write_budget(storage: StorageResource, tmp, dest, chosen: pl.DataFrame, config: SelectionConfig, label: str,
                 target: str, method: str, bases: dict, ref: dict, warm: dict, database: str,
                 known_at_warmup) -> dict:
    """One budget's exports into ``tmp`` (swapped in at ``dest``); returns its manifest."""
    tmp.mkdir()
    mix = Counter(chosen["source"].to_list())
    manifest = {
        "target": target, "method": method, "budget": label, "config": config.model_dump(),
        "selected": chosen.height, "scored_candidates": int(chosen["n_scored"][0]),
        "score_cut": float(chosen["score"].min()), "counts_per_source": dict(sorted(mix.items())),
        # Paths relative to the storage root (an external model stays as configured).
        "model": storage.relative(model_path(storage, ref)),
        "checkpoints": relative_checkpoints(storage, [
            c for c in warm["checkpoints"] if c["name"] in {x["name"] for x in bases["checkpoints"]}]),
        "basis": {c: {**v, "dir": storage.relative(storage.path("basis", c, target))}
                  for c, v in bases["targets"][target].items()} if method == METHOD else None,
        "artifacts": {"candidate_pool": storage.relative(pool_path(storage)),
                      "database": storage.relative(database),
                      **{name: storage.relative(storage.path(name)) for name in
                         ("warmup", "basis", "target_gradients", "features")}},
        "files": {"jsonl": storage.relative(dest / "selection.jsonl"),
                  "messages_jsonl": storage.relative(dest / "selection.messages.jsonl"),
                  "parquet": storage.relative(dest / "selection.parquet")},
    }
    if known_at_warmup is not None:
        manifest["selected_newer_than_warmup"] = sum(1 for c in chosen["candidate_id"] if c not in known_at_warmup)
    messages = [training_messages(m) for m in chosen["messages"]]
    with open(tmp / "selection.jsonl", "w", encoding="utf-8") as fh:
        for line in chosen["original"]:
            fh.write(line + "\n")
    with open(tmp / "selection.messages.jsonl", "w", encoding="utf-8") as fh:
        for cid, source, msgs in zip(chosen["candidate_id"], chosen["source"], messages):
            fh.write(json.dumps({"id": cid, "source": source, "messages": msgs}, ensure_ascii=False) + "\n")
    # Parquet: the chat messages (a list of {role, content} structs) beside the scores.
    (chosen.drop("messages", "n_scored")
     .with_columns(pl.Series("messages", messages, dtype=pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8}))),
                   pl.lit(label).alias("budget"))
     .write_parquet(tmp / "selection.parquet"))
    (tmp / "manifest.json").write_text(strict_json(manifest))
    return manifest


def budget_metadata(manifest: dict, chosen: pl.DataFrame, pool_mix: Counter, label: str, target: str, method: str,
                    dest, score_store: ScoreStore, config: SelectionConfig) -> dict:
    """The metadata a person reads for one selection: size, source mix, the top rows, the score histogram."""
    key = (target if method == METHOD else f"{target}/{method}") + f"/{label}"
    size, mix = chosen.height, Counter(chosen["source"].to_list())
    mix_rows = [{"source": s, "selected": mix.get(s, 0), "selected_share": round(mix.get(s, 0) / size, 3),
                 "pool_share": round(n / sum(pool_mix.values()), 3)} for s, n in sorted(pool_mix.items())]
    meta = {f"{key}/selected": size, f"{key}/source_mix": dg.MetadataValue.md(md_table(mix_rows, limit=100)),
            f"{key}/manifest": dg.MetadataValue.path(str(dest / "manifest.json"))}
    if "selected_newer_than_warmup" in manifest:
        meta[f"{key}/selected_newer_than_warmup"] = manifest["selected_newer_than_warmup"]
    if method == METHOD:
        meta[f"{key}/top"] = dg.MetadataValue.md(md_table(
            chosen.head(10).select("selection_rank", "candidate_id", "source", "score", "best_subtask").to_dicts()))
        _, _, all_scores = read_selection_rows(score_store, target, method, config, with_all_scores=True)
        meta[f"{key}/histogram"] = histogram(all_scores.to_list(), f"{target}: scores", mark=manifest["score_cut"])
    return meta


@dg.asset(group_name="gist", deps=[candidate_scores, candidate_pool], code_version="5",
          pool=DUCKDB_POOL, kinds={"duckdb", "parquet"}, automation_condition=dg.AutomationCondition.eager())
def selected_subset(context: dg.AssetExecutionContext, config: SelectionConfig, storage: StorageResource,
                    score_store: ScoreStore) -> dg.MaterializeResult:
    """Per target, budget and scored GIST method (candidate_scores' methods): the selection as JSONL (own format
    and chat messages), Parquet, and a manifest."""
    methods = storage.read_json(scores_version_path(storage, METHOD), "candidate_scores").get("methods", [METHOD])
    return write_selections(context, config, storage, score_store, methods, [METHOD])
