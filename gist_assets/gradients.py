"""target_gradients, spectral_basis, candidate_features: the gradient side of GIST."""

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import torch

from gist_core.data import encode_messages, encode_prompt_completion
from gist_core.gradients import full_gradients, projected_gradients, trainable_linears
from gist_core.spectral import build_basis
from gist_resources import ComputeResource, StorageResource
from gist_resources.storage import ArtifactError

from .config import SpectralBasisConfig, TargetGradientsConfig
from .model import GPU_STEP_TAGS, base_model, chat_format, read_model_ref, read_warmup, warmup_checkpoint
from .partitions import candidate_shards
from .paths import checkpoint_dir, model_path, relative_checkpoints
from .plots import md_table, spectrum_plot
from .pool import candidate_pool, pool_path, read_pool_version, target_sets, targets_path
from .versions import asset_fingerprint, data_version, fingerprint

GRADIENT_RETRY = dg.RetryPolicy(max_retries=2, delay=5)
# Concurrency pool of the gradient steps: set its limit to the number of GPUs
# (`dagster instance concurrency set gpu N`, or dagster.yaml), so at most N run at once.
GPU_POOL = "gpu"
# On Kubernetes (k8s_job_executor) each gradient step's pod asks for one GPU.


def progress_logger(log, what: str, every_s: float = 10.0):
    """A gradient_pass progress callback that logs counts and rates at most every ``every_s``."""
    last = [0.0]

    def report(done: int, total: int, stats) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            log.info(
                f"{what}: {done}/{total} examples, {stats.examples_per_s:.1f} ex/s, {stats.tokens_per_s:.0f} tok/s"
            )

    return report


def recipe_epochs(config: TargetGradientsConfig, saved: list[int]) -> list[int]:
    """The warmup epochs GIST selects with: ``checkpoints`` if given, else the recipe's.

    candidate_scores weights the checkpoints by their average learning rate, normalized, so one
    checkpoint (gist_paper) has weight 1 and several (less_style) get LESS's weights.
    """
    wanted = list(config.checkpoints) or (saved[-1:] if config.recipe == "gist_paper" else saved)
    missing = [e for e in wanted if e not in saved]
    if missing:
        raise ValueError(f"target_gradients.checkpoints {missing} do not exist; the warmup saved epochs {saved}")
    if config.recipe == "gist_paper" and len(wanted) != 1:
        raise ValueError(
            f"target_gradients: recipe gist_paper selects with one checkpoint, got checkpoints "
            f"{wanted}; give one epoch, or use recipe less_style for several"
        )
    return wanted


