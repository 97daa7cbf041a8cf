"""Baselines beside GIST, on the same candidates and budget: random, LESS, representation (RDS-style)."""

import hashlib
import json
from typing import cast

import dagster as dg
import numpy as np
import polars as pl

from gist_core.data import encode_prompt_completion
from gist_core.gradients import GradientLayout, block_features, trainable_linears
from gist_core.projection import BlockProjector, adam_direction
from gist_core.representation import mean_pooled_hidden_states
from gist_core.scoring import (
    checkpoint_weights,
    cosine_to_subtasks,
    mean_cosine_per_subtask,
    subtask_directions,
    weighted_sum,
)
from gist_resources import ArtifactStore, ComputeResource, ScoreStore
from gist_resources.artifacts import FEATURE_ASSETS

from .config import BaselineScoresConfig, LessFeaturesConfig, SelectionConfig
from .features import FEATURES, SKETCHES, ShardInput
from .inputs import candidate_pool, target_sets
from .model import base_model, chat_format, warmup_checkpoint
from .partitions import candidate_shards
from .plots import md_table
from .scores import METHOD, SKETCH_METHOD, write_method_scores
from .selection import write_selections
from .steps import DUCKDB_POOL, progress_logger, shard_features_asset
from .target_gradients import target_gradients
from .versions import asset_fingerprint, data_version


@shard_features_asset(
    group_name="baselines",
    deps=[candidate_pool, target_gradients, base_model],
    code_version="1",
)
def less_candidate_features(
    context: dg.AssetExecutionContext, config: LessFeaturesConfig, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """LESS: Adam-preconditioned candidate gradients, randomly projected; target-independent.

    Uses the same checkpoints as the GIST target gradients.
    """
    shard = context.partition_key
    ref, grads = storage.read_model_ref(), storage.read_target_gradients_manifest()
    dim = config.projection_dim
    shard_in = ShardInput.load(storage, compute, ref, shard)
    tensors, timings = {}, {}
    for ckpt in [c["name"] for c in grads["checkpoints"]]:
        model = compute.load_model(storage.model_path(ref), storage.checkpoint_dir(ckpt))
        layout, _ = trainable_linears(model)
        info = storage.checkpoint_info(ckpt)
        state = storage.adam_moments(ckpt)
        missing = [b.name for b in layout.blocks if b.name not in state]
        if missing:
            raise ValueError(
                f"optimizer state of {storage.checkpoint_dir(ckpt)} has no moments for {missing[:3]}; "
                "re-materialize warmup_checkpoint"
            )
        device = compute.torch_device()
        moments = [
            (state[b.name]["exp_avg"].reshape(-1).to(device), state[b.name]["exp_avg_sq"].reshape(-1).to(device))
            for b in layout.blocks
        ]
        projector = BlockProjector(layout, dim, config.seed, config.projection, device=device)
        betas, eps = tuple(info["betas"]), info["adam_eps"]

        # B023: the closure is only called by block_features below, within this loop iteration.
        def project(acc, k, g):
            projector.add_block(acc, k, adam_direction(g, *moments[k], betas=betas, eps=eps))  # noqa: B023

        z, _, _, stats = block_features(
            model,
            shard_in.kept,
            project,
            dim,
            pad_id=shard_in.tokenizer.pad_token_id,
            progress=progress_logger(context.log, f"less {shard}/{ckpt}"),
            **compute.batching(),
        )
        tensors[ckpt] = z
        timings[ckpt] = stats.timing()
    projection = {"dim": dim, "kind": config.projection, "seed": config.seed}
    version = asset_fingerprint(context, shard_in.version, grads["version"], ref["version"])
    meta = {
        "version": version,
        "shard_version": shard_in.version,
        "projection": projection,
        "timings": timings,
        "checkpoints": [c["name"] for c in grads["checkpoints"]],
    }
    storage.write_shard_features("less", shard, tensors, shard_in.candidates, meta)
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "scored": len(shard_in.keep),
            "projection": dg.MetadataValue.json(projection),
            "timings": dg.MetadataValue.json(timings),
            "bytes_per_candidate": round(sum(t.nbytes for t in tensors.values()) / max(1, len(shard_in.keep)), 1),
        },
    )


def _last_checkpoint(storage: ArtifactStore) -> str:
    return storage.read_warmup()["checkpoints"][-1]["name"]


