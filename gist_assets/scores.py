"""candidate_scores (DuckDB) and selected_subset (JSONL + Parquet + manifest)."""


import json
from collections import Counter

import dagster as dg
import numpy as np
import polars as pl
from safetensors.numpy import load_file

from gist_core.scoring import checkpoint_weights, combine_and_max, cosine_to_subtasks, subtask_directions
from gist_core.selection import rank_order, selection_size
from gist_resources import ScoreStore, StorageResource

from .config import SelectionConfig
from .gradients import candidate_features, features_dir, read_basis_manifest, spectral_basis
from .model import read_model_ref, read_warmup
from .partitions import candidate_shards
from .plots import histogram, md_table
from .pool import candidate_pool, pool_path

METHOD = "gist"


def load_shard_features(storage: StorageResource, shards: list[str], bases: dict):
    """Concatenate every current shard's features; refuse missing or stale shards by name."""
    missing, stale, parts, sides = [], [], [], []
    want = {t: {c: v["fingerprint"] for c, v in per.items()} for t, per in bases["targets"].items()}
    for shard in shards:
        d = features_dir(storage, shard)
        if not (d / "meta.json").exists():
            missing.append(shard)
            continue
        meta = json.loads((d / "meta.json").read_text())
        if meta["fingerprints"] != want:
            stale.append(shard)
            continue
        try:
            parts.append(load_file(str(d / "features.safetensors")))
        except Exception as exc:
            raise ValueError(f"{d / 'features.safetensors'} is unreadable ({exc}); re-materialize "
                             f"candidate_features for partition {shard}") from exc
        sides.append(pl.read_parquet(d / "candidates.parquet").with_columns(pl.lit(shard).alias("shard")))
    if missing or stale:
        raise ValueError(
            f"candidate_features is missing for shards {missing} and stale (computed with another basis) for "
            f"{stale}; materialize those partitions of candidate_features first")
    side = pl.concat(sides) if sides else pl.DataFrame()
    tensors = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return side, tensors


@dg.asset(group_name="gist", deps=[candidate_features, spectral_basis, candidate_pool], code_version="1",
          kinds={"duckdb"})
def candidate_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                     score_store: ScoreStore) -> dg.MaterializeResult:
    """Cosine of each candidate to each subtask direction, checkpoint-weighted, max over subtasks."""
    bases = read_basis_manifest(storage)
    shards = sorted(context.instance.get_dynamic_partitions(candidate_shards.name))
    side, tensors = load_shard_features(storage, shards, bases)
    scored = side.filter(pl.col("included"))
    avg_lr = {c["name"]: c["avg_lr"] for c in read_warmup(storage)["checkpoints"]}
    ckpts = [c["name"] for c in bases["checkpoints"]]
    weights = checkpoint_weights([avg_lr[c] for c in ckpts])
    targets = sorted(bases["targets"])
    summary = []
    for target in targets:
        cosines, subtask_names = [], None
        for ckpt in ckpts:
            meta = json.loads(storage.path("basis", ckpt, target, "meta.json").read_text())
            Z = np.load(storage.path("basis", ckpt, target, "Z.npy"), allow_pickle=False)
            names, directions = subtask_directions(Z, meta["subtasks"])
            subtask_names = names
            cosines.append(cosine_to_subtasks(tensors[f"{ckpt}/{target}"], directions))
        score, best = combine_and_max(cosines, weights)
        ids = scored["candidate_id"].to_list()
        order = rank_order(score, ids)
        rank = np.empty(len(ids), dtype=np.int64)
        rank[order] = np.arange(1, len(ids) + 1)
        fingerprint = "+".join(bases["targets"][target][c]["fingerprint"] for c in ckpts)
        df = scored.select("candidate_id", "source", "shard", "n_tokens").with_columns(
            pl.lit(target).alias("target"), pl.lit(METHOD).alias("method"),
            pl.Series("score", score), pl.Series("rank", rank),
            pl.Series("best_subtask", [subtask_names[i] for i in best]),
            pl.lit(fingerprint).alias("basis_fingerprint"),
        )
        score_store.replace_scores(target, METHOD, df)
        summary.append({"target": target, "scored": df.height, "mean": float(score.mean()),
                        "max": float(score.max()), "min": float(score.min())})
    removed = score_store.delete_targets_except(targets, METHOD)
    excluded = side.filter(~pl.col("included"))
    return dg.MaterializeResult(metadata={
        "rows_per_target": dg.MetadataValue.md(md_table(summary)),
        "candidates_scored": scored.height,
        "excluded_no_completion": dg.MetadataValue.md(
            md_table(excluded.select("candidate_id", "source", "exclude_reason").to_dicts())),
        "checkpoint_weights": dg.MetadataValue.json(dict(zip(ckpts, weights.tolist()))),
        "rows_of_removed_targets_deleted": removed,
        "database": dg.MetadataValue.path(score_store.database),
        "shards": len(shards),
    })


