"""spectral_basis: per checkpoint and target, the truncated SVD of the target gradients."""

import hashlib
import json

import dagster as dg

from gist_core.spectral import build_basis
from gist_resources import ArtifactStore

from .config import SpectralBasisConfig
from .plots import md_table, spectrum_plot
from .target_gradients import target_gradients
from .versions import asset_fingerprint, data_version


def basis_fingerprint(s, Z, config: dict) -> str:
    """What a basis is, for the candidate features made from it: its spectrum, coordinates and config."""
    return hashlib.sha256(s.tobytes() + Z.tobytes() + json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dg.asset(
    group_name="gist",
    deps=[target_gradients],
    code_version="3",
    kinds={"numpy"},
    automation_condition=dg.AutomationCondition.eager(),
)
def spectral_basis(
    context: dg.AssetExecutionContext, config: SpectralBasisConfig, storage: ArtifactStore
) -> dg.MaterializeResult:
    """Per checkpoint and target: V_k (D x k), singular values, target coordinates Z = U_k diag(s_k)."""
    if (config.k is None) == (config.energy is None):
        raise ValueError("spectral_basis: set exactly one of k or energy (set the other to null)")
    grads = storage.read_target_gradients_manifest()
    manifest: dict = {
        "version": asset_fingerprint(context, grads["version"]),
        "checkpoints": storage.checkpoint_entries(grads["checkpoints"]),
        "targets": {},
        "dim": grads["dim"],
        "config": config.model_dump(),
    }
    spectra, ks, summary = {}, {}, []
    with storage.basis_writer() as writer:
        for ckpt in [c["name"] for c in grads["checkpoints"]]:
            for name in sorted(grads["targets"]):
                G = storage.target_gradients(ckpt, name)
                labels = storage.target_labels(ckpt, name)
                basis, notes = build_basis(
                    G,
                    k=config.k,
                    energy=config.energy,
                    eps=config.eps,
                    budget_bytes=config.memory_budget_mb << 20,
                    out=writer.vectors_file(ckpt, name),
                )
                for note in notes:
                    context.log.warning(f"{ckpt}/{name}: {note}")
                if config.energy is not None:
                    context.log.info(
                        f"{ckpt}/{name}: energy {config.energy:g} chose k={basis.k} "
                        f"(keeps {basis.energy_kept:.4f} of sum s^2)"
                    )
                fingerprint = basis_fingerprint(basis.s, basis.Z, manifest["config"])
                writer.write(
                    ckpt,
                    name,
                    basis.Z,
                    {
                        "k": basis.k,
                        "energy_kept": basis.energy_kept,
                        "singular_values": basis.s.tolist(),
                        "subtasks": labels["subtask"].to_list(),
                        "example_ids": labels["example_id"].to_list(),
                        "fingerprint": fingerprint,
                        "notes": notes,
                    },
                )
                manifest["targets"].setdefault(name, {})[ckpt] = {"k": basis.k, "fingerprint": fingerprint}
                spectra[f"{ckpt}/{name}"] = basis.s
                ks[f"{ckpt}/{name}"] = basis.k
                summary.append(
                    {
                        "checkpoint": ckpt,
                        "target": name,
                        "N": G.shape[0],
                        "k": basis.k,
                        "energy_kept": round(basis.energy_kept, 4),
                    }
                )
        writer.finish(manifest)
    return dg.MaterializeResult(
        data_version=data_version(manifest["version"]),
        metadata={
            "bases": dg.MetadataValue.md(md_table(summary, limit=100)),
            "k": dg.MetadataValue.json(ks),
            "rank_rule": f"energy {config.energy:g}" if config.energy is not None else f"fixed k={config.k}",
            "spectrum": spectrum_plot(spectra, ks),
            "path": dg.MetadataValue.path(str(storage.basis_dir())),
        },
    )
