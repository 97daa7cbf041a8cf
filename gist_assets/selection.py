"""selected_subset: per target, method and budget, the chosen candidates exported for fine-tuning (JSONL in
the pool's own format, chat ``messages`` JSONL, Parquet) with a manifest that traces them to the model,
checkpoints and basis that chose them. ``write_selections`` also serves the baselines' selections."""

import contextlib
from collections.abc import Iterator

import dagster as dg
import numpy as np
import polars as pl

from gist_core.selection import budgets, select, selection_size
from gist_resources import ArtifactStore, ScoreStore

from .config import SCORING_METHODS, SelectionConfig
from .inputs import candidate_pool
from .plots import histogram, md_table
from .scores import METHOD, candidate_scores
from .steps import DUCKDB_POOL
from .versions import asset_fingerprint, data_version

MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
# Selected rows converted and written at a time: the decoded messages of a 5% budget of 10M candidates
# would otherwise be held whole.
EXPORT_CHUNK_ROWS = 50_000


def choose(config: SelectionConfig, scores: pl.DataFrame, subtask_scores: pl.DataFrame | None) -> pl.DataFrame:
    """The configured policy (``gist_core.selection.select``) on every scored row of one (target, method): the
    chosen rows, best first, with their ``selection_rank``."""
    size = selection_size(scores.height, config.fraction, config.n)
    wide = None
    if config.strategy == "round_robin":
        if subtask_scores is None:
            raise ValueError("round_robin needs the per-subtask scores")
        long = subtask_scores.pivot(on="subtask", index="candidate_id", values="score")
        wide = scores.select("candidate_id").join(long, on="candidate_id", how="left").drop("candidate_id").to_numpy()
    picked = select(
        scores["score"].to_numpy(),
        scores["candidate_id"],
        size,
        strategy=config.strategy,
        sources=scores["source"].to_list() if config.max_per_source is not None else None,
        max_per_source=config.max_per_source,
        subtask_scores=wide,
    )
    return scores.select(pl.all().gather(picked)).with_columns(pl.Series("selection_rank", np.arange(1, size + 1)))


def stage_budget(
    score_store: ScoreStore, target: str, method: str, label: str, config: SelectionConfig, n_scored: int
) -> None:
    """Stage the selection of one (target, method) at the one budget of ``config`` (``label``) in the score
    store, out of its ``n_scored`` scored candidates.

    The plain top-n (strategy 'top', no per-source cap) is chosen in DuckDB and never held in memory. The
    per-source cap and round-robin can reach below rank n: they read every row and choose in Python.
    """
    if config.strategy == "top" and config.max_per_source is None:
        score_store.stage_top(target, method, label, selection_size(n_scored, config.fraction, config.n))
    else:
        subtasks = score_store.read_subtask_scores(target, method) if config.strategy == "round_robin" else None
        score_store.stage_rows(target, method, label, choose(config, score_store.read_scores(target, method), subtasks))


def training_messages_column(messages_json: pl.Series) -> pl.Series:
    """Pool records' conversations (JSON text) as chat ``messages`` for SFT trainers (open-instruct, TRL).

    Turns after the last assistant turn carry no loss (only assistant tokens are trained on)
    and TRL's conversational format ends with the assistant, so they are left out.
    """
    turns = messages_json.str.json_decode(pl.List(MESSAGE))
    frame = pl.DataFrame({"m": turns}).with_columns(
        last=pl.col("m")
        .list.eval(pl.element().struct.field("role") == "assistant")
        .list.eval(pl.arg_where(pl.element()))
        .list.last()
    )
    return frame.select(pl.col("m").list.head(pl.col("last") + 1))["m"].alias("messages")


def training_messages(messages_json: str) -> list[dict]:
    """One record's ``training_messages_column``."""
    return training_messages_column(pl.Series([messages_json], dtype=pl.Utf8))[0].to_list()


