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
    rank BIGINT NOT NULL, score DOUBLE NOT NULL, source VARCHAR NOT NULL, budget VARCHAR NOT NULL
);
-- A database written before selections had budgets: its rows were one budget, the configured one.
ALTER TABLE selections ADD COLUMN IF NOT EXISTS budget VARCHAR DEFAULT 'unknown'"""


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

        Returns {"duplicated_keys": number of (candidate_id, target, method[, budget]) keys held by more than one row,
        "duplicates": up to ``limit`` of them with their row counts, "nonfinite": rows whose score is NaN
        or infinite, "nonfinite_rows": up to ``limit`` of them}.
        """
        ddl = {"candidate_scores": SCORES_DDL, "selections": SELECTIONS_DDL}[table]
        # A candidate is in a selection once per budget.
        key = "candidate_id, target, method" + (", budget" if table == "selections" else "")
        with self.get_connection() as conn:
            conn.execute(ddl)
            dup_sql = f"SELECT {key}, count(*) AS n FROM {table} GROUP BY {key} HAVING count(*) > 1"
            n_dup = conn.execute(f"SELECT count(*) FROM ({dup_sql})").fetchone()[0]
            dups = conn.execute(f"{dup_sql} ORDER BY n DESC, {key} LIMIT ?", [limit]).fetchall()
            bad = f"FROM {table} WHERE NOT isfinite(score)"
            n_bad = conn.execute(f"SELECT count(*) {bad}").fetchone()[0]
            bad_rows = conn.execute(f"SELECT {key}, CAST(score AS VARCHAR) {bad} ORDER BY {key} LIMIT ?",
                                    [limit]).fetchall()
        names = key.split(", ")
        return {"duplicated_keys": int(n_dup),
                "duplicates": [{**dict(zip(names, r[:-1])), "rows": int(r[-1])} for r in dups],
                "nonfinite": int(n_bad),
                "nonfinite_rows": [{**dict(zip(names, r[:-1])), "score": r[-1]} for r in bad_rows]}

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

    def read_evaluation_summary(self) -> pl.DataFrame:
        """The ``evaluation_summary`` view, ordered by target, budget and mean held-out loss."""
        with self.get_connection() as conn:
            conn.execute(EVALUATIONS_DDL)
            conn.execute(SUMMARY_VIEW)
            return conn.sql("SELECT * FROM evaluation_summary ORDER BY target, budget NULLS FIRST, mean_loss, "
                            "method").pl()

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
                raise ScoreStoreWriteError(f"writing evaluations to {self.database} failed and was rolled "
                                           f"back; the previous rows are unchanged: {exc}") from None
            finally:
                conn.unregister("incoming_evaluations")

EVALUATIONS_DDL = """
CREATE TABLE IF NOT EXISTS evaluations (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, budget VARCHAR, seed BIGINT, train_examples BIGINT NOT NULL,
    heldout_examples BIGINT NOT NULL, heldout_loss DOUBLE NOT NULL, accuracy DOUBLE,
    bytes_per_candidate DOUBLE, feature_pass_seconds DOUBLE
)"""
# Student t quantiles t(0.975, df) for df = 1..30 (two-sided 95%); beyond 30 seeds the normal 1.96.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
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
