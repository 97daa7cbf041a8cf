"""candidate_sketches: GIST for new targets without a pass over the pool.

A candidate's GIST coordinates are z = V_k^T g with V_k = G^T U_k S_k^-1, so they need
only g's inner products with the target gradients. ``candidate_sketches`` stores, once,
a seeded random projection s = g P (d numbers per checkpoint, E[P P^T] = I; by default
a CountSketch, O(D) per example) of each candidate's raw LoRA gradient; it depends on the pool
and the warmup, not on any target. For any later target, z ~= s (P^T V_k): exact target
gradients and SVD as for `gist`, and P^T V_k (d x k) is computed from the basis alone, so no
model runs over the pool (candidate_scores, method `gist_sketch`). The sketches are made by
``candidate_gradient_pass`` (features.py), from the same backward as the exact features when both are due.
"""

import numpy as np

from gist_core.gradients import GradientLayout
from gist_core.projection import sketch_projector, unpack_rows
from gist_resources import ArtifactStore

from .config import CandidateSketchesConfig
from .versions import fingerprint

KIND = "gist_sketch"
ASSET = "candidate_sketches"
SKETCHES_CODE_VERSION = "2"


def sketch_version(config: CandidateSketchesConfig, shard_version: str, warmup_version: str, model_version: str):
    """A shard's sketch version: the code version, the projection, and what the gradients are taken of."""
    return fingerprint(ASSET, SKETCHES_CODE_VERSION, config.model_dump(), shard_version, warmup_version, model_version)


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


def made_with(meta: dict) -> dict:
    """The candidate_sketches config (as ``CandidateSketchesConfig.model_dump()``) a shard's sketches were made
    with, from its meta."""
    projection = meta["projection"]
    return {"dim": projection["dim"], "projection": projection["kind"], "seed": projection["seed"]}


def sketch_shards_due(
    state: tuple[list[str], list[str], dict[str, dict]], config: dict | None
) -> tuple[list[str], dict]:
    """(shards whose sketches are missing, stale, or made with another projection than ``config``, the config to
    make them with), from ``sketch_shard_state``'s answer. ``config`` None: the projection the pool's current
    sketches were made with, so new sketches match them (the default where there are none)."""
    missing, stale, current = state
    want = config or next((made_with(m) for m in current.values()), None) or CandidateSketchesConfig().model_dump()
    other = [s for s, meta in current.items() if made_with(meta) != want]
    return sorted(missing + stale + other), want


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