def selection_budgets(config: SelectionConfig) -> list[tuple[str, SelectionConfig]]:
    """(label, the config with that one budget) for every configured budget."""
    return [
        (label, config.model_copy(update={"fraction": p, "n": n})) for label, p, n in budgets(config.fraction, config.n)
    ]


def export_chunks(parts: Iterator[pl.DataFrame]) -> Iterator[tuple[pl.Series, pl.DataFrame, pl.DataFrame]]:
    """A selection's rows, a chunk at a time with their pool text (``original``, ``messages``), as the three
    exports take them: the original records' JSON lines, (id, source, messages) for the chat JSONL, and the
    Parquet rows."""
    for part in parts:
        messages = training_messages_column(part["messages"])
        yield (
            part["original"],
            pl.DataFrame([part["candidate_id"].alias("id"), part["source"], messages]),
            # Parquet: the chat messages (a list of {role, content} structs) beside the scores.
            part.with_columns(messages),
        )


def budget_manifest(
    storage: ArtifactStore,
    staged: dict,
    n_scored: int,
    config: SelectionConfig,
    label: str,
    target: str,
    method: str,
    bases: dict,
    ref: dict,
    warm: dict,
    database: str,
    newer_than_warmup: int | None,
) -> dict:
    """What one budget's selection (``staged``: ``ScoreStore.staged_summary``) is and where it came from (paths
    relative to the storage root)."""
    used = {c["name"] for c in bases["checkpoints"]}
    manifest = {
        "target": target,
        "method": method,
        "budget": label,
        "config": config.model_dump(),
        "selected": staged["selected"],
        "scored_candidates": n_scored,
        "score_cut": staged["score_cut"],
        "counts_per_source": staged["counts_per_source"],
        "model": storage.relative(storage.model_path(ref)),
        "checkpoints": storage.checkpoint_entries([c for c in warm["checkpoints"] if c["name"] in used]),
        "basis": {
            c: {**v, "dir": storage.relative(storage.basis_dir(c, target))} for c, v in bases["targets"][target].items()
        }
        if method in SCORING_METHODS  # every GIST method selects in the target's basis
        else None,
        "artifacts": storage.provenance(database),
    }
    if newer_than_warmup is not None:
        manifest["selected_newer_than_warmup"] = newer_than_warmup
    return manifest


