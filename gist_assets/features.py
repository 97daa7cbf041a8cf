"""The pass over the pool: one shard's candidate gradients, projected onto every target's basis
(``candidate_features``, exact GIST) and sketched for later targets (``candidate_sketches``), both from one
backward per checkpoint when both are due; and what every shard-partitioned feature asset shares (a shard's
candidates, tokenized; which shards are current)."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import torch

from gist_core.data import encode_messages
from gist_core.gradients import GradientLayout, SideBySide, basis_projection, block_features, trainable_linears
from gist_core.projection import pack_rows, sketch_projector
from gist_resources import ArtifactStore, ComputeResource
from gist_resources.files import ArtifactError

from .basis import spectral_basis
from .config import CandidateSketchesConfig
from .inputs import candidate_pool
from .model import base_model, chat_format, warmup_checkpoint
from .sketches import KIND as SKETCH_KIND
from .sketches import SKETCHES_CODE_VERSION, sketch_version
from .steps import SHARD_KINDS, SHARD_PASS, progress_logger
from .versions import data_version, fingerprint

FEATURES_CODE_VERSION = "2"
FEATURES = dg.AssetKey("candidate_features")
SKETCHES = dg.AssetKey("candidate_sketches")


@dataclass
class ShardInput:
    """One shard's candidates, tokenized; ``keep`` are those with completion tokens."""

    tokenizer: Any  # a Hugging Face tokenizer
    encoded: list
    keep: list[int]
    candidates: pl.DataFrame  # per candidate: id, source, token counts, included, exclude_reason
    version: str  # the shard's content hash from candidate_pool
    shard: str

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
        return cls(tokenizer, encoded, [i for i, ok in enumerate(included) if ok], candidates, version, shard)

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


class ShardPass:
    """What one shard's pass computes at each checkpoint: exact features onto the targets' bases, sketches, or
    both from the same backward."""

    def __init__(self, storage: ArtifactStore, ref: dict, features: bool, sketch: CandidateSketchesConfig | None):
        self.ref = ref
        self.bases = storage.read_basis_manifest() if features else None
        self.warmup = storage.read_warmup() if sketch is not None else None
        self.sketch = sketch
        basis_ckpts = [c["name"] for c in self.bases["checkpoints"]] if self.bases else []
        sketch_ckpts = [c["name"] for c in self.warmup["checkpoints"]] if self.warmup else []
        self.basis_checkpoints, self.sketch_checkpoints = basis_ckpts, sketch_ckpts
        self.checkpoints = list(dict.fromkeys(sketch_ckpts + basis_ckpts))  # warmup order
        self.targets = sorted(self.bases["targets"]) if self.bases else []
        self.tensors: dict[str, dict[str, np.ndarray]] = {"features": {}, "sketches": {}}
        self.timings: dict[str, dict] = {"features": {}, "sketches": {}}
        self.layout: GradientLayout | None = None

    def run(self, storage: ArtifactStore, compute: ComputeResource, shard_in: ShardInput, ckpt: str, log) -> None:
        model = compute.load_model(storage.model_path(self.ref), storage.checkpoint_dir(ckpt))
        layout, modules = trainable_linears(model)
        self.layout = layout
        device = compute.torch_device()
        parts: dict[str, tuple] = {}
        slices: dict[str, tuple[int, int]] = {}
        if ckpt in self.basis_checkpoints:
            V, slices = storage.bases_side_by_side(ckpt, self.targets)
            parts["features"] = (basis_projection(layout, torch.from_numpy(V), device), V.shape[1])
        if self.sketch is not None and ckpt in self.sketch_checkpoints:
            projector = sketch_projector(layout, self.sketch.dim, self.sketch.seed, self.sketch.projection, device)
            parts["sketches"] = (projector.add_block, self.sketch.dim)
        together = SideBySide(list(parts.values()))
        values, norms, losses, stats = block_features(
            model,
            shard_in.kept,
            together.add_block,
            together.width,
            linears=(layout, modules),
            pad_id=shard_in.tokenizer.pad_token_id,
            progress=progress_logger(log, f"{' + '.join(parts)} {shard_in.shard}/{ckpt}"),
            **compute.batching(),
        )
        projection_seconds = dict(zip(parts, together.part_seconds(), strict=True))
        for part, cols in zip(parts, together.columns, strict=True):
            tensors = self.tensors[part]
            if part == "features":
                for name, (a, b) in slices.items():
                    tensors[f"{ckpt}/{name}"] = np.ascontiguousarray(values[:, cols.start + a : cols.start + b])
            else:  # half the bytes of float32 (pack_rows)
                tensors[ckpt], tensors[f"{ckpt}/scale"] = pack_rows(np.ascontiguousarray(values[:, cols]))
            tensors[f"{ckpt}/grad_norm"] = norms
            tensors[f"{ckpt}/loss"] = losses
            # What this asset's pass costs: the shared pass less the other parts' projections (the seconds an
            # asset records are what the evaluation reports as its feature-pass cost).
            others = sum(t for p, t in projection_seconds.items() if p != part)
            self.timings[part][ckpt] = {
                **stats.timing(),
                "seconds": stats.seconds - others,
                "pass_seconds": stats.seconds,
                "projection_seconds": projection_seconds[part],
                "pass_shared_with": [p for p in parts if p != part],
            }