@dg.asset(
    group_name="gist",
    deps=[warmup_checkpoint, target_sets],
    code_version="2",
    retry_policy=GRADIENT_RETRY,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "numpy"},
)
def target_gradients(
    context: dg.AssetExecutionContext, config: TargetGradientsConfig, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Exact LoRA gradient of every basis-split target example, per checkpoint: N x D .npy memmaps."""
    ref, warm = read_model_ref(storage), read_warmup(storage)
    available = {c["epoch"]: c for c in warm["checkpoints"]}
    checkpoints = [available[e] for e in recipe_epochs(config, sorted(available))]
    df = storage.read_parquet(targets_path(storage), "target_sets").filter(pl.col("split") == "basis")
    tokenizer = compute.load_tokenizer(model_path(storage, ref))
    dest = storage.path("target_gradients")
    version = asset_fingerprint(context, warm["version"], read_targets_version(storage), ref["version"])
    manifest = {
        "version": version,
        "checkpoints": relative_checkpoints(storage, checkpoints),
        "targets": {},
        "max_length": ref["max_length"],
    }
    excluded_rows = []
    with storage.atomic_dir(dest) as tmp:
        per_target = {}
        for name in sorted(df["target"].unique().to_list()):
            rows = df.filter(pl.col("target") == name).sort("example_id")
            enc = [
                encode_prompt_completion(tokenizer, p, c, ref["max_length"], chat_format(ref))
                for p, c in zip(rows["prompt"], rows["completion"], strict=False)
            ]
            keep = [i for i, e in enumerate(enc) if e.n_label_tokens > 0]
            for i in sorted(set(range(len(enc))) - set(keep)):
                excluded_rows.append(
                    {
                        "target": name,
                        "example_id": rows["example_id"][i],
                        "reason": f"no completion tokens within max_length={ref['max_length']}",
                    }
                )
            if not keep:
                raise ValueError(
                    f"target {name!r}: no example has completion tokens within max_length="
                    f"{ref['max_length']}; raise base_model max_length"
                )
            per_target[name] = (rows[keep], [enc[i] for i in keep])
        for ckpt in checkpoints:
            model = compute.load_model(model_path(storage, ref), checkpoint_dir(storage, ckpt))
            layout, _ = trainable_linears(model)
            (tmp / ckpt["name"]).mkdir()
            for name, (rows, enc) in per_target.items():
                out = np.lib.format.open_memmap(
                    tmp / ckpt["name"] / f"{name}.npy", mode="w+", dtype=np.float32, shape=(len(enc), layout.dim)
                )
                _, losses = full_gradients(
                    model,
                    enc,
                    out=out,
                    pad_id=tokenizer.pad_token_id,
                    progress=progress_logger(context.log, f"{ckpt['name']}/{name}"),
                    **compute.batching(),
                )
                out.flush()
                del out
                pl.DataFrame(
                    {
                        "example_id": rows["example_id"],
                        "subtask": rows["subtask"],
                        "loss": losses,
                        "n_label_tokens": [e.n_label_tokens for e in enc],
                    }
                ).write_parquet(tmp / ckpt["name"] / f"{name}.parquet")
                manifest["targets"][name] = {"n": len(enc), "subtasks": sorted(set(rows["subtask"]))}
            manifest["dim"] = layout.dim
            manifest["layout"] = layout.describe()
            del model
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "recipe": config.recipe,
            "checkpoints": dg.MetadataValue.json([c["name"] for c in checkpoints]),
            "gradient_dim": manifest["dim"],
            "examples_per_target": dg.MetadataValue.json({k: v["n"] for k, v in manifest["targets"].items()}),
            "excluded_examples": dg.MetadataValue.md(md_table(excluded_rows)),
            "bytes_on_disk": sum(p.stat().st_size for p in dest.rglob("*.npy")),  # the target gradients G, all of them
            "bytes_per_example_and_checkpoint": 4 * manifest["dim"],
            "path": dg.MetadataValue.path(str(dest)),
        },
    )


def read_targets_version(storage: StorageResource) -> str:
    return storage.read_json(storage.path("targets", "version.json"), "target_sets")["version"]


def read_basis_manifest(storage: StorageResource) -> dict:
    return storage.read_json(storage.path("basis", "manifest.json"), "spectral_basis")


@dg.asset(
    group_name="gist",
    deps=[target_gradients],
    code_version="2",
    kinds={"numpy"},
    automation_condition=dg.AutomationCondition.eager(),
)
def spectral_basis(
    context: dg.AssetExecutionContext, config: SpectralBasisConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Per checkpoint and target: V_k (D x k), singular values, target coordinates Z = U_k diag(s_k)."""
    if (config.k is None) == (config.energy is None):
        raise ValueError("spectral_basis: set exactly one of k or energy (set the other to null)")
    grads = storage.read_json(storage.path("target_gradients", "manifest.json"), "target_gradients")
    dest = storage.path("basis")
    manifest = {
        "version": asset_fingerprint(context, grads["version"]),
        "checkpoints": relative_checkpoints(storage, grads["checkpoints"]),
        "targets": {},
        "dim": grads["dim"],
        "config": config.model_dump(),
    }
    spectra, ks, summary = {}, {}, []
    with storage.atomic_dir(dest) as tmp:
        for ckpt in grads["checkpoints"]:
            for name in sorted(grads["targets"]):
                G = storage.open_npy(storage.path("target_gradients", ckpt["name"], f"{name}.npy"), "target_gradients")
                labels = storage.read_parquet(
                    storage.path("target_gradients", ckpt["name"], f"{name}.parquet"), "target_gradients"
                )
                out_dir = tmp / ckpt["name"] / name
                out_dir.mkdir(parents=True)
                basis, notes = build_basis(
                    G,
                    k=config.k,
                    energy=config.energy,
                    eps=config.eps,
                    budget_bytes=config.memory_budget_mb << 20,
                    out=out_dir / "V.npy",
                )
                for note in notes:
                    context.log.warning(f"{ckpt['name']}/{name}: {note}")
                if config.energy is not None:
                    context.log.info(
                        f"{ckpt['name']}/{name}: energy {config.energy:g} chose k={basis.k} "
                        f"(keeps {basis.energy_kept:.4f} of sum s^2)"
                    )
                np.save(out_dir / "Z.npy", basis.Z, allow_pickle=False)
                fingerprint = hashlib.sha256(
                    basis.s.tobytes() + basis.Z.tobytes() + json.dumps(manifest["config"], sort_keys=True).encode()
                ).hexdigest()[:16]
                meta = {
                    "k": basis.k,
                    "energy_kept": basis.energy_kept,
                    "singular_values": basis.s.tolist(),
                    "subtasks": labels["subtask"].to_list(),
                    "example_ids": labels["example_id"].to_list(),
                    "fingerprint": fingerprint,
                    "notes": notes,
                }
                (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
                manifest["targets"].setdefault(name, {})[ckpt["name"]] = {"k": basis.k, "fingerprint": fingerprint}
                spectra[f"{ckpt['name']}/{name}"] = basis.s
                ks[f"{ckpt['name']}/{name}"] = basis.k
                summary.append(
                    {
                        "checkpoint": ckpt["name"],
                        "target": name,
                        "N": G.shape[0],
                        "k": basis.k,
                        "energy_kept": round(basis.energy_kept, 4),
                    }
                )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dg.MaterializeResult(
        data_version=data_version(manifest["version"]),
        metadata={
            "bases": dg.MetadataValue.md(md_table(summary, limit=100)),
            "k": dg.MetadataValue.json({k: v for k, v in ks.items()}),
            "rank_rule": f"energy {config.energy:g}" if config.energy is not None else f"fixed k={config.k}",
            "spectrum": spectrum_plot(spectra, ks),
            "path": dg.MetadataValue.path(str(dest)),
        },
    )


def load_bases(storage: StorageResource, ckpt_name: str, targets: list[str]):
    """V of every target for one checkpoint, side by side (D x sum k), with the column slices."""
    blocks, slices, start = [], {}, 0
    for name in targets:
        V = storage.open_npy(storage.path("basis", ckpt_name, name, "V.npy"), "spectral_basis")
        blocks.append(np.asarray(V))
        slices[name] = (start, start + V.shape[1])
        start += V.shape[1]
    return torch.from_numpy(np.concatenate(blocks, axis=1)), slices


def features_dir(storage: StorageResource, shard: str, method: str = "gist"):
    """GIST features under features/<shard>; each baseline under features_<method>/<shard>."""
    return storage.path("features" if method == "gist" else f"features_{method}", shard)


@dataclass
class ShardInput:
    """One shard's candidates, tokenized; ``keep`` are those with completion tokens."""

    tokenizer: Any  # a Hugging Face tokenizer
    encoded: list
    keep: list[int]
    side: pl.DataFrame  # per candidate: id, source, token counts, included, exclude_reason
    version: str  # the shard's content hash from candidate_pool

    @classmethod
    def load(cls, storage: StorageResource, compute: ComputeResource, ref: dict, shard: str) -> "ShardInput":
        pool = (
            storage.read_parquet(pool_path(storage), "candidate_pool")
            .filter(pl.col("shard") == shard)
            .select("candidate_id", "source", "messages")
        )
        if pool.height == 0:
            raise ArtifactError(
                f"shard {shard!r} has no candidates in the current pool; re-materialize "
                "candidate_pool (it removes shards of deleted files)"
            )
        tokenizer = compute.load_tokenizer(model_path(storage, ref))
        encoded = [
            encode_messages(tokenizer, json.loads(m), ref["max_length"], chat_format(ref)) for m in pool["messages"]
        ]
        included = [e.n_label_tokens > 0 for e in encoded]
        side = pool.select("candidate_id", "source").with_columns(
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
        version = read_pool_version(storage)["shards"].get(shard)
        if version is None:
            raise ArtifactError(f"shard {shard!r} is not in pool/shards.json; re-materialize candidate_pool")
        return cls(tokenizer, encoded, [i for i, ok in enumerate(included) if ok], side, version)

    def write(self, storage: StorageResource, shard: str, method: str, tensors: dict, meta: dict) -> None:
        """features.safetensors + candidates.parquet + meta.json, swapped in together."""
        from safetensors.numpy import save_file

        with storage.atomic_dir(features_dir(storage, shard, method)) as tmp:
            save_file(tensors, str(tmp / "features.safetensors"))
            self.side.write_parquet(tmp / "candidates.parquet")
            (tmp / "meta.json").write_text(json.dumps({"shard": shard, **meta}, indent=2))


FEATURES_CODE_VERSION = "2"


def stale_gist_shards(storage: StorageResource, shards: list[str]) -> tuple[list[str], dict[str, str], str]:
    """Shards whose features are missing or were made from other shard contents or another basis.

    Returns (stale shards, {fresh shard: features version}, current basis version).
    """
    pool, basis_version = read_pool_version(storage), read_basis_manifest(storage)["version"]
    stale, versions = [], {}
    for shard in shards:
        meta_path = features_dir(storage, shard) / "meta.json"
        meta = storage.read_json(meta_path, "candidate_features", partition=shard) if meta_path.exists() else {}
        if meta.get("shard_version") != pool["shards"].get(shard) or meta.get("basis_version") != basis_version:
            stale.append(shard)
        else:
            versions[shard] = meta["version"]
    return stale, versions, basis_version


def compute_gist_shard(storage: StorageResource, compute: ComputeResource, shard: str, log) -> tuple[str, dict]:
    """One shard's GIST features (shared by the partitioned asset and the parallel fan-out job).

    Returns (data version, metadata).
    """
    ref, bases = read_model_ref(storage), read_basis_manifest(storage)
    shard_in = ShardInput.load(storage, compute, ref, shard)
    encoded, keep, tokenizer = shard_in.encoded, shard_in.keep, shard_in.tokenizer
    targets = sorted(bases["targets"])
    tensors, timings = {}, {}
    for ckpt in bases["checkpoints"]:
        model = compute.load_model(model_path(storage, ref), checkpoint_dir(storage, ckpt))
        V, slices = load_bases(storage, ckpt["name"], targets)
        z, norms, losses, stats = projected_gradients(
            model,
            [encoded[i] for i in keep],
            V,
            pad_id=tokenizer.pad_token_id,
            progress=progress_logger(log, f"{shard}/{ckpt['name']}"),
            **compute.batching(),
        )
        for name, (a, b) in slices.items():
            tensors[f"{ckpt['name']}/{name}"] = np.ascontiguousarray(z[:, a:b])
        tensors[f"{ckpt['name']}/grad_norm"] = norms
        tensors[f"{ckpt['name']}/loss"] = losses
        timings[ckpt["name"]] = stats.timing()
        del model
    side = shard_in.side
    fingerprints = {t: {c: v["fingerprint"] for c, v in per.items()} for t, per in bases["targets"].items()}
    version = fingerprint(
        "candidate_features", FEATURES_CODE_VERSION, None, shard_in.version, bases["version"], ref["version"]
    )
    shard_in.write(
        storage,
        shard,
        "gist",
        tensors,
        {
            "version": version,
            "shard_version": shard_in.version,
            "basis_version": bases["version"],
            "fingerprints": fingerprints,
            "checkpoints": [c["name"] for c in bases["checkpoints"]],
            "timings": timings,
        },
    )
    n_excluded = len(encoded) - len(keep)
    if n_excluded:
        log.warning(
            f"{n_excluded} candidates in {shard} have no completion tokens within "
            f"max_length={ref['max_length']}; they are excluded from scoring"
        )
    return version, {
        "candidates": len(encoded),
        "scored": len(keep),
        "excluded_no_completion": n_excluded,
        "truncated": int(side["truncated"].sum()),
        "tokens": int(side["n_tokens"].sum()),
        "timings": dg.MetadataValue.json(timings),
        "padding_share": max((t["padding_share"] for t in timings.values()), default=0.0),
        "bytes_per_candidate": round(sum(t.nbytes for t in tensors.values()) / max(1, len(keep)), 1),
        "device": str(compute.torch_device()),
        "path": dg.MetadataValue.path(str(features_dir(storage, shard))),
    }


@dg.asset(
    group_name="gist",
    deps=[candidate_pool, spectral_basis, base_model],
    partitions_def=candidate_shards,
    code_version=FEATURES_CODE_VERSION,
    retry_policy=GRADIENT_RETRY,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "safetensors"},
)
def candidate_features(
    context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """One shard's candidate gradients projected onto every target's basis, in one pass per checkpoint."""
    version, metadata = compute_gist_shard(storage, compute, context.partition_key, context.log)
    return dg.MaterializeResult(data_version=data_version(version), metadata=metadata)
