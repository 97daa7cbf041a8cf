"""DuckDB tables: candidate_scores and selections, replaced atomically per (target, method)."""

from __future__ import annotations

import polars as pl
from dagster_duckdb import DuckDBResource

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


class ScoreStore(DuckDBResource):
    """The one DuckDB file. Only unpartitioned, single-step assets write it, so
    parallel shard steps never contend for it (they write their own files)."""

    def _replace(self, table: str, ddl: str, df: pl.DataFrame, where: dict[str, str]) -> None:
        cond = " AND ".join(f"{k} = ?" for k in where)
        with self.get_connection() as conn:
            conn.execute(ddl)
            conn.execute("BEGIN TRANSACTION")
            try:
                conn.execute(f"DELETE FROM {table} WHERE {cond}", list(where.values()))
                conn.register("incoming", df.to_arrow())
                cols = ", ".join(df.columns)
                conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM incoming")
                conn.unregister("incoming")
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise

    def replace_scores(self, target: str, method: str, df: pl.DataFrame) -> None:
        self._replace("candidate_scores", SCORES_DDL, df, {"target": target, "method": method})

    def replace_subtask_scores(self, target: str, method: str, df: pl.DataFrame) -> None:
        self._replace("subtask_scores", SUBTASK_DDL, df, {"target": target, "method": method})

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

    def replace_evaluations(self, df: pl.DataFrame) -> None:
        """Replace the whole ``evaluations`` table (fine-tune results) in one transaction."""
        with self.get_connection() as conn:
            conn.execute(EVALUATIONS_DDL)
            conn.execute("BEGIN TRANSACTION")
            try:
                conn.execute("DELETE FROM evaluations")
                conn.register("incoming_evaluations", df.to_arrow())
                cols = ", ".join(df.columns)
                conn.execute(f"INSERT INTO evaluations ({cols}) SELECT {cols} FROM incoming_evaluations")
                conn.unregister("incoming_evaluations")
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise


EVALUATIONS_DDL = """
CREATE TABLE IF NOT EXISTS evaluations (
    target VARCHAR NOT NULL, method VARCHAR NOT NULL, train_examples BIGINT NOT NULL,
    heldout_examples BIGINT NOT NULL, heldout_loss DOUBLE NOT NULL, accuracy DOUBLE,
    bytes_per_candidate DOUBLE, feature_pass_seconds DOUBLE
)"""
