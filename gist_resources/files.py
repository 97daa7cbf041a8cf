"""Files under the storage root: atomic writes (one implementation), readers whose errors name the file and
the asset that rebuilds it, and the cleanup of scratch files that killed writers left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

ROOT_ENV = "GIST_STORAGE_ROOT"
# Built embedded models, shared by every storage root of this machine's user: "off" turns the cache off.
MODEL_CACHE_ENV = "GIST_MODEL_CACHE"
MODEL_CACHE_OFF = "off"


class ArtifactError(dg.Failure, ValueError):
    """A stored artifact is damaged: re-materializing the asset that wrote it is the fix.

    A ``dagster.Failure`` with ``allow_retries=False``, so a step with a retry policy
    (the gradient steps) fails at once instead of recomputing twice to hit it again.
    """

    def __init__(self, message: str):
        super().__init__(description=message, allow_retries=False)


class MissingArtifactError(ArtifactError, FileNotFoundError):
    """A stored artifact does not exist yet: materialize the asset that writes it first."""


# A scratch of another host cannot be checked by pid; it counts as stale after this long.
FOREIGN_SCRATCH_STALE_S = 6 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _scratch(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


_SCRATCH = re.compile(r"(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?[0-9a-f]{8}\.(?:tmp|old)")


def _is_stale(p: Path, m: re.Match) -> bool:
    if m.group("pid") is None:  # older name without a writer id
        return True
    if m.group("host") == _host():
        return not pid_alive(int(m.group("pid")))
    try:
        return time.time() - p.lstat().st_mtime > FOREIGN_SCRATCH_STALE_S
    except FileNotFoundError:
        return False


def clean_stale_scratch(dest: Path) -> list[Path]:
    """Remove scratch files/dirs of ``dest`` left by writers that are gone; return them.

    Only names ``.<dest name>.<host>-<pid>-<hex>.tmp|old`` (or the older
    ``.<dest name>.<hex>.tmp|old``) are touched. A scratch of a live process on this
    host stays; one of another host (shared storage) stays until it is
    ``FOREIGN_SCRATCH_STALE_S`` old.
    """
    removed: list[Path] = []
    if not dest.parent.is_dir():
        return removed
    prefix = f".{dest.name}."
    for p in dest.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = _SCRATCH.fullmatch(p.name[len(prefix) :])
        if m is None or not _is_stale(p, m):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj) -> str:
    """Strict JSON text (what every reader accepts): NaN and infinities become null, never ``NaN``."""
    return json.dumps(_finite_or_none(obj), indent=2, sort_keys=True, default=str, allow_nan=False)


def default_storage_root() -> str:
    return os.path.abspath(os.environ.get(ROOT_ENV, ".gist"))


def default_model_cache() -> str:
    return os.environ.get(MODEL_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gist-curation")


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_file`` (another process asking for it waits)."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def safe_join(root: Path, *parts: str) -> Path:
    """``root / parts...``, refusing a part that is not a plain name (parts may come from config: target
    names, shard keys), so nothing is written outside ``root``."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise ValueError(
                f"invalid path component {part!r}: names in config must be plain file "
                "names (no '/', '..'), so outputs stay under the storage root"
            )
    p = root.joinpath(*parts)
    if root not in p.resolve().parents and p.resolve() != root:
        raise ValueError(f"{p} is outside the storage root {root}")
    return p


