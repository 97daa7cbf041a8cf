"""candidate_sketches: GIST for new targets without a pass over the pool.

A candidate's GIST coordinates are z = V_k^T g with V_k = G^T U_k S_k^-1, so they need
only g's inner products with the target gradients. ``candidate_sketches`` stores, once,
a seeded random projection s = g P (d numbers per checkpoint, E[P P^T] = I; by default
a CountSketch, O(D) per example) of each candidate's raw LoRA gradient; it depends on the pool
and the warmup, not on any target. For any later target, z ~= s (P^T V_k): exact target
gradients and SVD as for `gist`, and P^T V_k (d x k) is computed from the basis alone, so no
model runs over the pool (candidate_scores, method `gist_sketch`).
"""

import dagster as dg
import numpy as np

from gist_core.gradients import GradientLayout, block_features, trainable_linears
from gist_core.projection import pack_rows, sketch_projector, unpack_rows
from gist_resources import ArtifactStore, ComputeResource

from .config import CandidateSketchesConfig
from .features import ShardInput
from .inputs import candidate_pool
from .model import base_model, warmup_checkpoint
from .steps import progress_logger, shard_features_asset
from .versions import asset_fingerprint, data_version

KIND = "gist_sketch"
ASSET = "candidate_sketches"


@shard_features_asset(
    group_name="gist",
    deps=[candidate_pool, warmup_checkpoint, base_model],
    code_version="2",
)
def candidate_sketches(
    context: dg.AssetExecutionContext,
    config: CandidateSketchesConfig,
    storage: ArtifactStore,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """One shard's target-independent gradient sketches g P (d per warmup checkpoint), for `gist_sketch`."""
    shard = context.partition_key
    ref, warm = storage.read_model_ref(), storage.read_warmup()
    shard_in = ShardInput.load(storage, compute, ref, shard)
    tensors, timings, layout = {}, {}, None
    for ckpt in [c["name"] for c in warm["checkpoints"]]:
        model = compute.load_model(storage.model_path(ref), storage.checkpoint_dir(ckpt))
        layout, _ = trainable_linears(model)
        projector = sketch_projector(layout, config.dim, config.seed, config.projection, device=compute.torch_device())
        s, norms, losses, stats = block_features(
            model,
            shard_in.kept,
            projector.add_block,
            config.dim,
            pad_id=shard_in.tokenizer.pad_token_id,
            progress=progress_logger(context.log, f"sketch {shard}/{ckpt}"),
            **compute.batching(),
        )
        tensors[ckpt], tensors[f"{ckpt}/scale"] = pack_rows(s)  # half the bytes of float32 (pack_rows)
        tensors[f"{ckpt}/grad_norm"] = norms
        tensors[f"{ckpt}/loss"] = losses
        timings[ckpt] = stats.timing()
        del model
    assert layout is not None  # set by the loop above: a warmup has at least one checkpoint
    projection = {"dim": config.dim, "kind": config.projection, "seed": config.seed}
    version = asset_fingerprint(context, shard_in.version, warm["version"], ref["version"])
    checkpoints = [c["name"] for c in warm["checkpoints"]]
    meta = {
        "version": version,
        "shard_version": shard_in.version,
        "warmup_version": warm["version"],
        "projection": projection,
        "layout": layout.describe(),
        "checkpoints": checkpoints,
        "timings": timings,
    }
    storage.write_shard_features(KIND, shard, tensors, shard_in.candidates, meta)
    n_sketch = sum(tensors[c].nbytes + tensors[f"{c}/scale"].nbytes for c in checkpoints)
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "scored": len(shard_in.keep),
            "projection": dg.MetadataValue.json(projection),
            "checkpoints": dg.MetadataValue.json(checkpoints),
            "timings": dg.MetadataValue.json(timings),
            "sketch_bytes_per_candidate": round(n_sketch / max(1, len(shard_in.keep)), 1),
            "device": str(compute.torch_device()),
            "path": dg.MetadataValue.path(str(storage.features_location(KIND, shard))),
        },
    )


def sketch_rows(tensors: dict[str, np.ndarray], ckpt: str) -> np.ndarray:
    """A shard's sketches at one checkpoint (M x d float32) from its stored tensors (packed float16 rows and
    their scales; plain float32 in shards written before packing)."""
    scale = tensors.get(f"{ckpt}/scale")
    return tensors[ckpt] if scale is None else unpack_rows(tensors[ckpt], scale)


def sketch_shard_state(
    storage: ArtifactStore, shards: list[str], checkpoints: list[str] | None = None
) -> tuple[list[str], list[str], dict[str, dict]]:
    """(shards without sketches, shards whose sketches were made from other shard contents, another warmup or
    without one of ``checkpoints``, {current shard: its sketch meta})."""
    pool_shards, warm_version = storage.pool_record()["shards"], storage.read_warmup()["version"]
    missing, stale, current = [], [], {}
    for shard in shards:
        meta = storage.shard_features_meta(KIND, shard)
        if meta is None:
            missing.append(shard)
        elif (
            meta.get("shard_version") != pool_shards.get(shard)
            or meta.get("warmup_version") != warm_version
            or not set(checkpoints or []) <= set(meta["checkpoints"])
        ):
            stale.append(shard)
        else:
            current[shard] = meta
    return missing, stale, current


def current_sketch_shards(storage: ArtifactStore, shards: list[str], checkpoints: list[str]):
    """({shard: sketch version}, the projector) when every shard's sketches are current and made with one
    projection; otherwise an error naming the missing and stale shards."""
    missing, stale, metas = sketch_shard_state(storage, shards, checkpoints)
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
    proj = first["projection"]
    projector = sketch_projector(
        GradientLayout.from_description(first["layout"]), proj["dim"], proj["seed"], proj["kind"]
    )
    return {s: m["version"] for s, m in metas.items()}, projector


def projected_bases(storage: ArtifactStore, projector, ckpt: str, targets: list[str]):
    """(P^T V_k of every target side by side (d x sum k), {target: its columns}) at one checkpoint."""
    V, slices = storage.bases_side_by_side(ckpt, targets)
    if V.shape[0] != projector.layout.dim:
        raise ValueError(
            f"the bases of {ckpt} have {V.shape[0]} rows but {ASSET} sketched "
            f"{projector.layout.dim}-entry gradients (another adapter); re-materialize {ASSET}"
        )
    return projector.project_columns(V).astype(np.float32), slices