def selection_dir(storage: StorageResource, target: str):
    return storage.path("selections", target, METHOD)


@dg.asset(group_name="gist", deps=[candidate_scores, candidate_pool], code_version="1",
          kinds={"duckdb", "parquet"})
def selected_subset(context: dg.AssetExecutionContext, config: SelectionConfig, storage: StorageResource,
                    score_store: ScoreStore) -> dg.MaterializeResult:
    """Per target: top percentage / n candidates as JSONL in their own format, Parquet, and a manifest."""
    bases = read_basis_manifest(storage)
    pool = storage.read_parquet(pool_path(storage), "candidate_pool").select("candidate_id", "original")
    pool_mix = Counter(storage.read_parquet(pool_path(storage), "candidate_pool")["source"].to_list())
    ref, warm = read_model_ref(storage), read_warmup(storage)
    meta: dict = {}
    for target in sorted(bases["targets"]):
        scores = score_store.read_scores(target, METHOD)
        size = selection_size(scores.height, config.percentage, config.n)
        chosen = scores.head(size).join(pool, on="candidate_id", how="left").sort("rank")
        dest = selection_dir(storage, target)
        mix = Counter(chosen["source"].to_list())
        manifest = {
            "target": target, "method": METHOD, "config": config.model_dump(), "selected": size,
            "scored_candidates": scores.height, "score_cut": float(chosen["score"][-1]),
            "counts_per_source": dict(sorted(mix.items())), "model": ref["path"],
            "checkpoints": [c for c in warm["checkpoints"] if c["name"] in {x["name"] for x in bases["checkpoints"]}],
            "basis": {c: {**v, "dir": str(storage.path("basis", c, target))} for c, v in bases["targets"][target].items()},
            "artifacts": {"candidate_pool": str(pool_path(storage)), "database": score_store.database,
                          "warmup": str(storage.path("warmup")), "basis": str(storage.path("basis")),
                          "target_gradients": str(storage.path("target_gradients")),
                          "features": str(storage.path("features"))},
            "files": {"jsonl": str(dest / "selection.jsonl"), "parquet": str(dest / "selection.parquet")},
        }
        with storage.atomic_dir(dest) as tmp:
            with open(tmp / "selection.jsonl", "w", encoding="utf-8") as fh:
                for line in chosen["original"]:
                    fh.write(line + "\n")
            chosen.write_parquet(tmp / "selection.parquet")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        score_store.replace_selection(target, METHOD, chosen.select(
            pl.lit(target).alias("target"), pl.lit(METHOD).alias("method"), "candidate_id", "rank", "score", "source"))
        mix_rows = [{"source": s, "selected": mix.get(s, 0), "selected_share": round(mix.get(s, 0) / size, 3),
                     "pool_share": round(n / sum(pool_mix.values()), 3)} for s, n in sorted(pool_mix.items())]
        meta[f"{target}/selected"] = size
        meta[f"{target}/source_mix"] = dg.MetadataValue.md(md_table(mix_rows, limit=100))
        meta[f"{target}/top"] = dg.MetadataValue.md(md_table(
            chosen.head(10).select("rank", "candidate_id", "source", "score", "best_subtask").to_dicts()))
        meta[f"{target}/histogram"] = histogram(scores["score"].to_list(), f"{target}: scores",
                                                mark=manifest["score_cut"])
        meta[f"{target}/manifest"] = dg.MetadataValue.path(str(dest / "manifest.json"))
    score_store.delete_targets_except(sorted(bases["targets"]), METHOD)
    return dg.MaterializeResult(metadata=meta)