# Atomic writers: write beside the destination, then rename over it. The scratch name carries the
# writer's host and pid (``.<name>.<host>-<pid>-<hex>.tmp``), so the next write of the same destination
# can tell a leftover of a killed writer from a live one.
@contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_scratch(dest)
    tmp = _scratch(dest, "tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Build a directory beside ``dest`` and swap it in only when complete.

    Scratch directories left by a writer that was killed (SIGKILL, OOM, a lost node) are removed on
    the next write of the same destination.
    """
    with scratch_dir(dest) as tmp:
        yield tmp
        old = _scratch(dest, "old")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def scratch_dir(dest: Path) -> Iterator[Path]:
    """A scratch directory beside ``dest`` for work files, removed when the block ends; those of killed
    writers are removed on the next use (``clean_stale_scratch``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_scratch(dest)
    tmp = _scratch(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(dest: Path, obj) -> Path:
    """Strict JSON, atomically (into a scratch folder of ``atomic_dir`` it is written as is)."""
    with atomic_file(dest) as tmp:
        tmp.write_text(strict_json(obj))
    return dest


# Readers: a missing or damaged file fails naming the file and the asset (and partition) to
# materialize again. The errors are not chained on purpose: Dagster shows the innermost error of a
# failed step, and this message is the useful one.
def _require(src: Path, produced_by: str, partition: str | None) -> None:
    if not src.exists():
        raise MissingArtifactError(f"{src} is missing; materialize {asset_label(produced_by, partition)} first")


def read_json(src: Path, produced_by: str, partition: str | None = None):
    _require(src, produced_by, partition)
    try:
        return json.loads(src.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ArtifactError(
            f"{src} is not readable JSON ({exc}); re-materialize {asset_label(produced_by, partition)}"
        ) from None


def write_parquet(dest: Path, df) -> Path:
    with atomic_file(dest) as tmp:
        df.write_parquet(tmp)
    return dest


def read_parquet(
    src: Path,
    produced_by: str,
    partition: str | None = None,
    columns: list[str] | None = None,
    candidate_ids=None,
    where: dict[str, str] | None = None,
):
    """A Parquet file as a polars frame; only ``columns``, only the rows whose ``candidate_id`` is in
    ``candidate_ids`` and whose columns equal ``where``'s values, when given (the other columns are decoded
    for those rows only)."""
    import polars as pl

    _require(src, produced_by, partition)
    try:
        if columns is None and candidate_ids is None and not where:
            return pl.read_parquet(src)
        frame = pl.scan_parquet(src)
        if candidate_ids is not None:
            frame = frame.filter(pl.col("candidate_id").is_in(pl.Series(candidate_ids, dtype=pl.Utf8).implode()))
        for column, value in (where or {}).items():
            frame = frame.filter(pl.col(column) == value)
        return (frame.select(columns) if columns is not None else frame).collect()
    except Exception as exc:  # polars raises ComputeError / OSError / its own errors for a damaged file
        raise ArtifactError(
            f"{src} is not a readable Parquet file ({exc}); re-materialize {asset_label(produced_by, partition)}"
        ) from None


def count_parquet_values(src: Path, produced_by: str, column: str) -> dict:
    """{value: rows} of one column of a Parquet file, streamed (the file is not loaded whole)."""
    import polars as pl

    _require(src, produced_by, None)
    try:
        counts = pl.scan_parquet(src).group_by(column).len().collect()
    except Exception as exc:
        raise ArtifactError(
            f"{src} is not a readable Parquet file ({exc}); re-materialize {asset_label(produced_by)}"
        ) from None
    return dict(zip(counts[column].to_list(), counts["len"].to_list(), strict=True))


def write_npy(dest: Path, array: np.ndarray) -> Path:
    with atomic_file(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    return dest


def open_npy(src: Path, produced_by: str, mmap: bool = True, partition: str | None = None) -> np.ndarray:
    _require(src, produced_by, partition)
    try:
        return np.load(src, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(
            f"{src} is not a readable .npy tensor file ({exc}); delete it and "
            f"re-materialize {asset_label(produced_by, partition)}"
        ) from None


def load_tensors(src: Path, produced_by: str, partition: str | None = None) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays (no pickle)."""
    from safetensors.numpy import load_file

    _require(src, produced_by, partition)
    try:
        return load_file(str(src))
    except Exception as exc:  # SafetensorError, OSError, ValueError
        raise ArtifactError(
            f"{src} is not a readable safetensors file ({exc}); re-materialize {asset_label(produced_by, partition)}"
        ) from None


class SelectionFiles:
    """One selection's export files in a folder, appended chunk by chunk (memory holds one chunk):
    ``selection.jsonl`` (each record as the pool had it), ``selection.messages.jsonl`` (chat messages for
    SFT trainers) and ``selection.parquet``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._jsonl = open(folder / "selection.jsonl", "wb")  # noqa: SIM115 (closed in close())
        self._messages = open(folder / "selection.messages.jsonl", "wb")  # noqa: SIM115
        self._parquet: Any = None  # a pyarrow ParquetWriter, opened with the first chunk's schema

    def append(self, original, messages, table) -> None:
        """``original``: the records' JSON lines (a polars Series); ``messages``: a frame of (id, source,
        messages); ``table``: the Parquet rows (a polars frame of one schema for every chunk)."""
        import polars as pl
        import pyarrow.parquet as pq

        # Written as they are: a JSON line holds no newline, and quote_style="never" adds nothing.
        pl.DataFrame([original]).write_csv(self._jsonl, include_header=False, quote_style="never")
        messages.write_ndjson(self._messages)
        arrow = table.to_arrow()
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.folder / "selection.parquet", arrow.schema)
        self._parquet.write_table(arrow)

    def close(self) -> None:
        self._jsonl.close()
        self._messages.close()
        if self._parquet is not None:
            self._parquet.close()


def asset_label(name: str, partition: str | None = None) -> str:
    return f"the `{name}` asset" if partition is None else f"the `{name}` asset for partition {partition!r}"
