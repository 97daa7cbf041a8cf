"""The artifact store: every file the pipeline keeps, under one storage root, by what it is.

Each artifact has its methods here: where it lives, how it is written (atomically: nothing
half-written is ever visible) and how it is read (a missing or damaged file fails naming the file
and the asset that rebuilds it). Assets ask for a pool, a basis or a shard's features and never
build a path or open a file. Paths written into manifests are relative to the root, so a root
that is copied or restored reads its own files.

Layout under the root (docs/design.md has the table with the assets that write each):

    pool/                candidate_pool.parquet, shards.json
    targets/             target_sets.parquet, version.json
    embedded/            the embedded default's pool and target files
    models/              model_ref.json, base_model/ (embedded), <preset>/ (converted presets)
    warmup/              epoch_N/ (PEFT adapter, Adam moments, info), manifest.json, pool_ids.parquet
    target_gradients/    <ckpt>/<target>.npy (N x D float32) and .parquet (labels), manifest.json
    basis/               <ckpt>/<target>/{V.npy, Z.npy, meta.json}, manifest.json
    features*/<shard>/   features.safetensors, candidates.parquet, meta.json (one folder per kind)
    scores/              <group>_version.json (what the scores were made from)
    selections/          <target>/<method>/<budget>/{selection.jsonl, selection.messages.jsonl,
                         selection.parquet, manifest.json}
    evaluation/          summary.parquet, heldout_loss_by_budget.png
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from . import files
from .files import ArtifactError, SelectionFiles, default_storage_root, strict_json

# Shard features by kind: the folder under the root, and the asset that writes it.
FEATURE_FOLDERS = {
    "gist": "features",
    "gist_sketch": "features_gist_sketch",
    "less": "features_less",
    "representation": "features_representation",
}
FEATURE_ASSETS = {
    "gist": "candidate_features",
    "gist_sketch": "candidate_sketches",
    "less": "less_candidate_features",
    "representation": "representation_features",
}
SELECTION_FILES = {
    "jsonl": "selection.jsonl",
    "messages_jsonl": "selection.messages.jsonl",
    "parquet": "selection.parquet",
}
# Beside the embedded model's Hugging Face files: how its pretraining went.
EMBEDDED_BUILD_FACTS = "pretraining.json"
EMBEDDED_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", EMBEDDED_BUILD_FACTS)
ADAM_MOMENTS = "optimizer_state.safetensors"
CHECKPOINT_INFO = "checkpoint_info.json"


class EmbeddedBuild(Protocol):
    """A built embedded model: ``gist_demo.tiny_model.EmbeddedModel``."""

    model: Any
    tokenizer: Any

    @property
    def facts(self) -> dict: ...


class ArtifactStore(dg.ConfigurableResource):
    """Owns the storage root (default ``./.gist``, or ``$GIST_STORAGE_ROOT``) and everything in it
    except the score database, which ``ScoreStore`` owns."""

    root: str = Field(
        default="",
        description="Directory holding every artifact (models, tensors, Parquet, DuckDB); "
        "empty means $GIST_STORAGE_ROOT or ./.gist",
    )

    model_cache: str = Field(
        default="",
        description="Directory of embedded models already pretrained, reused by every storage root on this "
        "machine (a model is reused only when its settings, pretraining corpus and training code are the same); "
        "empty means $GIST_MODEL_CACHE or ~/.cache/gist-curation, 'off' pretrains every time",
    )

    # ------------------------------------------------------------------ places

    @property
    def root_path(self) -> Path:
        return Path(self.root or default_storage_root()).resolve()

    def _path(self, *parts: str) -> Path:
        return files.safe_join(self.root_path, *parts)

    def relative(self, p: str | Path) -> str:
        """``p`` as written into a manifest: relative to the root when under it, else as given."""
        try:
            return Path(p).resolve().relative_to(self.root_path).as_posix()
        except ValueError:
            return str(p)

    def _resolve(self, stored: str) -> Path:
        p = Path(stored)
        return p if p.is_absolute() else self._path(*p.parts)

    def embedded_data_dir(self) -> Path:
        """Where the embedded default's pool and target files are generated."""
        p = self._path("embedded")
        p.mkdir(parents=True, exist_ok=True)
        return p

    # ------------------------------------------------------------------ candidate pool

    def pool_file(self) -> Path:
        return self._path("pool", "candidate_pool.parquet")

    def write_pool(self, rows: pl.DataFrame, record: dict) -> None:
        """The pool's rows and its record ({"version", "shards": {key: content hash}, "files"}), swapped in
        together."""
        with files.atomic_dir(self._path("pool")) as tmp:
            rows.write_parquet(tmp / "candidate_pool.parquet")
            (tmp / "shards.json").write_text(strict_json(record))

    def read_pool(self, columns: list[str] | None = None, candidate_ids=None, shard: str | None = None) -> pl.DataFrame:
        """The pool's rows; only ``columns``, only ``candidate_ids`` and only one ``shard``, when given."""
        where = {"shard": shard} if shard is not None else None
        return files.read_parquet(
            self.pool_file(), "candidate_pool", columns=columns, candidate_ids=candidate_ids, where=where
        )

    def pool_record(self) -> dict:
        """{"version", "shards": {shard key: content hash}, "files": {path: [size, mtime]}}."""
        return files.read_json(self._path("pool", "shards.json"), "candidate_pool")

    def pool_source_counts(self) -> dict[str, int]:
        return files.count_parquet_values(self.pool_file(), "candidate_pool", "source")

    # ------------------------------------------------------------------ targets

    def targets_file(self) -> Path:
        return self._path("targets", "target_sets.parquet")

    def write_targets(self, examples: pl.DataFrame, version: str, file_signatures: dict) -> None:
        """The target examples and their record ({"version", "files": {path: [size, mtime]}} of the files read)."""
        with files.atomic_dir(self._path("targets")) as tmp:
            examples.write_parquet(tmp / "target_sets.parquet")
            (tmp / "version.json").write_text(strict_json({"version": version, "files": file_signatures}))

    def read_targets(self) -> pl.DataFrame:
        return files.read_parquet(self.targets_file(), "target_sets")

    def targets_record(self) -> dict:
        return files.read_json(self._path("targets", "version.json"), "target_sets")

    def targets_version(self) -> str:
        return self.targets_record()["version"]

    # ------------------------------------------------------------------ base model

    def preset_model_dir(self, name: str) -> Path:
        """Where a preset model is converted (models/<name>)."""
        return self._path("models", name)

    def model_cache_path(self) -> Path | None:
        """The embedded-model cache, or None when it is off."""
        where = self.model_cache or files.default_model_cache()
        return None if where == files.MODEL_CACHE_OFF else Path(where).expanduser().resolve()

    def embedded_model(self, key: str, build: Callable[[], EmbeddedBuild]) -> tuple[Path, dict, Path | None]:
        """The embedded model in models/base_model: copied from the cache entry ``key`` when there is one,
        else built by ``build()`` (and cached). Returns the model's directory, its build facts
        ({"key", "made", "pretrain_losses", "summary"}) and the cache entry used (None: the cache is off).
        Concurrent builds of one key on this machine wait for the first instead of repeating it."""
        dest = self._path("models", "base_model")
        cache = self.model_cache_path()
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError:
                cache = None  # e.g. a read-only home: build without the cache
        if cache is None:
            built = build()
            self.write_embedded_model(dest, built)
            return dest, built.facts, None
        entry = cache / f"embedded-{key}"
        with files.exclusive_lock(cache / f"embedded-{key}.lock"):
            hit = all((entry / name).is_file() for name in EMBEDDED_MODEL_FILES)
            if not hit:
                self.write_embedded_model(entry, build())
        with files.atomic_dir(dest) as tmp:
            shutil.copytree(entry, tmp, dirs_exist_ok=True)
        facts = json.loads((dest / EMBEDDED_BUILD_FACTS).read_text())
        return dest, {**facts, "made": f"{facts['made']}, copied from the cache" if hit else facts["made"]}, entry

    @staticmethod
    def write_embedded_model(dest: Path, built: EmbeddedBuild) -> None:
        """An embedded model as a Hugging Face directory with its build facts, swapped in whole."""
        with files.atomic_dir(dest) as tmp:
            built.model.save_pretrained(str(tmp))
            built.tokenizer.save_pretrained(str(tmp))
            (tmp / EMBEDDED_BUILD_FACTS).write_text(strict_json(built.facts))

    def write_model_ref(self, ref: dict) -> None:
        """What the base model is: {"path", "embedded", "preset", "max_length", "version", ...}; the path of
        a model under the root is stored relative to it."""
        under_root = ref.get("embedded") or ref.get("preset")
        path = self.relative(ref["path"]) if under_root else ref["path"]
        files.write_json(self._path("models", "model_ref.json"), {**ref, "path": path})

    def read_model_ref(self) -> dict:
        return files.read_json(self._path("models", "model_ref.json"), "base_model")

    def model_path(self, ref: dict) -> str:
        """The base model's directory (or a configured hub id), from its ref."""
        if ref.get("embedded"):
            return str(self._path("models", "base_model"))
        if ref.get("preset"):
            return str(self._resolve(ref["path"]))
        return ref["path"]

    # ------------------------------------------------------------------ warmup

    def warmup_dir(self) -> Path:
        return self._path("warmup")

    @contextmanager
    def warmup_writer(self) -> Iterator[WarmupWriter]:
        """A new warmup (its checkpoints, manifest and pool ids), swapped in when the block ends cleanly."""
        with files.atomic_dir(self.warmup_dir()) as tmp:
            yield WarmupWriter(self, tmp)

    def read_warmup(self) -> dict:
        return files.read_json(self._path("warmup", "manifest.json"), "warmup_checkpoint")

    def checkpoint_dir(self, name: str) -> str:
        """A warmup checkpoint's PEFT adapter directory (from the current root, whatever a manifest says)."""
        return str(self._path("warmup", name))

    def checkpoint_entries(self, checkpoints: list[dict]) -> list[dict]:
        """Checkpoint entries for a manifest, with their directories relative to the root."""
        return [{**c, "dir": self.relative(self.checkpoint_dir(c["name"]))} for c in checkpoints]

    def checkpoint_info(self, name: str) -> dict:
        return files.read_json(self._path("warmup", name, CHECKPOINT_INFO), "warmup_checkpoint")

    def adam_moments(self, name: str) -> dict[str, dict[str, Any]]:
        """{parameter name: {"exp_avg", "exp_avg_sq"} torch tensors} of a warmup checkpoint."""
        from safetensors.torch import load_file

        path = self._path("warmup", name, ADAM_MOMENTS)
        if not path.exists():
            raise files.MissingArtifactError(f"{path} is missing; re-materialize the `warmup_checkpoint` asset")
        try:
            flat = load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ValueError
            raise ArtifactError(
                f"{path} is not a readable safetensors file ({exc}); re-materialize the `warmup_checkpoint` asset"
            ) from None
        out: dict[str, dict[str, Any]] = {}
        for key, tensor in flat.items():
            param, kind = key.rsplit("::", 1)
            out.setdefault(param, {})[kind] = tensor
        return out

    def warmup_pool_ids_file(self) -> str | None:
        """The candidate ids the pool had when the warmup was trained (None for a warmup older than this record)."""
        path = self._path("warmup", "pool_ids.parquet")
        return str(path) if path.exists() else None

    # ------------------------------------------------------------------ target gradients

    def target_gradients_dir(self) -> Path:
        return self._path("target_gradients")

    @contextmanager
    def target_gradients_writer(self) -> Iterator[TargetGradientsWriter]:
        with files.atomic_dir(self.target_gradients_dir()) as tmp:
            yield TargetGradientsWriter(tmp)

    def read_target_gradients_manifest(self) -> dict:
        return files.read_json(self._path("target_gradients", "manifest.json"), "target_gradients")

    def previous_target_gradients_manifest(self) -> dict:
        """The last target gradients' manifest, or {} when there are none or it cannot be read (nothing to carry
        over then)."""
        try:
            return self.read_target_gradients_manifest()
        except files.ArtifactError:  # missing or unreadable
            return {}

    def target_gradients(self, ckpt: str, target: str) -> np.ndarray:
        """G of one target at one checkpoint (N x D float32, memory-mapped)."""
        return files.open_npy(self._path("target_gradients", ckpt, f"{target}.npy"), "target_gradients")

    def target_labels(self, ckpt: str, target: str) -> pl.DataFrame:
        """The rows of G: example_id, subtask, loss, n_label_tokens."""
        return files.read_parquet(self._path("target_gradients", ckpt, f"{target}.parquet"), "target_gradients")

    def target_gradients_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.target_gradients_dir().rglob("*.npy"))

    # ------------------------------------------------------------------ spectral bases

    def basis_dir(self, ckpt: str | None = None, target: str | None = None) -> Path:
        return self._path("basis", *[part for part in (ckpt, target) if part is not None])

    @contextmanager
    def basis_writer(self) -> Iterator[BasisWriter]:
        with files.atomic_dir(self.basis_dir()) as tmp:
            yield BasisWriter(tmp)

    def read_basis_manifest(self) -> dict:
        return files.read_json(self._path("basis", "manifest.json"), "spectral_basis")

    def basis_vectors(self, ckpt: str, target: str) -> np.ndarray:
        """V_k of one target at one checkpoint (D x k float32, memory-mapped)."""
        return files.open_npy(self._path("basis", ckpt, target, "V.npy"), "spectral_basis")

    def basis_coordinates(self, ckpt: str, target: str) -> tuple[np.ndarray, dict]:
        """(Z = U_k diag(s_k), N x k; the basis's meta: subtasks, singular values, fingerprint, ...)."""
        meta = files.read_json(self._path("basis", ckpt, target, "meta.json"), "spectral_basis")
        Z = files.open_npy(self._path("basis", ckpt, target, "Z.npy"), "spectral_basis", mmap=False)
        return Z, meta

    def bases_side_by_side(self, ckpt: str, targets: list[str]) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """V of every target at one checkpoint side by side (D x sum k), with each target's columns."""
        blocks, slices, start = [], {}, 0
        for name in targets:
            V = self.basis_vectors(ckpt, name)
            blocks.append(np.asarray(V))
            slices[name] = (start, start + V.shape[1])
            start += V.shape[1]
        return np.concatenate(blocks, axis=1), slices

    # ------------------------------------------------------------------ shard features

    def _features_dir(self, kind: str, shard: str) -> Path:
        return self._path(FEATURE_FOLDERS[kind], shard)

    def features_location(self, kind: str, shard: str) -> Path:
        return self._features_dir(kind, shard)

    def write_shard_features(
        self, kind: str, shard: str, tensors: dict[str, np.ndarray], candidates: pl.DataFrame, meta: dict
    ) -> None:
        """One shard's features of one kind: tensors, the per-candidate sidecar and meta, swapped in together."""
        from safetensors.numpy import save_file

        with files.atomic_dir(self._features_dir(kind, shard)) as tmp:
            save_file(tensors, str(tmp / "features.safetensors"))
            candidates.write_parquet(tmp / "candidates.parquet")
            (tmp / "meta.json").write_text(strict_json({"shard": shard, **meta}))

    def shard_features_meta(self, kind: str, shard: str) -> dict | None:
        """A shard's feature meta (versions it was made from, timings), None when it has none yet."""
        path = self._features_dir(kind, shard) / "meta.json"
        return files.read_json(path, FEATURE_ASSETS[kind], partition=shard) if path.exists() else None

    def read_shard_candidates(self, kind: str, shard: str) -> pl.DataFrame | None:
        """The sidecar of a shard's features (candidate_id, source, tokens, included, ...), None when absent."""
        path = self._features_dir(kind, shard) / "candidates.parquet"
        return files.read_parquet(path, FEATURE_ASSETS[kind], partition=shard) if path.exists() else None

    def read_shard_features(self, kind: str, shard: str) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
        """(the sidecar rows with a ``shard`` column, the tensors) of one shard."""
        d, asset = self._features_dir(kind, shard), FEATURE_ASSETS[kind]
        tensors = files.load_tensors(d / "features.safetensors", asset, partition=shard)
        side = files.read_parquet(d / "candidates.parquet", asset, partition=shard)
        return side.with_columns(pl.lit(shard).alias("shard")), tensors

    def feature_costs(self, kind: str, shards: list[str]) -> tuple[float | None, float | None]:
        """(bytes of stored features per scored candidate, seconds of the feature pass summed over shards and
        checkpoints); (None, None) unless every shard has them."""
        if kind not in FEATURE_FOLDERS or not shards:
            return None, None
        total_bytes, scored, seconds, timed = 0, 0, 0.0, False
        for shard in shards:
            d = self._features_dir(kind, shard)
            if not (d / "meta.json").exists() or not (d / "features.safetensors").exists():
                return None, None
            meta = json.loads((d / "meta.json").read_text())
            total_bytes += (d / "features.safetensors").stat().st_size
            scored += int(pl.read_parquet(d / "candidates.parquet", columns=["included"])["included"].sum())
            for timing in (meta.get("timings") or {}).values():
                if isinstance(timing, dict) and "seconds" in timing:
                    seconds += float(timing["seconds"])
                    timed = True
        return (total_bytes / scored if scored else None), (seconds if timed else None)

    # ------------------------------------------------------------------ score records

    def write_scores_record(self, group: str, record: dict) -> None:
        """What a scoring asset's scores were made from ({"version", "inputs", ...}); the sensor compares it."""
        files.write_json(self._path("scores", f"{group}_version.json"), record)

    def read_scores_record(self, group: str, produced_by: str) -> dict:
        return files.read_json(self._path("scores", f"{group}_version.json"), produced_by)

    def scores_record_or_none(self, group: str) -> dict | None:
        path = self._path("scores", f"{group}_version.json")
        return files.read_json(path, "candidate_scores") if path.exists() else None

    # ------------------------------------------------------------------ selections

    def selection_dir(self, target: str, method: str, budget: str | None = None) -> Path:
        return self._path("selections", target, method, *([budget] if budget is not None else []))

    @contextmanager
    def selection_writer(self, target: str, method: str) -> Iterator[SelectionWriter]:
        """Every budget of one (target, method), swapped in together when the block ends cleanly."""
        final = self.selection_dir(target, method)
        with files.atomic_dir(final) as tmp:
            yield SelectionWriter(self, tmp, final)

    def provenance(self, database: str) -> dict[str, str]:
        """Where a selection's inputs are, relative to the root (for its manifest)."""
        return {
            "candidate_pool": self.relative(self.pool_file()),
            "database": self.relative(database),
            **{name: self.relative(self._path(name)) for name in ("warmup", "basis", "target_gradients", "features")},
        }

    def read_selection_manifest(self, target: str, method: str, budget: str) -> dict:
        return files.read_json(self.selection_dir(target, method, budget) / "manifest.json", "selected_subset")

    def selection_manifests(self, target: str, method: str) -> dict[str, dict]:
        """{budget: manifest} of one (target, method); empty when it has no selection."""
        folder = self._path("selections", target, method)
        out = {}
        for path in sorted(folder.glob("*/manifest.json")) if folder.is_dir() else []:
            manifest = files.read_json(path, "selected_subset")
            out[manifest["budget"]] = manifest
        return out

    def selection_line_counts(self, target: str, method: str, budget: str) -> dict[str, int]:
        """Lines of each JSONL export of one selection."""
        counts = {}
        for name in (SELECTION_FILES["jsonl"], SELECTION_FILES["messages_jsonl"]):
            with open(self.selection_dir(target, method, budget) / name, encoding="utf-8") as fh:
                counts[name] = sum(1 for _ in fh)
        return counts

    def remove_selections_except(self, targets: list[str], methods: list[str]) -> list[str]:
        """Delete the exports of ``methods`` for targets not in ``targets``; their names."""
        removed = []
        root = self._path("selections")
        for folder in sorted(root.glob("*/*")) if root.exists() else []:
            if folder.is_dir() and folder.name in methods and folder.parent.name not in targets:
                shutil.rmtree(folder)
                removed.append(f"{folder.parent.name}/{folder.name}")
                if not any(folder.parent.iterdir()):
                    folder.parent.rmdir()
        return removed

    # ------------------------------------------------------------------ evaluation

    def write_evaluation(self, summary: pl.DataFrame, budget_plot_png: bytes) -> Path:
        """The evaluation summary (Parquet) and the loss-by-budget plot; returns the plot's path."""
        plot = self._path("evaluation", "heldout_loss_by_budget.png")
        with files.atomic_file(plot) as tmp:
            tmp.write_bytes(budget_plot_png)
        files.write_parquet(self._path("evaluation", "summary.parquet"), summary)
        return plot


