"""candidate_sketches and the `gist_sketch` scores: GIST for new targets without a pass over the pool.

A candidate's GIST coordinates are z = V_k^T g with V_k = G^T U_k S_k^-1, so they need
only g's inner products with the target gradients. ``candidate_sketches`` stores, once,
a seeded random projection s = g P (d numbers per checkpoint, E[P P^T] = I; by default
a CountSketch, O(D) per example) of each candidate's raw LoRA gradient; it depends on the pool
and the warmup, not on any target.
For any later target, z ~= s (P^T V_k): exact target gradients and SVD as for `gist`,
and P^T V_k (d x k) is computed from the basis alone, so no model runs over the pool.
"""

import dagster as dg
import numpy as np
import polars as pl

from gist_core.gradients import GradientLayout, ParamBlock, block_features, trainable_linears
from gist_core.projection import sketch_projector
from gist_resources import ComputeResource, StorageResource

from .config import CandidateSketchesConfig
from .gradients import GPU_POOL, GRADIENT_RETRY, ShardInput, features_dir, load_bases, progress_logger
from .model import GPU_STEP_TAGS, base_model, read_model_ref, read_warmup, warmup_checkpoint
from .partitions import candidate_shards
from .paths import checkpoint_dir, model_path
from .pool import candidate_pool, read_pool_version
from .versions import asset_fingerprint, data_version, fingerprint

SKETCH_METHOD = "gist_sketch"
ASSET = "candidate_sketches"


@dg.asset(
    group_name="gist",
    deps=[candidate_pool, warmup_checkpoint, base_model],
    partitions_def=candidate_shards,
    code_version="1",
    retry_policy=GRADIENT_RETRY,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "safetensors"},
)
def candidate_sketches(
    context: dg.AssetExecutionContext,
    config: CandidateSketchesConfig,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """One shard's target-independent gradient sketches g P (d per warmup checkpoint), for `gist_sketch`."""
    shard = context.partition_key
    ref, warm = read_model_ref(storage), read_warmup(storage)
    shard_in = ShardInput.load(storage, compute, ref, shard)
    encoded = [shard_in.encoded[i] for i in shard_in.keep]
    tensors, timings, layout = {}, {}, None
    for ckpt in warm["checkpoints"]:
        model = compute.load_model(model_path(storage, ref), checkpoint_dir(storage, ckpt))
        layout, _ = trainable_linears(model)
        projector = sketch_projector(layout, config.dim, config.seed, config.projection, device=compute.torch_device())
        s, norms, losses, stats = block_features(
            model,
            encoded,
            projector.project_block,
            config.dim,
            pad_id=shard_in.tokenizer.pad_token_id,
            progress=progress_logger(context.log, f"sketch {shard}/{ckpt['name']}"),
            **compute.batching(),
        )
        tensors[ckpt["name"]] = s
        tensors[f"{ckpt['name']}/grad_norm"] = norms
        tensors[f"{ckpt['name']}/loss"] = losses
        timings[ckpt["name"]] = stats.timing()
        del model
    assert layout is not None  # set by the loop above: a warmup has at least one checkpoint
    projection = {"dim": config.dim, "kind": config.projection, "seed": config.seed}
    version = asset_fingerprint(context, shard_in.version, warm["version"], ref["version"])
    shard_in.write(
        storage,
        shard,
        SKETCH_METHOD,
        tensors,
        {
            "version": version,
            "shard_version": shard_in.version,
            "warmup_version": warm["version"],
            "projection": projection,
            "layout": layout.describe(),
            "checkpoints": [c["name"] for c in warm["checkpoints"]],
            "timings": timings,
        },
    )
    n_sketch = sum(tensors[c["name"]].nbytes for c in warm["checkpoints"])
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "scored": len(encoded),
            "projection": dg.MetadataValue.json(projection),
            "checkpoints": dg.MetadataValue.json([c["name"] for c in warm["checkpoints"]]),
            "timings": dg.MetadataValue.json(timings),
            "sketch_bytes_per_candidate": round(n_sketch / max(1, len(encoded)), 1),
            "device": str(compute.torch_device()),
            "path": dg.MetadataValue.path(str(features_dir(storage, shard, SKETCH_METHOD))),
        },
    )