@shard_features_asset(
    group_name="baselines",
    deps=[candidate_pool, warmup_checkpoint, base_model],
    code_version="1",
)
def representation_features(
    context: dg.AssetExecutionContext, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """Mean-pooled last-layer hidden states of each candidate (model with the last warmup adapter)."""
    import time

    shard = context.partition_key
    ref, ckpt = storage.read_model_ref(), _last_checkpoint(storage)
    shard_in = ShardInput.load(storage, compute, ref, shard)
    model = compute.load_model(storage.model_path(ref), storage.checkpoint_dir(ckpt))
    b = compute.batching()
    start = time.perf_counter()
    reps = mean_pooled_hidden_states(
        model,
        shard_in.kept,
        b["device"],
        b["dtype"],
        b["max_tokens"],
        b["max_batch_size"],
        shard_in.tokenizer.pad_token_id,
    )
    seconds = time.perf_counter() - start
    version = asset_fingerprint(context, shard_in.version, storage.read_warmup()["version"], ref["version"])
    meta = {
        "version": version,
        "shard_version": shard_in.version,
        "checkpoint": ckpt,
        "timings": {ckpt: {"seconds": seconds}},
    }
    storage.write_shard_features("representation", shard, {"hidden": reps}, shard_in.candidates, meta)
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "scored": len(shard_in.keep),
            "seconds": round(seconds, 2),
            "bytes_per_candidate": reps.shape[1] * 4 if reps.size else 0,
        },
    )


def shard_metas(storage: ArtifactStore, shards: list[str], kind: str, needed_by: str = "") -> list[dict]:
    """Every shard's feature meta of one kind; an error naming the shards that have none."""
    metas = [storage.shard_features_meta(kind, s) for s in shards]
    missing = [s for s, meta in zip(shards, metas, strict=True) if meta is None]
    if missing:
        raise ValueError(
            f"{needed_by}{FEATURE_ASSETS[kind]} is missing for shards {missing}; materialize those partitions first"
        )
    return [cast(dict, m) for m in metas]


def load_method_features(storage: ArtifactStore, shards: list[str], kind: str):
    """One kind's features of every shard, concatenated (the baselines score in memory): the included
    candidates' sidecar rows, the tensors, and each shard's meta; missing shards named."""
    metas = shard_metas(storage, shards, kind)
    parts = [storage.read_shard_features(kind, s) for s in shards]
    tensors = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    return pl.concat([p[0] for p in parts]).filter(pl.col("included")), tensors, metas


def scored_candidates(storage: ArtifactStore, shards: list[str]) -> tuple[pl.DataFrame, list[dict], str]:
    """The included candidates of every shard, each shard's feature meta and their kind, from the features of the GIST
    method candidate_scores scored first (``candidate_sketches`` for a ``[gist_sketch]`` run, else
    ``candidate_features``): the candidates the random baseline draws from are the ones GIST chose among."""
    record = storage.scores_record_or_none(METHOD) or {}
    kind = "gist_sketch" if (record.get("methods") or [METHOD])[0] == SKETCH_METHOD else "gist"
    metas = shard_metas(storage, shards, kind, needed_by="the random baseline draws from its candidates: ")
    # Every shard has its meta, so its sidecar too (a shard's folder is swapped in whole).
    sides = [cast(pl.DataFrame, storage.read_shard_candidates(kind, s)).with_columns(shard=pl.lit(s)) for s in shards]
    return pl.concat(sides).filter(pl.col("included")), metas, kind


def random_scores(candidate_ids: list[str], seed: int) -> np.ndarray:
    """A seeded uniform number per candidate, from its id: the top-n is a seeded uniform sample."""
    return np.array(
        [int(hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest()[:13], 16) / 16**13 for cid in candidate_ids]
    )


