"""The score database: DuckDB tables and views, and the Parquet score sets behind them.

Scores are written as Parquet files, one set per method (``<database>.scores/method=<m>/<version>/
target=<t>/part-*.parquet``), streamed shard by shard; a set replaces the method's previous one in a
single DuckDB transaction that points the views at it, so readers see the old rows or the new, never
a mix. DuckDB reads the files in place: ``candidate_scores`` (with each row's rank), ``subtask_scores``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Generator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import polars as pl
from dagster_duckdb import DuckDBResource
from pydantic import Field

from . import files
from .files import pid_alive

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

# The score database's file name in a storage root.
DATABASE_NAME = "gist.duckdb"

# The columns of a score row as the files hold them (target and method are the folder names).
SCORE_SCHEMA: dict[str, PolarsDataType] = {
    "candidate_id": pl.Utf8,
    "source": pl.Utf8,
    "score": pl.Float64,
    "best_subtask": pl.Utf8,
    "shard": pl.Utf8,
    "n_tokens": pl.Int64,
    "basis_fingerprint": pl.Utf8,
    "subtask_scores": pl.List(pl.Float64),
}
SETS_DDL = """
CREATE TABLE IF NOT EXISTS score_sets (method VARCHAR PRIMARY KEY, version VARCHAR NOT NULL, rows BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS score_subtasks (method VARCHAR NOT NULL, target VARCHAR NOT NULL,
                                           subtasks VARCHAR[] NOT NULL)"""
SELECTIONS_DDL = """
CREATE TABLE IF NOT EXISTS selections (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, candidate_id VARCHAR NOT NULL,
    rank BIGINT NOT NULL, score DOUBLE NOT NULL, source VARCHAR NOT NULL, budget VARCHAR NOT NULL
);
-- A database written before selections had budgets: its rows were one budget, the configured one.
ALTER TABLE selections ADD COLUMN IF NOT EXISTS budget VARCHAR DEFAULT 'unknown';
-- Selections being made: every budget of a (target, method) is chosen here first, its files are exported
-- from here, and then it replaces the published rows in one transaction (publish_selection).
CREATE TABLE IF NOT EXISTS selection_staging (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, budget VARCHAR NOT NULL, selection_rank BIGINT NOT NULL,
    candidate_id VARCHAR NOT NULL, source VARCHAR NOT NULL, score DOUBLE NOT NULL, rank BIGINT NOT NULL,
    best_subtask VARCHAR, shard VARCHAR, n_tokens BIGINT, basis_fingerprint VARCHAR
)"""
# The columns of a staged selection after (target, method, budget), as the exports carry them.
STAGED_COLUMNS = (
    "selection_rank",
    "candidate_id",
    "source",
    "score",
    "rank",
    "best_subtask",
    "shard",
    "n_tokens",
    "basis_fingerprint",
)
# rank: position by score descending, ties by candidate id (gist_core.selection.rank_order's order).
RANKED = "row_number() OVER (PARTITION BY target, method ORDER BY score DESC, candidate_id) AS rank"
_EMPTY_ROWS = (
    "SELECT NULL::VARCHAR AS candidate_id, NULL::VARCHAR AS source, NULL::DOUBLE AS score, "
    "NULL::VARCHAR AS best_subtask, NULL::VARCHAR AS shard, NULL::BIGINT AS n_tokens, "
    "NULL::VARCHAR AS basis_fingerprint, NULL::DOUBLE[] AS subtask_scores, NULL::VARCHAR AS method, "
    "NULL::VARCHAR AS target WHERE false"
)
_VERSION = re.compile(r"\d{19}-[0-9a-f]{8}")
_PARTIAL = re.compile(r"\.partial-(\d+)-(\d{19}-[0-9a-f]{8})")


def _plain_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _arrow_frame(data) -> pl.DataFrame:
    frame = pl.from_arrow(data)
    assert isinstance(frame, pl.DataFrame)  # a table or record batch, never a single array
    return frame


class ScoreStoreLockedError(RuntimeError):
    """Another process holds the DuckDB write lock on the score database."""


class ScoreStoreWriteError(RuntimeError):
    """A write failed and was rolled back: the previous rows are intact."""


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("could not set" in text or "conflicting" in text)


class ScoreSetWriter:
    """One method's new score set, filled target by target and shard by shard (``ScoreStore.write_scores``).

    Rows go to Parquet files under a scratch folder as they come, so memory holds one shard at a time;
    nothing is visible to readers until the whole set is committed.
    """

    def __init__(self, store: ScoreStore, method: str):
        self.store, self.method = store, method
        self.version = f"{time.time_ns():019d}-{uuid.uuid4().hex[:8]}"
        self.dir = store.method_dir(method) / f".partial-{os.getpid()}-{self.version}"
        self.subtasks: dict[str, list[str]] = {}
        self.rows: dict[str, int] = {}
        self._parts = 0
        self._lock = threading.Lock()  # add may be called from several threads (one shard each)

    def add(self, target: str, rows: pl.DataFrame, subtasks: list[str]) -> None:
        """Append rows of ``target`` (the columns of SCORE_SCHEMA; ``subtask_scores`` in ``subtasks``' order).

        Safe to call from several threads; the order of the parts does not matter (readers rank by score)."""
        with self._lock:
            known = self.subtasks.setdefault(target, list(subtasks))
        if known != list(subtasks):
            raise ValueError(
                f"{self.method} scores of target {target!r} came with subtasks {subtasks}, earlier parts with {known}"
            )
        missing = [c for c in SCORE_SCHEMA if c not in rows.columns]
        if missing:
            raise ValueError(f"{self.method} scores of target {target!r} lack the columns {missing}")
        frame = rows.select([pl.col(c).cast(t) for c, t in SCORE_SCHEMA.items()])
        with self._lock:
            self.rows[target] = self.rows.get(target, 0) + frame.height
        if not frame.height:
            return
        nulls = {
            c: n
            for c, n in zip(frame.columns, frame.null_count().row(0), strict=True)
            if n and c in ("candidate_id", "source", "score", "subtask_scores")
        }
        if nulls:
            raise ValueError(f"{self.method} scores of target {target!r} have null values {nulls}")
        widths = frame["subtask_scores"].list.len()
        if (widths != len(subtasks)).any():
            raise ValueError(
                f"{self.method} scores of target {target!r}: each row needs {len(subtasks)} subtask scores ({subtasks})"
            )
        folder = self.dir / f"target={target}"
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            part, self._parts = self._parts, self._parts + 1
        # lz4: half the time of zstd for 20% more bytes; the files are rewritten on every scoring run.
        frame.write_parquet(folder / f"part-{part:06d}.parquet", compression="lz4", statistics=True)


class ScoreStore(DuckDBResource):
    """The one DuckDB file and the Parquet score sets beside it (``<database stem>.scores/``).

    Only unpartitioned, single-step assets write it, so parallel shard steps never contend for it
    (they write their own files). DuckDB lets one process hold the file for writing. When another
    process has it (a DuckDB shell, a notebook, a second run), a connection waits up to
    ``lock_timeout_s`` and then fails naming the file and the holder, instead of dagster-duckdb's
    ten exponential retries (about 100 s).
    """

    lock_timeout_s: float = Field(
        default=30.0,
        description="Seconds to wait for another process's lock on "
        "the database before failing with a message naming it",
    )
    memory_limit: str = Field(
        default="256MB",
        description="DuckDB's memory cap for queries on this store; "
        "sorts and joins past it spill to disk (DuckDB's own default is 80% of RAM)",
    )

    @property
    def score_root(self) -> Path:
        return Path(self.database).with_suffix(".scores")

    def method_dir(self, method: str) -> Path:
        if not _plain_name(method):
            raise ValueError(f"method names are letters, digits, '_' and '-': {method!r}")
        return self.score_root / f"method={method}"

    @contextmanager
    def get_connection(self):
        conn = self._connect()
        try:
            self._prepare(conn)
            yield conn
        finally:
            conn.close()

    def _connect(self):
        config = {"custom_user_agent": "dagster", "memory_limit": self.memory_limit, **self.connection_config}
        deadline = time.monotonic() + max(0.0, self.lock_timeout_s)
        delay = 0.05
        while True:
            try:
                return duckdb.connect(database=self.database, read_only=False, config=config)
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise ScoreStoreWriteError(f"cannot open the score database {self.database}: {exc}") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ScoreStoreLockedError(
                        f"the score database {self.database} is locked: another process holds a write "
                        f"connection to it ({str(exc).strip()}). Close that process (a DuckDB shell, a "
                        f"notebook, another run writing scores) or wait for it to finish, then re-run this "
                        f"step. Waited {self.lock_timeout_s:g}s (score_store.lock_timeout_s)."
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    def _prepare(self, conn) -> None:
        """Tables, and views pointing at this store's current score sets (rebuilt on every connection, so
        a storage root that was copied or moved reads its own files)."""
        old = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' AND "
            "table_type = 'BASE TABLE' AND table_name IN ('candidate_scores', 'subtask_scores')"
        ).fetchall()
        for (name,) in old:  # a database from before score sets: the scoring assets write them anew
            conn.execute(f"DROP TABLE {name}")
        conn.execute(SETS_DDL)
        conn.execute(SELECTIONS_DDL)
        self._create_views(conn)

    def _create_views(self, conn) -> None:
        sets = conn.execute("SELECT method, version FROM score_sets WHERE rows > 0 ORDER BY method").fetchall()
        # A name or version edited into the table by hand never names a folder outside the store.
        globs = [
            str(self.method_dir(m) / v / "*" / "*.parquet")
            for m, v in sets
            if _plain_name(m) and _plain_name(v) and (self.method_dir(m) / v).is_dir()
        ]
        rows = (
            f"SELECT * FROM read_parquet([{', '.join(_sql_text(g) for g in globs)}], hive_partitioning = true, "
            "hive_types = {'method': VARCHAR, 'target': VARCHAR})"
            if globs
            else _EMPTY_ROWS
        )
        conn.execute(f"CREATE OR REPLACE VIEW score_rows AS {rows}")
        conn.execute(
            "CREATE OR REPLACE VIEW candidate_scores AS SELECT candidate_id, source, target, method, score, "
            f"{RANKED}, best_subtask, shard, n_tokens, basis_fingerprint FROM score_rows"
        )
        conn.execute(
            "CREATE OR REPLACE VIEW subtask_scores AS SELECT r.candidate_id, r.target, r.method, "
            "unnest(n.subtasks) AS subtask, unnest(r.subtask_scores) AS score FROM score_rows r "
            "JOIN score_subtasks n ON n.method = r.method AND n.target = r.target"
        )

    @contextmanager
    def write_scores(self, method: str):
        """A new score set for ``method``: ``add`` rows inside the block; on a clean exit the set replaces the
        method's previous one (every target) in one transaction, on an exception it is discarded."""
        writer = ScoreSetWriter(self, method)
        try:
            yield writer
        except BaseException:
            shutil.rmtree(writer.dir, ignore_errors=True)
            raise
        self._commit(writer)

    def _commit(self, writer: ScoreSetWriter) -> None:
        final = writer.dir.with_name(writer.version)
        method = writer.method
        # The connection holds DuckDB's file lock: no other writer renames or cleans up meanwhile.
        with self.get_connection() as conn:
            if writer.dir.exists():
                os.replace(writer.dir, final)
            else:
                final.mkdir(parents=True)
            try:
                conn.execute("BEGIN TRANSACTION")
                conn.execute("DELETE FROM score_sets WHERE method = ?", [method])
                conn.execute(
                    "INSERT INTO score_sets VALUES (?, ?, ?)", [method, writer.version, sum(writer.rows.values())]
                )
                conn.execute("DELETE FROM score_subtasks WHERE method = ?", [method])
                for target, names in sorted(writer.subtasks.items()):
                    if writer.rows[target]:
                        conn.execute("INSERT INTO score_subtasks VALUES (?, ?, ?)", [method, target, names])
                self._create_views(conn)
                conn.execute("COMMIT")
            except Exception as exc:
                conn.execute("ROLLBACK")
                shutil.rmtree(final, ignore_errors=True)
                raise ScoreStoreWriteError(
                    f"writing the {method} scores to {self.database} failed and was "
                    f"rolled back; the previous scores are unchanged: {exc}"
                ) from None
            self._remove_unused_sets(method, writer.version)

    def _remove_unused_sets(self, method: str, current: str) -> None:
        """Older sets of ``method``, and scratch folders of writers that died."""
        for folder in self.method_dir(method).iterdir():
            partial = _PARTIAL.fullmatch(folder.name)
            if (folder.name != current and _VERSION.fullmatch(folder.name)) or (
                partial and not pid_alive(int(partial.group(1)))
            ):
                shutil.rmtree(folder, ignore_errors=True)

    def delete_selections_except(self, keep: list[str], method: str) -> int:
        """Drop the selections of ``method`` for targets no longer configured; the number of rows dropped."""
        marks = ", ".join("?" for _ in keep) or "''"
        with self.get_connection() as conn:
            where = f"WHERE method = ? AND target NOT IN ({marks})"
            n = conn.execute(f"SELECT count(*) FROM selections {where}", [method, *keep]).fetchone()[0]
            conn.execute(f"DELETE FROM selections {where}", [method, *keep])
            conn.execute(f"DELETE FROM selection_staging {where}", [method, *keep])
            return int(n)

    def scored_targets(self, method: str) -> list[str]:
        with self.get_connection() as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT target FROM score_subtasks WHERE method = ? ORDER BY 1", [method]
                ).fetchall()
            ]

    def integrity(self, table: str, limit: int = 20) -> dict:
        """Rows of ``table`` (candidate_scores or selections) that break its invariants.

        Returns {"duplicated_keys": number of (candidate_id, target, method[, budget]) keys held by more than one row,
        "duplicates": up to ``limit`` of them with their row counts, "nonfinite": rows whose score is NaN
        or infinite, "nonfinite_rows": up to ``limit`` of them}.
        """
        source = {"candidate_scores": "score_rows", "selections": "selections"}[table]
        # A candidate is in a selection once per budget.
        key = "candidate_id, target, method" + (", budget" if table == "selections" else "")
        with self.get_connection() as conn:
            # Grouping 8-byte hashes of the key first, then the exact keys only of the rows whose hash repeats:
            # exact, and at 10M+ rows twice as fast as grouping the strings (the costly part of the check).
            conn.execute(
                f"CREATE TEMP TABLE duplicated AS WITH repeated AS (SELECT hash({key}) AS h FROM {source} "
                f"GROUP BY h HAVING count(*) > 1) SELECT {key}, count(*) AS n FROM {source} "
                f"SEMI JOIN repeated ON hash({key}) = repeated.h GROUP BY {key} HAVING count(*) > 1"
            )
            n_dup = conn.execute("SELECT count(*) FROM duplicated").fetchone()[0]
            dups = conn.execute(f"SELECT * FROM duplicated ORDER BY n DESC, {key} LIMIT ?", [limit]).fetchall()
            conn.execute("DROP TABLE duplicated")
            bad = f"FROM {source} WHERE NOT isfinite(score)"
            n_bad = conn.execute(f"SELECT count(*) {bad}").fetchone()[0]
            bad_rows = (
                conn.execute(f"SELECT {key}, CAST(score AS VARCHAR) {bad} ORDER BY {key} LIMIT ?", [limit]).fetchall()
                if n_bad
                else []
            )
        names = key.split(", ")
        return {
            "duplicated_keys": int(n_dup),
            "duplicates": [{**dict(zip(names, r[:-1], strict=False)), "rows": int(r[-1])} for r in dups],
            "nonfinite": int(n_bad),
            "nonfinite_rows": [{**dict(zip(names, r[:-1], strict=False)), "score": r[-1]} for r in bad_rows],
        }

    def out_of_range_scores(self, low: float, high: float) -> int:
        with self.get_connection() as conn:
            return int(
                conn.execute(
                    "SELECT count(*) FROM score_rows WHERE NOT isfinite(score) OR score < ? OR score > ?", [low, high]
                ).fetchone()[0]
            )

    def _ids_query(self, candidate_ids, sql: str) -> pl.Series:
        """The first column of ``sql``'s rows, with ``candidate_ids`` as the table ``asked(candidate_id)``."""
        asked = pl.DataFrame([pl.Series("candidate_id", candidate_ids, dtype=pl.Utf8)])
        with self.get_connection() as conn:
            conn.register("asked", asked.to_arrow())
            try:
                return conn.sql(sql).pl().to_series(0).cast(pl.Utf8)
            finally:
                conn.unregister("asked")

    def scored_among(self, candidate_ids: list[str]) -> list[str]:
        """Those of ``candidate_ids`` that have a score of any method."""
        return (
            self._ids_query(
                candidate_ids, "SELECT DISTINCT candidate_id FROM score_rows SEMI JOIN asked USING (candidate_id)"
            )
            .sort()
            .to_list()
        )

    def methods(self) -> list[str]:
        with self.get_connection() as conn:
            rows = conn.execute("SELECT method FROM score_sets WHERE rows > 0 ORDER BY 1").fetchall()
        return [m for (m,) in rows if _plain_name(m)]

    def count_scores(self, target: str, method: str) -> int:
        with self.get_connection() as conn:
            return int(
                conn.execute(
                    "SELECT count(*) FROM score_rows WHERE target = ? AND method = ?", [target, method]
                ).fetchone()[0]
            )

    def read_scores(self, target: str, method: str) -> pl.DataFrame:
        """Every row of (target, method) in rank order."""
        with self.get_connection() as conn:
            return conn.sql(
                "SELECT * FROM candidate_scores WHERE target = ? AND method = ? ORDER BY rank", params=[target, method]
            ).pl()

    def read_subtask_scores(self, target: str, method: str) -> pl.DataFrame:
        with self.get_connection() as conn:
            return conn.sql(
                "SELECT candidate_id, subtask, score FROM subtask_scores WHERE target = ? AND method = ?",
                params=[target, method],
            ).pl()

    def score_histogram(self, target: str, method: str, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """(bin edges, counts) of the scores of (target, method), computed in DuckDB."""
        where, params = "WHERE target = ? AND method = ?", [target, method]
        with self.get_connection() as conn:
            lo, hi = conn.execute(f"SELECT min(score), max(score) FROM score_rows {where}", params).fetchone()
            if lo is None:
                return np.zeros(0), np.zeros(0, dtype=np.int64)
            width = (hi - lo) / bins or 1.0
            counts = dict(
                conn.execute(
                    f"SELECT least(CAST(floor((score - ?) / ?) AS BIGINT), ?) AS b, count(*) FROM score_rows {where} "
                    "GROUP BY b",
                    [lo, width, bins - 1, *params],
                ).fetchall()
            )
        return lo + width * np.arange(bins + 1), np.array([counts.get(b, 0) for b in range(bins)], dtype=np.int64)

    def count_absent_from(self, target: str, method: str, ids_file: str) -> int:
        """Scored rows of (target, method) whose candidate is not in the Parquet file ``ids_file``."""
        with self.get_connection() as conn:
            return int(
                conn.execute(
                    # An anti join (a hash table of the file's ids), not a correlated NOT EXISTS: 6x faster at 10M.
                    "SELECT count(*) FROM (SELECT candidate_id FROM score_rows WHERE target = ? AND method = ?) "
                    "ANTI JOIN read_parquet(?) USING (candidate_id)",
                    [target, method, ids_file],
                ).fetchone()[0]
            )

    # ---- selections: staged (chosen, exported from), then published

    # What follows FROM to read one staged selection; takes (target, method, budget) as parameters.
    _ONE_STAGED = "selection_staging WHERE target = ? AND method = ? AND budget = ?"
    _STAGE_INTO = f"INSERT INTO selection_staging (target, method, budget, {', '.join(STAGED_COLUMNS)})"

    def stage_top(self, target: str, method: str, budget: str, n: int) -> None:
        """Stage the best ``n`` rows of (target, method) as the selection of ``budget``, ranked as
        ``rank_order`` ranks (score descending, ties by id). Chosen in DuckDB, no row passes through Python:
        memory does not grow with the pool or the selection."""
        where, params = "WHERE target = ? AND method = ?", [target, method]
        with self.get_connection() as conn:
            # The n-th best score first (max(score, n) keeps n floats), so that only the rows at or above it
            # are ranked.
            [(cut,)] = conn.execute(
                f"SELECT list_min(max(score, ?)) FROM score_rows {where}", [max(1, n), *params]
            ).fetchall()
            conn.execute(f"DELETE FROM {self._ONE_STAGED}", [target, method, budget])
            conn.execute(
                f"{self._STAGE_INTO} SELECT target, method, ?, r, candidate_id, source, score, r, best_subtask, "
                "shard, n_tokens, basis_fingerprint FROM (SELECT *, row_number() OVER "
                f"(ORDER BY score DESC, candidate_id) AS r FROM score_rows {where} AND score >= ?) "
                "WHERE r <= ? ORDER BY r",
                [budget, *params, cut, n],
            )

    def stage_rows(self, target: str, method: str, budget: str, rows: pl.DataFrame) -> None:
        """Stage a selection chosen in Python: ``rows`` has STAGED_COLUMNS, ``selection_rank`` 1..n."""
        frame = rows.select(STAGED_COLUMNS)
        with self.get_connection() as conn:
            conn.register("incoming", frame.to_arrow())
            try:
                conn.execute(f"DELETE FROM {self._ONE_STAGED}", [target, method, budget])
                conn.execute(
                    f"{self._STAGE_INTO} SELECT ?, ?, ?, {', '.join(STAGED_COLUMNS)} FROM incoming",
                    [target, method, budget],
                )
            finally:
                conn.unregister("incoming")

    def staged_summary(
        self, target: str, method: str, budget: str, ids_file: str | None = None, head: int = 10
    ) -> dict:
        """A staged selection's size, score cut (its lowest score), rows per source and first ``head`` rows; with
        ``ids_file`` (a Parquet file of candidate ids), also how many of the selection it does not hold."""
        key = [target, method, budget]
        with self.get_connection() as conn:
            selected, score_cut = conn.execute(f"SELECT count(*), min(score) FROM {self._ONE_STAGED}", key).fetchone()
            per_source = conn.execute(
                f"SELECT source, count(*) FROM {self._ONE_STAGED} GROUP BY source ORDER BY source", key
            ).fetchall()
            first = conn.sql(
                f"SELECT selection_rank, candidate_id, source, score, best_subtask FROM {self._ONE_STAGED} "
                "ORDER BY selection_rank LIMIT ?",
                params=[*key, head],
            ).pl()
            summary = {
                "selected": int(selected),
                "score_cut": score_cut,
                "counts_per_source": {s: int(c) for s, c in per_source},
                "head": first,
            }
            if ids_file is not None:
                # A semi join builds its hash table on the staged ids and streams the file past it; an anti
                # join would build one on the file's ids, as large as the pool.
                [(present,)] = conn.execute(
                    "SELECT count(DISTINCT candidate_id) FROM read_parquet(?) SEMI JOIN "
                    f"(SELECT candidate_id FROM {self._ONE_STAGED}) USING (candidate_id)",
                    [ids_file, *key],
                ).fetchall()
                summary["absent_from_ids_file"] = int(selected) - int(present)
        return summary

    def staged_with_file_columns(
        self, target: str, method: str, budget: str, parquet_file: str, columns: list[str], chunk_rows: int
    ) -> Generator[pl.DataFrame, None, None]:
        """The staged selection's rows (every column of ``selection_staging``) best first, with ``columns`` of
        the Parquet file's row of the same ``candidate_id`` (null where it has none), ``chunk_rows`` rows at a
        time.

        Memory stays bounded by a chunk, whatever the sizes of the file and of the selection: DuckDB streams
        the join's rows in the file's order, each row is appended to the spill file of the output chunk it
        belongs to (Arrow IPC, in a scratch folder beside the database), and the chunks are then read back
        one by one beside the staged rows of the same ranks.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        key = [target, method, budget]
        picked = ", ".join(f"f.{_sql_name(c)}" for c in columns)
        with files.scratch_dir(Path(self.database).with_name("export_join")) as spill:
            with self.get_connection() as conn, ExitStack() as writers_open:
                [(selected,)] = conn.execute(f"SELECT count(*) FROM {self._ONE_STAGED}", key).fetchall()
                # The first chunk's staged rows too, while connected (a small selection is one chunk).
                first_rows = self._staged_ranks(conn, key, 0, chunk_rows)
                reader = conn.sql(
                    f"SELECT a.at, {picked} FROM read_parquet(?) f JOIN (SELECT selection_rank - 1 AS at, "
                    f"candidate_id FROM {self._ONE_STAGED}) a USING (candidate_id)",
                    params=[parquet_file, *key],
                ).to_arrow_reader(chunk_rows)
                writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
                for batch in reader:
                    chunk_of = pc.divide(batch["at"].cast(pa.int64()), chunk_rows)
                    for c in pc.unique(chunk_of).to_pylist():
                        part = batch.filter(pc.equal(chunk_of, c))
                        if c not in writers:
                            path = str(spill / f"{c}.arrow")
                            writers[c] = writers_open.enter_context(pa.ipc.new_stream(path, part.schema))
                        writers[c].write_batch(part)
            none_found = _arrow_frame(reader.schema.empty_table()).cast({"at": pl.Int64})
            for c, start in enumerate(range(0, max(selected, 1), chunk_rows)):
                if c == 0:
                    rows = first_rows
                else:
                    with self.get_connection() as conn:
                        rows = self._staged_ranks(conn, key, start, chunk_rows)
                found = none_found
                if c in writers:
                    with pa.ipc.open_stream(str(spill / f"{c}.arrow")) as chunk_reader:
                        found = _arrow_frame(chunk_reader.read_all()).cast({"at": pl.Int64})
                if found["at"].is_duplicated().any():
                    raise ValueError(f"{parquet_file} holds a candidate_id more than once; rebuild it")
                at = pl.DataFrame({"at": pl.int_range(start, start + rows.height, dtype=pl.Int64, eager=True)})
                text = at.join(found, on="at", how="left", maintain_order="left").drop("at")
                yield pl.concat([rows, text], how="horizontal")

    def _staged_ranks(self, conn, key: list[str], start: int, n: int) -> pl.DataFrame:
        """The staged rows ranked start + 1 .. start + n, in rank order."""
        return conn.sql(
            f"SELECT * FROM {self._ONE_STAGED} AND selection_rank > ? AND selection_rank <= ? ORDER BY selection_rank",
            params=[*key, start, start + n],
        ).pl()

    def publish_selection(self, target: str, method: str, sizes: dict[str, int]) -> None:
        """The staged budgets of (target, method) (``sizes``: {budget: rows staged}) replace its published rows
        in ``selections``, in one transaction (readers see the old selection or the new, never a mix); whatever
        else of (target, method) is staged is dropped. Staged rows that are not the ones counted (another run
        staging the same selection at the same time) fail the publish and change nothing."""
        key = [target, method]
        marks = ", ".join("?" for _ in sizes)
        with self.get_connection() as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                conn.execute("DELETE FROM selections WHERE target = ? AND method = ?", key)
                conn.execute(
                    "INSERT INTO selections (target, method, candidate_id, rank, score, source, budget) SELECT "
                    "target, method, candidate_id, selection_rank, score, source, budget FROM selection_staging "
                    f"WHERE target = ? AND method = ? AND budget IN ({marks}) ORDER BY budget, selection_rank",
                    [*key, *sizes],
                )
                found = dict(
                    conn.execute(
                        "SELECT budget, count(*) FROM selections WHERE target = ? AND method = ? GROUP BY budget", key
                    ).fetchall()
                )
                if found != sizes:
                    raise ScoreStoreWriteError(
                        f"the staged {method} selections of {target!r} changed while they were exported (another "
                        f"run selecting at the same time?): staged {sizes}, found {found}; run it again"
                    )
                conn.execute("DELETE FROM selection_staging WHERE target = ? AND method = ?", key)
                conn.execute("COMMIT")
            except Exception as exc:
                conn.execute("ROLLBACK")
                if isinstance(exc, ScoreStoreWriteError):
                    raise
                raise ScoreStoreWriteError(
                    f"writing the {method} selections of {target!r} to {self.database} failed and was rolled "
                    f"back; the previous rows are unchanged: {exc}"
                ) from None

    def drop_staged(self, target: str, method: str) -> None:
        """Forget what is staged for (target, method) (a selection that failed before it was published)."""
        with self.get_connection() as conn:
            conn.execute("DELETE FROM selection_staging WHERE target = ? AND method = ?", [target, method])

    def selection_sizes(self) -> dict[tuple[str, str, str], int]:
        """{(method, target, budget): rows} of the selections table."""
        with self.get_connection() as conn:
            return {
                (m, t, b): int(n)
                for m, t, b, n in conn.execute(
                    "SELECT method, target, budget, count(*) FROM selections GROUP BY ALL ORDER BY 1, 2, 3"
                ).fetchall()
            }

    def read_selections(self) -> pl.DataFrame | None:
        """(target, method, budget, candidate_id) of every selection, in rank order; None when none was made."""
        with self.get_connection() as conn:
            df = conn.sql(
                "SELECT target, method, budget, candidate_id FROM selections ORDER BY target, method, budget, rank"
            ).pl()
        return df if df.height else None

    def read_evaluation_summary(self) -> pl.DataFrame:
        """The ``evaluation_summary`` view, ordered by target, budget and mean held-out loss."""
        with self.get_connection() as conn:
            conn.execute(EVALUATIONS_DDL)
            conn.execute(SUMMARY_VIEW)
            return conn.sql(
                "SELECT * FROM evaluation_summary ORDER BY target, budget NULLS FIRST, mean_loss, method"
            ).pl()

    def replace_evaluations(self, df: pl.DataFrame) -> None:
        """Replace the whole ``evaluations`` table (fine-tune results) in one transaction; its view too."""
        with self.get_connection() as conn:
            conn.register("incoming_evaluations", df.to_arrow())
            conn.execute("BEGIN TRANSACTION")
            try:
                # Replaced whole, so a table of an older shape (no seed, no budget) is simply rebuilt.
                conn.execute("DROP VIEW IF EXISTS evaluation_summary")
                conn.execute("DROP TABLE IF EXISTS evaluations")
                conn.execute(EVALUATIONS_DDL)
                cols = ", ".join(df.columns)
                conn.execute(f"INSERT INTO evaluations ({cols}) SELECT {cols} FROM incoming_evaluations")
                conn.execute(SUMMARY_VIEW)
                conn.execute("COMMIT")
            except Exception as exc:
                conn.execute("ROLLBACK")
                raise ScoreStoreWriteError(
                    f"writing evaluations to {self.database} failed and was rolled "
                    f"back; the previous rows are unchanged: {exc}"
                ) from None
            finally:
                conn.unregister("incoming_evaluations")


EVALUATIONS_DDL = """
CREATE TABLE IF NOT EXISTS evaluations (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, budget VARCHAR, seed BIGINT, train_examples BIGINT NOT NULL,
    heldout_examples BIGINT NOT NULL, heldout_loss DOUBLE NOT NULL, accuracy DOUBLE,
    bytes_per_candidate DOUBLE, feature_pass_seconds DOUBLE
)"""
# Student t quantiles t(0.975, df) for df = 1..30 (two-sided 95%); beyond 30 seeds the normal 1.96.
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
# Per (target, method, budget): mean and standard deviation of held-out loss over seeds, and the paired
# difference (same seed) to random at the same budget and to the full pool, with a 95% t interval over
# seeds and a verdict: 'yes' (interval below 0: lower loss), 'no' (above 0), "can't tell" (it holds 0,
# or fewer than 2 seeds). base (no fine-tuning) has one row and no seed; full_pool has no budget.
SUMMARY_VIEW = f"""
CREATE OR REPLACE VIEW evaluation_summary AS
WITH t975(df, q) AS (VALUES {", ".join(f"({i + 1}, {q})" for i, q in enumerate(T975))}),
stats AS (
    SELECT target, method, budget, count(*) AS seeds, min(heldout_examples) AS heldout_examples,
           round(avg(train_examples)) AS train_examples, avg(heldout_loss) AS mean_loss,
           stddev_samp(heldout_loss) AS std_loss, avg(accuracy) AS mean_accuracy
    FROM evaluations GROUP BY target, method, budget),
diffs AS (
    SELECT e.target, e.method, e.budget, r.method AS reference, e.heldout_loss - r.heldout_loss AS d
    FROM evaluations e JOIN evaluations r
      ON e.target = r.target AND e.seed = r.seed AND e.method <> r.method
     AND ((r.method = 'random' AND r.budget = e.budget) OR r.method = 'full_pool')),
agg AS (
    SELECT target, method, budget, reference, count(*) AS n, avg(d) AS mean_d, stddev_samp(d) AS sd_d
    FROM diffs GROUP BY target, method, budget, reference),
paired AS (
    SELECT agg.*, mean_d - coalesce(q, 1.96) * sd_d / sqrt(n) AS lo, mean_d + coalesce(q, 1.96) * sd_d / sqrt(n) AS hi
    FROM agg LEFT JOIN t975 ON t975.df = agg.n - 1),
verdicts AS (
    SELECT *, CASE WHEN n >= 2 AND hi < 0 THEN 'yes' WHEN n >= 2 AND lo > 0 THEN 'no' ELSE 'can''t tell' END
           AS verdict FROM paired)
SELECT s.target, s.method, s.budget, s.seeds, s.train_examples, s.heldout_examples, s.mean_loss, s.std_loss,
       s.mean_accuracy,
       r.mean_d AS diff_vs_random, r.lo AS diff_vs_random_lo, r.hi AS diff_vs_random_hi,
       r.verdict AS better_than_random,
       f.mean_d AS diff_vs_full_pool, f.lo AS diff_vs_full_pool_lo, f.hi AS diff_vs_full_pool_hi,
       f.verdict AS better_than_full_pool
FROM stats s
LEFT JOIN verdicts r ON r.reference = 'random' AND r.target = s.target AND r.method = s.method
     AND r.budget IS NOT DISTINCT FROM s.budget
LEFT JOIN verdicts f ON f.reference = 'full_pool' AND f.target = s.target AND f.method = s.method
     AND f.budget IS NOT DISTINCT FROM s.budget
"""
