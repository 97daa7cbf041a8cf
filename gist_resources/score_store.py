"""DuckDB tables: candidate_scores and selections, replaced atomically per (target, method)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import duckdb
import polars as pl
from dagster_duckdb import DuckDBResource
from pydantic import Field

SCORES_DDL = """
CREATE TABLE IF NOT EXISTS candidate_scores (
    candidate_id VARCHAR NOT NULL, source VARCHAR NOT NULL, target VARCHAR NOT NULL,
    method VARCHAR NOT NULL, score DOUBLE NOT NULL, rank BIGINT NOT NULL,
    best_subtask VARCHAR, shard VARCHAR, n_tokens BIGINT, basis_fingerprint VARCHAR
)"""
SUBTASK_DDL = """
CREATE TABLE IF NOT EXISTS subtask_scores (
    candidate_id VARCHAR NOT NULL, target VARCHAR NOT NULL, method VARCHAR NOT NULL,
    subtask VARCHAR NOT NULL, score DOUBLE NOT NULL
)"""
SELECTIONS_DDL = """
CREATE TABLE IF NOT EXISTS selections (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, candidate_id VARCHAR NOT NULL,
    rank BIGINT NOT NULL, score DOUBLE NOT NULL, source VARCHAR NOT NULL
)"""


class ScoreStoreLockedError(RuntimeError):
    """Another process holds the DuckDB write lock on the score database."""


class ScoreStoreWriteError(RuntimeError):
    """A write failed and was rolled back: the previous rows are intact."""


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("could not set" in text or "conflicting" in text)


class ScoreStore(DuckDBResource):
    """The one DuckDB file. Only unpartitioned, single-step assets write it, so
    parallel shard steps never contend for it (they write their own files).

    DuckDB lets one process hold the file for writing. When another process has it
    (a DuckDB shell, a notebook, a second run), a connection waits up to
    ``lock_timeout_s`` and then fails naming the file and the holder, instead of
    dagster-duckdb's ten exponential retries (about 100 s).
    """

    lock_timeout_s: float = Field(default=30.0, description="Seconds to wait for another process's lock on "
                                  "the database before failing with a message naming it")

    @contextmanager
    def get_connection(self):
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _connect(self):
        config = {"custom_user_agent": "dagster", **self.connection_config}
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
                        f"step. Waited {self.lock_timeout_s:g}s (score_store.lock_timeout_s).") from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    def _replace_many(self, items: list[tuple[str, str, pl.DataFrame, dict[str, str]]]) -> None:
        """Replace the rows matching ``where`` in each table with ``df``, all in one transaction.

        A failure anywhere (a constraint, a crash of the insert) rolls back every
        table: the previous rows stay, nothing is half-written.
        """
        with self.get_connection() as conn:
            for _, ddl, _, _ in items:
                conn.execute(ddl)
            for i, (_, _, df, _) in enumerate(items):
                conn.register(f"incoming_{i}", df.to_arrow())
            try:
                conn.execute("BEGIN TRANSACTION")
                try:
                    for i, (table, _, df, where) in enumerate(items):
                        cond = " AND ".join(f"{k} = ?" for k in where)
                        conn.execute(f"DELETE FROM {table} WHERE {cond}", list(where.values()))
                        cols = ", ".join(df.columns)
                        conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM incoming_{i}")
                    conn.execute("COMMIT")
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    what = "; ".join(f"{t} where {' and '.join(f'{k}={v!r}' for k, v in w.items())}"
                                     for t, _, _, w in items)
                    raise ScoreStoreWriteError(f"writing {what} to {self.database} failed and was rolled back; "
                                               f"the previous rows are unchanged: {exc}") from None
            finally:
                for i in range(len(items)):
                    conn.unregister(f"incoming_{i}")

    def _replace(self, table: str, ddl: str, df: pl.DataFrame, where: dict[str, str]) -> None:
        self._replace_many([(table, ddl, df, where)])

    def replace_method_scores(self, target: str, method: str, scores: pl.DataFrame, subtask_scores: pl.DataFrame) -> None:
        """candidate_scores and subtask_scores of one (target, method), replaced together."""
        where = {"target": target, "method": method}
        self._replace_many([("candidate_scores", SCORES_DDL, scores, where),
                            ("subtask_scores", SUBTASK_DDL, subtask_scores, where)])

    def replace_scores(self, target: str, method: str, df: pl.DataFrame) -> None:
        self._replace("candidate_scores", SCORES_DDL, df, {"target": target, "method": method})

    def replace_selection(self, target: str, method: str, df: pl.DataFrame) -> None:
        self._replace("selections", SELECTIONS_DDL, df, {"target": target, "method": method})

    def delete_targets_except(self, keep: list[str], method: str) -> int:
        """Drop rows of targets no longer configured, so stale targets do not linger."""
        marks = ", ".join("?" for _ in keep) or "''"
        with self.get_connection() as conn:
            n = 0
            for table, ddl in (("candidate_scores", SCORES_DDL), ("subtask_scores", SUBTASK_DDL),
                               ("selections", SELECTIONS_DDL)):
                conn.execute(ddl)
                where = f"WHERE method = ? AND target NOT IN ({marks})"
                if table == "candidate_scores":
                    n = conn.execute(f"SELECT count(*) FROM {table} {where}", [method, *keep]).fetchone()[0]
                conn.execute(f"DELETE FROM {table} {where}", [method, *keep])
            return int(n)

    def integrity(self, table: str, limit: int = 20) -> dict:
        """Rows of ``table`` (candidate_scores or selections) that break its invariants.

        Returns {"duplicated_keys": number of (candidate_id, target, method) keys held by more than one row,
        "duplicates": up to ``limit`` of them with their row counts, "nonfinite": rows whose score is NaN
        or infinite, "nonfinite_rows": up to ``limit`` of them}.
        """
        ddl = {"candidate_scores": SCORES_DDL, "selections": SELECTIONS_DDL}[table]
        key = "candidate_id, target, method"
        with self.get_connection() as conn:
            conn.execute(ddl)
            dup_sql = f"SELECT {key}, count(*) AS n FROM {table} GROUP BY {key} HAVING count(*) > 1"
            n_dup = conn.execute(f"SELECT count(*) FROM ({dup_sql})").fetchone()[0]
            dups = conn.execute(f"{dup_sql} ORDER BY n DESC, {key} LIMIT ?", [limit]).fetchall()
            bad = f"FROM {table} WHERE NOT isfinite(score)"
            n_bad = conn.execute(f"SELECT count(*) {bad}").fetchone()[0]
            bad_rows = conn.execute(f"SELECT {key}, CAST(score AS VARCHAR) {bad} ORDER BY {key} LIMIT ?",
                                    [limit]).fetchall()
        return {"duplicated_keys": int(n_dup),
                "duplicates": [{"candidate_id": c, "target": t, "method": m, "rows": int(n)} for c, t, m, n in dups],
                "nonfinite": int(n_bad),
                "nonfinite_rows": [{"candidate_id": c, "target": t, "method": m, "score": v}
                                   for c, t, m, v in bad_rows]}

    def methods(self) -> list[str]:
        with self.get_connection() as conn:
            conn.execute(SCORES_DDL)
            return [r[0] for r in conn.execute("SELECT DISTINCT method FROM candidate_scores ORDER BY 1").fetchall()]

    def read_subtask_scores(self, target: str, method: str) -> pl.DataFrame:
        with self.get_connection() as conn:
            conn.execute(SUBTASK_DDL)
            return conn.sql("SELECT candidate_id, subtask, score FROM subtask_scores WHERE target = ? AND method = ?",
                            params=[target, method]).pl()

    def read_scores(self, target: str, method: str) -> pl.DataFrame:
        with self.get_connection() as conn:
            conn.execute(SCORES_DDL)
            return conn.sql("SELECT * FROM candidate_scores WHERE target = ? AND method = ? ORDER BY rank",
                            params=[target, method]).pl()

    def read_evaluations(self) -> list[tuple]:
        """(target, method, train examples, held-out loss, accuracy, bytes/candidate, feature-pass s), best first."""
        with self.get_connection() as conn:
            conn.execute(EVALUATIONS_DDL)
            return conn.execute("SELECT target, method, train_examples, heldout_loss, accuracy, bytes_per_candidate, "
                                "feature_pass_seconds FROM evaluations ORDER BY target, heldout_loss").fetchall()

    def replace_evaluations(self, df: pl.DataFrame) -> None:
        """Replace the whole ``evaluations`` table (fine-tune results) in one transaction."""
        with self.get_connection() as conn:
            conn.execute(EVALUATIONS_DDL)
            conn.register("incoming_evaluations", df.to_arrow())
            conn.execute("BEGIN TRANSACTION")
            try:
                conn.execute("DELETE FROM evaluations")
                cols = ", ".join(df.columns)
                conn.execute(f"INSERT INTO evaluations ({cols}) SELECT {cols} FROM incoming_evaluations")
                conn.execute("COMMIT")
            except Exception as exc:
                conn.execute("ROLLBACK")
                raise ScoreStoreWriteError(f"writing evaluations to {self.database} failed and was rolled "
                                           f"back; the previous rows are unchanged: {exc}") from None
            finally:
                conn.unregister("incoming_evaluations")

EVALUATIONS_DDL = """
CREATE TABLE IF NOT EXISTS evaluations (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, train_examples BIGINT NOT NULL,
    heldout_examples BIGINT NOT NULL, heldout_loss DOUBLE NOT NULL, accuracy DOUBLE,
    bytes_per_candidate DOUBLE, feature_pass_seconds DOUBLE
)"""