class WarmupWriter:
    """Fills a new warmup folder (``ArtifactStore.warmup_writer``)."""

    def __init__(self, store: ArtifactStore, folder: Path):
        self.store, self.folder = store, folder

    def save_checkpoint(self, name: str, model, adam_moments: dict, info: dict) -> dict:
        """A PEFT adapter directory, its Adam moments (safetensors, ``<param>::exp_avg``) and info JSON;
        returns its manifest entry."""
        from safetensors.torch import save_file

        out = self.folder / name
        model.save_pretrained(str(out))
        save_file(adam_moments, str(out / ADAM_MOMENTS))
        (out / CHECKPOINT_INFO).write_text(strict_json(info))
        return {"name": name, "dir": self.store.relative(self.store.checkpoint_dir(name))}

    def finish(self, manifest: dict, pool_ids: pl.DataFrame) -> None:
        (self.folder / "manifest.json").write_text(strict_json(manifest))
        pool_ids.write_parquet(self.folder / "pool_ids.parquet")


class TargetGradientsWriter:
    """Fills a new target_gradients folder (``ArtifactStore.target_gradients_writer``)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def gradients(self, ckpt: str, target: str, n: int, dim: int) -> np.memmap:
        """An N x D float32 memmap for one target's gradients at one checkpoint, to fill and flush."""
        (self.folder / ckpt).mkdir(exist_ok=True)
        return np.lib.format.open_memmap(
            self.folder / ckpt / f"{target}.npy", mode="w+", dtype=np.float32, shape=(n, dim)
        )

    def labels(self, ckpt: str, target: str, rows: pl.DataFrame) -> None:
        rows.write_parquet(self.folder / ckpt / f"{target}.parquet")

    def carry_over(self, previous: Path, ckpt: str, target: str, n: int) -> bool:
        """One target's gradients and labels at one checkpoint from the ``previous`` folder (hard links where
        the file system allows, else copies); False, carrying nothing, when they are missing or not N rows."""
        src = [previous / ckpt / f"{target}.npy", previous / ckpt / f"{target}.parquet"]
        try:
            if np.load(src[0], mmap_mode="r", allow_pickle=False).shape[0] != n or not src[1].is_file():
                return False
        except (OSError, ValueError, EOFError):
            return False
        (self.folder / ckpt).mkdir(exist_ok=True)
        for path in src:
            dest = self.folder / ckpt / path.name
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)
        return True

    def finish(self, manifest: dict) -> None:
        (self.folder / "manifest.json").write_text(strict_json(manifest))