@dg.asset(
    group_name="baselines",
    deps=[
        FEATURES,
        SKETCHES,
        less_candidate_features,
        representation_features,
        target_gradients,
        target_sets,
        warmup_checkpoint,
    ],
    code_version="3",
    pool=DUCKDB_POOL,
    kinds={"duckdb", "parquet"},
)
def baseline_scores(
    context: dg.AssetExecutionContext,
    config: BaselineScoresConfig,
    storage: ArtifactStore,
    compute: ComputeResource,
    score_store: ScoreStore,
) -> dg.MaterializeResult:
    """Scores of the baselines in the same candidate_scores table (column `method`)."""
    shards = sorted(context.instance.get_dynamic_partitions(candidate_shards.name))
    grads = storage.read_target_gradients_manifest()
    targets = sorted(grads["targets"])
    avg_lr = {c["name"]: c["avg_lr"] for c in storage.read_warmup()["checkpoints"]}
    summary: list[dict] = []
    inputs: list[tuple] = []  # per method, what its scores were made from
    if "random" in config.methods:
        side, metas, kind = scored_candidates(storage, shards)
        inputs.append(("random", kind, [m.get("shard_version") for m in metas]))
        score = random_scores(side["candidate_id"].to_list(), config.random_seed)
        summary += write_method_scores(
            score_store,
            "random",
            [(target, side, score[:, None], ["all"], f"random-seed-{config.random_seed}") for target in targets],
        )
    if "less" in config.methods:
        side, tensors, metas = load_method_features(storage, shards, "less")
        inputs.append(("less", [m.get("version") for m in metas]))
        projections = {json.dumps(m["projection"], sort_keys=True) for m in metas}
        ckpt_sets = {tuple(m["checkpoints"]) for m in metas}
        if len(projections) != 1 or ckpt_sets != {tuple(c["name"] for c in grads["checkpoints"])}:
            raise ValueError(
                "less_candidate_features shards were computed with different projections or "
                "checkpoints than the current target gradients; re-materialize all its partitions"
            )
        proj = metas[0]["projection"]
        projector = BlockProjector(
            GradientLayout.from_description(grads["layout"]), proj["dim"], proj["seed"], proj["kind"]
        )
        ckpts = [c["name"] for c in grads["checkpoints"]]
        weights = checkpoint_weights([avg_lr[c] for c in ckpts])
        per_target = []
        for target in targets:
            per_ckpt, names = [], None
            for ckpt in ckpts:
                G = storage.target_gradients(ckpt, target)
                labels = storage.target_labels(ckpt, target)
                names, m = mean_cosine_per_subtask(
                    tensors[ckpt], projector.project_rows(G), labels["subtask"].to_list()
                )
                per_ckpt.append(m)
            per_target.append(
                (
                    target,
                    side,
                    weighted_sum(per_ckpt, weights),
                    names,
                    f"less-{proj['kind']}-{proj['dim']}-seed-{proj['seed']}",
                )
            )
        summary += write_method_scores(score_store, "less", per_target)
    if "representation" in config.methods:
        side, tensors, metas = load_method_features(storage, shards, "representation")
        inputs.append(("representation", [m.get("version") for m in metas]))
        ref, ckpt = storage.read_model_ref(), _last_checkpoint(storage)
        model = compute.load_model(storage.model_path(ref), storage.checkpoint_dir(ckpt))
        tokenizer = compute.load_tokenizer(storage.model_path(ref))
        df = storage.read_targets().filter(pl.col("split") == "basis")
        b = compute.batching()
        per_target = []
        for target in targets:
            rows = df.filter(pl.col("target") == target).sort("example_id")
            enc = [
                encode_prompt_completion(tokenizer, p, c, ref["max_length"], chat_format(ref))
                for p, c in zip(rows["prompt"], rows["completion"], strict=False)
            ]
            reps = mean_pooled_hidden_states(
                model, enc, b["device"], b["dtype"], b["max_tokens"], b["max_batch_size"], tokenizer.pad_token_id
            )
            names, directions = subtask_directions(reps, rows["subtask"].to_list())
            per_target.append(
                (
                    target,
                    side,
                    cosine_to_subtasks(tensors["hidden"], directions),
                    names,
                    f"representation-{ckpt}",
                )
            )
        del model
        summary += write_method_scores(score_store, "representation", per_target)
    for method in config.methods:
        score_store.delete_selections_except(targets, method)
    version = asset_fingerprint(context, inputs, grads["version"], storage.targets_version())
    storage.write_scores_record("baseline", {"version": version})
    return dg.MaterializeResult(
        data_version=data_version(version), metadata={"scores": dg.MetadataValue.md(md_table(summary, limit=100))}
    )


BASELINE_METHODS = ("random", "less", "representation")


@dg.asset(
    group_name="baselines",
    deps=[baseline_scores, candidate_pool],
    code_version="3",
    pool=DUCKDB_POOL,
    kinds={"duckdb", "parquet"},
)
def baseline_selections(
    context: dg.AssetExecutionContext, config: SelectionConfig, storage: ArtifactStore, score_store: ScoreStore
) -> dg.MaterializeResult:
    """Per target and scored baseline: a selection of the same size as GIST's (the selected_subset config
    unless this asset has its own), same exports."""
    methods = [m for m in score_store.methods() if m in BASELINE_METHODS]
    if not methods:
        raise ValueError("no baseline scores in the database; materialize baseline_scores first")
    return write_selections(context, config, storage, score_store, methods, ["baseline"])