def compute_shard(
    storage: ArtifactStore,
    compute: ComputeResource,
    shard: str,
    log,
    features: bool = True,
    sketch: CandidateSketchesConfig | None = None,
) -> Iterator[tuple[dg.AssetKey, str, dict]]:
    """One shard's pass: its exact GIST features (``features``) and/or its sketches (``sketch``: the
    projection), from one backward per checkpoint. Writes each asset's files, then yields (asset key, data
    version, metadata) for it; shared by the partitioned assets and the parallel fan-out job."""
    ref = storage.read_model_ref()
    shard_in = ShardInput.load(storage, compute, ref, shard)
    todo = ShardPass(storage, ref, features, sketch)
    for ckpt in todo.checkpoints:
        todo.run(storage, compute, shard_in, ckpt, log)
    n_excluded = len(shard_in.encoded) - len(shard_in.keep)
    if n_excluded:
        log.warning(
            f"{n_excluded} candidates in {shard} have no completion tokens within "
            f"max_length={ref['max_length']}; they are excluded from scoring"
        )
    common = {"scored": len(shard_in.keep), "device": str(compute.torch_device())}
    if todo.bases is not None:
        yield FEATURES, *_write_features(storage, shard_in, todo, common)
    if todo.sketch is not None:
        yield SKETCHES, *_write_sketches(storage, shard_in, todo, common)


def _write_features(storage: ArtifactStore, shard_in: ShardInput, todo: ShardPass, common: dict):
    bases, tensors, timings = todo.bases, todo.tensors["features"], todo.timings["features"]
    assert bases is not None
    version = fingerprint(
        "candidate_features", FEATURES_CODE_VERSION, None, shard_in.version, bases["version"], todo.ref["version"]
    )
    meta = {
        "version": version,
        "shard_version": shard_in.version,
        "basis_version": bases["version"],
        "fingerprints": basis_fingerprints(bases),
        "checkpoints": todo.basis_checkpoints,
        "timings": timings,
    }
    storage.write_shard_features("gist", shard_in.shard, tensors, shard_in.candidates, meta)
    candidates = shard_in.candidates
    return version, {
        **common,
        "candidates": len(shard_in.encoded),
        "excluded_no_completion": len(shard_in.encoded) - len(shard_in.keep),
        "truncated": int(candidates["truncated"].sum()),
        "tokens": int(candidates["n_tokens"].sum()),
        "timings": dg.MetadataValue.json(timings),
        "padding_share": max((t["padding_share"] for t in timings.values()), default=0.0),
        "bytes_per_candidate": round(sum(t.nbytes for t in tensors.values()) / max(1, len(shard_in.keep)), 1),
        "path": dg.MetadataValue.path(str(storage.features_location("gist", shard_in.shard))),
    }


def _write_sketches(storage: ArtifactStore, shard_in: ShardInput, todo: ShardPass, common: dict):
    sketch, warm, tensors, timings = todo.sketch, todo.warmup, todo.tensors["sketches"], todo.timings["sketches"]
    assert sketch is not None and warm is not None and todo.layout is not None  # a warmup has >= 1 checkpoint
    projection = {"dim": sketch.dim, "kind": sketch.projection, "seed": sketch.seed}
    version = sketch_version(sketch, shard_in.version, warm["version"], todo.ref["version"])
    meta = {
        "version": version,
        "shard_version": shard_in.version,
        "warmup_version": warm["version"],
        "projection": projection,
        "layout": todo.layout.describe(),
        "checkpoints": todo.sketch_checkpoints,
        "timings": timings,
    }
    storage.write_shard_features(SKETCH_KIND, shard_in.shard, tensors, shard_in.candidates, meta)
    n_sketch = sum(tensors[c].nbytes + tensors[f"{c}/scale"].nbytes for c in todo.sketch_checkpoints)
    return version, {
        **common,
        "projection": dg.MetadataValue.json(projection),
        "checkpoints": dg.MetadataValue.json(todo.sketch_checkpoints),
        "timings": dg.MetadataValue.json(timings),
        "sketch_bytes_per_candidate": round(n_sketch / max(1, len(shard_in.keep)), 1),
        "path": dg.MetadataValue.path(str(storage.features_location(SKETCH_KIND, shard_in.shard))),
    }


@dg.multi_asset(
    name="candidate_gradient_pass",
    specs=[
        dg.AssetSpec(
            FEATURES,
            deps=[candidate_pool, spectral_basis, base_model],
            code_version=FEATURES_CODE_VERSION,
            group_name="gist",
            kinds=SHARD_KINDS,
            description="One shard's candidate gradients projected onto every target's basis (exact GIST "
            "coordinates z), one pass per checkpoint for all targets",
        ),
        dg.AssetSpec(
            SKETCHES,
            deps=[candidate_pool, warmup_checkpoint, base_model],
            code_version=SKETCHES_CODE_VERSION,
            group_name="gist",
            kinds=SHARD_KINDS,
            description="One shard's target-independent gradient sketches g P (d per warmup checkpoint), "
            "for `gist_sketch`: later targets are scored without a pass over the pool",
        ),
    ],
    can_subset=True,
    **SHARD_PASS,
)
def candidate_gradient_pass(
    context: dg.AssetExecutionContext,
    config: CandidateSketchesConfig,
    storage: ArtifactStore,
    compute: ComputeResource,
) -> Iterator[dg.MaterializeResult]:
    """One shard's gradient pass: the selected assets of the two from one backward per checkpoint (the config
    is the sketches' projection)."""
    selected = context.selected_asset_keys
    sketch = config if SKETCHES in selected else None
    for key, version, metadata in compute_shard(
        storage, compute, context.partition_key, context.log, FEATURES in selected, sketch
    ):
        yield dg.MaterializeResult(asset_key=key, data_version=data_version(version), metadata=metadata)
