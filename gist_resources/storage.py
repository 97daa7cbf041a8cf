"""The storage root: every file the pipeline writes lives under it."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field
import numpy as np

ROOT_ENV = "GIST_STORAGE_ROOT"


def default_storage_root() -> str:
    return os.path.abspath(os.environ.get(ROOT_ENV, ".gist"))


class StorageResource(dg.ConfigurableResource):
    """Owns the storage root (default ``./.gist``, or ``$GIST_STORAGE_ROOT``).

    Paths are built from parts that may come from config (target names,
    shard keys); a part that would leave the root is refused.
    """

    root: str = Field(default="", description="Directory holding every artifact (models, tensors, "
                      "Parquet, DuckDB); empty means $GIST_STORAGE_ROOT or ./.gist")

    @property
    def root_path(self) -> Path:
        return Path(self.root or default_storage_root()).resolve()

    def path(self, *parts: str) -> Path:
        root = self.root_path
        for part in parts:
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
                raise ValueError(f"invalid path component {part!r}: names in config must be plain file "
                                 "names (no '/', '..'), so outputs stay under the storage root")
        p = root.joinpath(*parts)
        if root not in p.resolve().parents and p.resolve() != root:
            raise ValueError(f"{p} is outside the storage root {root}")
        return p

    def dir(self, *parts: str) -> Path:
        p = self.path(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    # Atomic writers: write beside the destination, then rename over it.
    @contextmanager
    def atomic_file(self, dest: Path) -> Iterator[Path]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            yield tmp
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()

    @contextmanager
    def atomic_dir(self, dest: Path) -> Iterator[Path]:
        """Build a directory beside ``dest`` and swap it in only when complete."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir()
        try:
            yield tmp
            old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_json(self, dest: Path, obj) -> Path:
        with self.atomic_file(dest) as tmp:
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        return dest

    def read_json(self, src: Path, produced_by: str):
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing; materialize the `{produced_by}` asset first")
        return json.loads(src.read_text())

    def write_parquet(self, dest: Path, df) -> Path:
        with self.atomic_file(dest) as tmp:
            df.write_parquet(tmp)
        return dest

    def read_parquet(self, src: Path, produced_by: str):
        import polars as pl

        if not src.exists():
            raise FileNotFoundError(f"{src} is missing; materialize the `{produced_by}` asset first")
        return pl.read_parquet(src)

    def write_npy(self, dest: Path, array: np.ndarray) -> Path:
        with self.atomic_file(dest) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
        return dest

    def open_npy(self, src: Path, produced_by: str, mmap: bool = True) -> np.ndarray:
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing; materialize the `{produced_by}` asset first")
        try:
            return np.load(src, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{src} is not a readable .npy tensor file ({exc}); delete it and "
                             f"re-materialize `{produced_by}`") from exc
