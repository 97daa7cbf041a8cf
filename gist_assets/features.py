"""candidate_features: one shard's candidate gradients projected onto every target's basis, and what every
shard-partitioned feature asset shares (a shard's candidates, tokenized; which shards are current)."""

import json
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import torch

from gist_core.data import encode_messages
from gist_core.gradients import projected_gradients
from gist_resources import ArtifactStore, ComputeResource
from gist_resources.files import ArtifactError

from .basis import spectral_basis
from .inputs import candidate_pool
from .model import base_model, chat_format
from .steps import progress_logger, shard_features_asset
from .versions import data_version, fingerprint

FEATURES_CODE_VERSION = "2"


@dataclass
class ShardInput:
    """One shard's candidates, tokenized; ``keep`` are those with completion tokens."""

    tokenizer: Any  # a Hugging Face tokenizer
    encoded: list
    keep: list[int]
    candidates: pl.DataFrame  # per candidate: id, source, token counts, included, exclude_reason
    version: str  # the shard's content hash from candidate_pool

    @classmethod
    def load(cls, storage: ArtifactStore, compute: ComputeResource, ref: dict, shard: str) -> "ShardInput":
        version = storage.pool_record()["shards"].get(shard)
        if version is None:
            raise ArtifactError(
                f"shard {shard!r} is not in the current pool; re-materialize candidate_pool "
                "(it removes the shards of deleted files)"
            )
        pool = storage.read_pool(columns=["candidate_id", "source", "messages"], shard=shard)
        tokenizer = compute.load_tokenizer(storage.model_path(ref))
        encoded = [
            encode_messages(tokenizer, json.loads(m), ref["max_length"], chat_format(ref)) for m in pool["messages"]
        ]
        included = [e.n_label_tokens > 0 for e in encoded]
        candidates = pool.select("candidate_id", "source").with_columns(
            pl.Series("n_tokens", [len(e.input_ids) for e in encoded]),
            pl.Series("n_label_tokens", [e.n_label_tokens for e in encoded]),
            pl.Series("truncated", [e.truncated for e in encoded]),
            pl.Series("included", included),
            pl.Series(
                "exclude_reason",
                [None if ok else f"no completion tokens within max_length={ref['max_length']}" for ok in included],
                dtype=pl.Utf8,
            ),
        )
        return cls(tokenizer, encoded, [i for i, ok in enumerate(included) if ok], candidates, version)

    @property
    def kept(self) -> list:
        return [self.encoded[i] for i in self.keep]


def basis_fingerprints(bases: dict) -> dict[str, dict[str, str]]:
    """{target: {checkpoint: fingerprint}} of the current bases: what GIST features are made from."""
    return {t: {c: v["fingerprint"] for c, v in per.items()} for t, per in bases["targets"].items()}


def gist_shard_state(storage: ArtifactStore, shards: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(shards without features, shards whose features were made from other shard contents or another basis,
    {current shard: features version})."""
    pool_shards = storage.pool_record()["shards"]
    want = basis_fingerprints(storage.read_basis_manifest())
    missing, stale, versions = [], [], {}
    for shard in shards:
        meta = storage.shard_features_meta("gist", shard)
        if meta is None:
            missing.append(shard)
        elif meta.get("fingerprints") != want or meta.get("shard_version") != pool_shards.get(shard):
            stale.append(shard)
        else:
            versions[shard] = meta["version"]
    return missing, stale, versions


def current_feature_shards(storage: ArtifactStore, shards: list[str]) -> dict[str, str]:
    """{shard: features version} when every shard's GIST features are current, else an error naming the others."""
    missing, stale, versions = gist_shard_state(storage, shards)
    if missing or stale:
        raise ValueError(
            f"candidate_features is missing for shards {missing} and stale (computed from other shard contents "
            f"or another basis) for {stale}; materialize those partitions of candidate_features first"
        )
    return versions


def compute_gist_shard(storage: ArtifactStore, compute: ComputeResource, shard: str, log) -> tuple[str, dict]:
    """One shard's GIST features (shared by the partitioned asset and the parallel fan-out job).

    Returns (data version, metadata).
    """
    ref, bases = storage.read_model_ref(), storage.read_basis_manifest()
    shard_in = ShardInput.load(storage, compute, ref, shard)
    targets = sorted(bases["targets"])
    tensors, timings = {}, {}
    for ckpt in [c["name"] for c in bases["checkpoints"]]:
        model = compute.load_model(storage.model_path(ref), storage.checkpoint_dir(ckpt))
        V, slices = storage.bases_side_by_side(ckpt, targets)
        z, norms, losses, stats = projected_gradients(
            model,
            shard_in.kept,
            torch.from_numpy(V),
            pad_id=shard_in.tokenizer.pad_token_id,
            progress=progress_logger(log, f"{shard}/{ckpt}"),
            **compute.batching(),
        )
        for name, (a, b) in slices.items():
            tensors[f"{ckpt}/{name}"] = np.ascontiguousarray(z[:, a:b])
        tensors[f"{ckpt}/grad_norm"] = norms
        tensors[f"{ckpt}/loss"] = losses
        timings[ckpt] = stats.timing()
        del model
    version = fingerprint(
        "candidate_features", FEATURES_CODE_VERSION, None, shard_in.version, bases["version"], ref["version"]
    )
    meta = {
        "version": version,
        "shard_version": shard_in.version,
        "basis_version": bases["version"],
        "fingerprints": basis_fingerprints(bases),
        "checkpoints": [c["name"] for c in bases["checkpoints"]],
        "timings": timings,
    }
    storage.write_shard_features("gist", shard, tensors, shard_in.candidates, meta)
    n_excluded = len(shard_in.encoded) - len(shard_in.keep)
    if n_excluded:
        log.warning(
            f"{n_excluded} candidates in {shard} have no completion tokens within "
            f"max_length={ref['max_length']}; they are excluded from scoring"
        )
    candidates = shard_in.candidates
    return version, {
        "candidates": len(shard_in.encoded),
        "scored": len(shard_in.keep),
        "excluded_no_completion": n_excluded,
        "truncated": int(candidates["truncated"].sum()),
        "tokens": int(candidates["n_tokens"].sum()),
        "timings": dg.MetadataValue.json(timings),
        "padding_share": max((t["padding_share"] for t in timings.values()), default=0.0),
        "bytes_per_candidate": round(sum(t.nbytes for t in tensors.values()) / max(1, len(shard_in.keep)), 1),
        "device": str(compute.torch_device()),
        "path": dg.MetadataValue.path(str(storage.features_location("gist", shard))),
    }


@shard_features_asset(
    group_name="gist",
    deps=[candidate_pool, spectral_basis, base_model],
    code_version=FEATURES_CODE_VERSION,
)
def candidate_features(
    context: dg.AssetExecutionContext, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """One shard's candidate gradients projected onto every target's basis, in one pass per checkpoint."""
    version, metadata = compute_gist_shard(storage, compute, context.partition_key, context.log)
    return dg.MaterializeResult(data_version=data_version(version), metadata=metadata)