class BasisWriter:
    """Fills a new basis folder (``ArtifactStore.basis_writer``)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def vectors_file(self, ckpt: str, target: str) -> Path:
        """Where V (D x k) is streamed for one target at one checkpoint."""
        out = self.folder / ckpt / target
        out.mkdir(parents=True, exist_ok=True)
        return out / "V.npy"

    def write(self, ckpt: str, target: str, Z: np.ndarray, meta: dict) -> None:
        out = self.folder / ckpt / target
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "Z.npy", Z, allow_pickle=False)
        (out / "meta.json").write_text(strict_json(meta))

    def finish(self, manifest: dict) -> None:
        (self.folder / "manifest.json").write_text(strict_json(manifest))


class SelectionWriter:
    """Fills the budgets of one (target, method) (``ArtifactStore.selection_writer``)."""

    def __init__(self, store: ArtifactStore, folder: Path, final: Path):
        self.store, self.folder, self.final = store, folder, final

    def write_budget(self, budget: str, chunks: Iterable[tuple[Any, Any, Any]], manifest: dict) -> dict:
        """One budget's exports, appended chunk by chunk (see ``SelectionFiles.append``), and its manifest with
        the files' paths added; returns the manifest."""
        folder = self.folder / budget
        folder.mkdir()
        with _selection_files(folder) as out:
            for original, messages, table in chunks:
                out.append(original, messages, table)
        manifest = {
            **manifest,
            "files": {k: self.store.relative(self.final / budget / name) for k, name in SELECTION_FILES.items()},
        }
        (folder / "manifest.json").write_text(strict_json(manifest))
        return manifest

    def manifest_location(self, budget: str) -> Path:
        return self.final / budget / "manifest.json"


@contextmanager
def _selection_files(folder: Path) -> Iterator[SelectionFiles]:
    out = SelectionFiles(folder)
    try:
        yield out
    finally:
        out.close()