def stale_sketch_shards(storage: StorageResource, shards: list[str]) -> tuple[list[str], dict[str, str]]:
    """Shards whose sketches are missing or were made from other shard contents or another warmup.

    Returns (stale shards, {fresh shard: sketch version}).
    """
    pool_shards, warm_version = read_pool_version(storage)["shards"], read_warmup(storage)["version"]
    stale, versions = [], {}
    for shard in shards:
        path = features_dir(storage, shard, SKETCH_METHOD) / "meta.json"
        meta = storage.read_json(path, ASSET, partition=shard) if path.exists() else {}
        if meta.get("shard_version") != pool_shards.get(shard) or meta.get("warmup_version") != warm_version:
            stale.append(shard)
        else:
            versions[shard] = meta["version"]
    return stale, versions


def sketch_scores_inputs(sketch_versions: dict[str, str], basis_version: str) -> str:
    """What the gist_sketch scores are a function of (as ``scores_inputs`` for gist)."""
    return fingerprint(sorted(sketch_versions.items()), basis_version)


def current_sketch_shards(storage: StorageResource, shards: list[str], checkpoints: list[str]):
    """({shard: sketch version}, the projector) when every shard's sketches are current and made with one
    projection; otherwise an error naming the missing and stale shards (other shard contents, warmup, or
    without one of ``checkpoints``)."""
    pool_shards, warm_version = read_pool_version(storage)["shards"], read_warmup(storage)["version"]
    missing, stale, metas = [], [], {}
    for shard in shards:
        d = features_dir(storage, shard, SKETCH_METHOD)
        if not (d / "meta.json").exists():
            missing.append(shard)
            continue
        meta = storage.read_json(d / "meta.json", ASSET, partition=shard)
        if (
            meta.get("shard_version") != pool_shards.get(shard)
            or meta.get("warmup_version") != warm_version
            or not set(checkpoints) <= set(meta["checkpoints"])
        ):
            stale.append(shard)
            continue
        metas[shard] = meta
    if missing or stale:
        raise ValueError(
            f"{ASSET} is missing for shards {missing} and stale (other shard contents, warmup or "
            f"checkpoints) for {stale}; materialize those partitions of {ASSET} first"
        )
    kinds = {repr((sorted(m["projection"].items()), m["layout"])) for m in metas.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"{ASSET} shards were made with different projections or adapters; "
            f"re-materialize every partition of {ASSET} with one config"
        )
    first = metas[shards[0]]
    layout = GradientLayout(tuple(ParamBlock(n, tuple(shape), off) for n, shape, off in first["layout"]["blocks"]))
    proj = first["projection"]
    projector = sketch_projector(layout, proj["dim"], proj["seed"], proj["kind"])
    return {s: m["version"] for s, m in metas.items()}, projector


def shard_sketches(storage: StorageResource, shard: str, checkpoints: list[str]):
    """One shard's sidecar rows (with its name) and {checkpoint: sketches (M x d)}."""
    d = features_dir(storage, shard, SKETCH_METHOD)
    tensors = storage.load_tensors(d / "features.safetensors", ASSET, partition=shard)
    side = storage.read_parquet(d / "candidates.parquet", ASSET, partition=shard)
    return side.with_columns(pl.lit(shard).alias("shard")), {c: tensors[c] for c in checkpoints}


def load_sketches(storage: StorageResource, shards: list[str], checkpoints: list[str]):
    """Every current shard's sketches concatenated (for comparisons on small pools; the scoring asset streams):
    (sidecar rows, {checkpoint: M x d}, {shard: version}, projector)."""
    versions, projector = current_sketch_shards(storage, shards, checkpoints)
    parts = [shard_sketches(storage, shard, checkpoints) for shard in shards]
    sketches = {c: np.concatenate([p[1][c] for p in parts]) for c in checkpoints}
    return pl.concat([p[0] for p in parts]), sketches, versions, projector


def sketch_projection(storage: StorageResource, projector, ckpt: str, targets: list[str]):
    """(P^T V_k of every target side by side (d x sum k), {target: its columns}) at one checkpoint."""
    V, slices = load_bases(storage, ckpt, targets)
    if V.shape[0] != projector.layout.dim:
        raise ValueError(
            f"the bases of {ckpt} have {V.shape[0]} rows but {ASSET} sketched "
            f"{projector.layout.dim}-entry gradients (another adapter); re-materialize {ASSET}"
        )
    return projector.project_columns(V.numpy()).astype(np.float32), slices


def sketched_coordinates(projected, sketches: np.ndarray) -> dict[str, np.ndarray]:
    """Per target, the candidates' estimated coordinates s (P^T V_k) (M x k), from ``sketch_projection``."""
    PV, slices = projected
    z = sketches @ PV
    return {name: z[:, a:b] for name, (a, b) in slices.items()}