def write_selections(
    context,
    config: SelectionConfig,
    storage: ArtifactStore,
    score_store: ScoreStore,
    methods: list[str],
    score_groups: list[str],
) -> dg.MaterializeResult:
    """Per target, method and budget: the chosen candidates as JSONL in their own format, as chat
    ``messages`` JSONL, Parquet, and a manifest, under ``selections/<target>/<method>/<budget>/``.

    ``score_groups``: the score records (``ArtifactStore.write_scores_record``) the selections are made from.
    """
    bases = storage.read_basis_manifest()
    pool_mix = storage.pool_source_counts()
    ref, warm = storage.read_model_ref(), storage.read_warmup()
    warmup_ids = storage.warmup_pool_ids_file()
    targets = sorted(bases["targets"])
    per_budget = selection_budgets(config)
    meta: dict = {"budgets": dg.MetadataValue.json([label for label, _ in per_budget])}

    def write_target(target: str, method: str) -> dict:
        """Every budget of one (target, method); its metadata."""
        try:
            return stage_export_publish(target, method)
        except BaseException:
            # Nothing of a failed selection stays staged (best effort: the next publish drops leftovers too).
            with contextlib.suppress(Exception):
                score_store.drop_staged(target, method)
            raise

    def stage_export_publish(target: str, method: str) -> dict:
        target_meta, cuts, sizes = {}, {}, {}
        n_scored = score_store.count_scores(target, method)
        if n_scored == 0:
            raise ValueError(f"no {method!r} scores for target {target!r}; materialize its scores asset first")
        # Every budget is chosen before anything is written: a bad size touches no file.
        for label, one in per_budget:
            stage_budget(score_store, target, method, label, one, n_scored)
        with storage.selection_writer(target, method) as writer:
            for label, one in per_budget:
                staged = score_store.staged_summary(target, method, label, warmup_ids)
                newer = staged.get("absent_from_ids_file")
                manifest = budget_manifest(
                    storage, staged, n_scored, one, label, target, method, bases, ref, warm, score_store.database, newer
                )
                # Only the chosen records' text is read from the pool, streamed a chunk at a time.
                with_text = score_store.staged_with_file_columns(
                    target, method, label, str(storage.pool_file()), ["original", "messages"], EXPORT_CHUNK_ROWS
                )
                manifest = writer.write_budget(label, export_chunks(with_text), manifest)
                target_meta.update(
                    budget_metadata(manifest, staged, pool_mix, label, target, method, writer.manifest_location(label))
                )
                cuts[label], sizes[label] = manifest["score_cut"], staged["selected"]
        score_store.publish_selection(target, method, sizes)
        if method == METHOD:  # one plot per target, every budget's cut on it
            title = f"{target}: scores"
            target_meta[f"{target}/histogram"] = histogram(*score_store.score_histogram(target, method), title, cuts)
        return target_meta

    for method in methods:
        for target in targets:
            meta.update(write_target(target, method))
    removed = storage.remove_selections_except(targets, methods)
    for method in methods:
        score_store.delete_selections_except(targets, method)
    if removed:
        context.log.info(f"removed the selections of targets no longer configured: {removed}")
    meta["removed_unconfigured"] = dg.MetadataValue.json(removed)
    inputs = [storage.read_scores_record(group, "scores")["version"] for group in score_groups]
    version = asset_fingerprint(context, inputs, storage.pool_record()["version"], methods)
    return dg.MaterializeResult(data_version=data_version(version), metadata=meta)


def budget_metadata(
    manifest: dict,
    staged: dict,
    pool_mix: dict,
    label: str,
    target: str,
    method: str,
    manifest_path,
) -> dict:
    """The metadata a person reads for one selection: size, source mix, the top rows (exact GIST)."""
    key = (target if method == METHOD else f"{target}/{method}") + f"/{label}"
    size, mix = staged["selected"], manifest["counts_per_source"]
    mix_rows = [
        {
            "source": s,
            "selected": mix.get(s, 0),
            "selected_share": round(mix.get(s, 0) / size, 3),
            "pool_share": round(n / sum(pool_mix.values()), 3),
        }
        for s, n in sorted(pool_mix.items())
    ]
    meta = {
        f"{key}/selected": size,
        f"{key}/source_mix": dg.MetadataValue.md(md_table(mix_rows, limit=100)),
        f"{key}/manifest": dg.MetadataValue.path(str(manifest_path)),
    }
    if "selected_newer_than_warmup" in manifest:
        meta[f"{key}/selected_newer_than_warmup"] = manifest["selected_newer_than_warmup"]
    if method == METHOD:
        meta[f"{key}/top"] = dg.MetadataValue.md(md_table(staged["head"].to_dicts()))
    return meta


@dg.asset(
    group_name="gist",
    deps=[candidate_scores, candidate_pool],
    code_version="7",
    pool=DUCKDB_POOL,
    kinds={"duckdb", "parquet"},
    automation_condition=dg.AutomationCondition.eager(),
)
def selected_subset(
    context: dg.AssetExecutionContext, config: SelectionConfig, storage: ArtifactStore, score_store: ScoreStore
) -> dg.MaterializeResult:
    """Per target, budget and scored GIST method (candidate_scores' methods): the selection as JSONL (own format
    and chat messages), Parquet, and a manifest."""
    methods = storage.read_scores_record(METHOD, "candidate_scores").get("methods", [METHOD])
    return write_selections(context, config, storage, score_store, methods, [METHOD])
