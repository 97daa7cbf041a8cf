"""selection_evaluation: fine-tune on every selection, judge it on the target's held-out examples.

How a selection is judged: LoRA fine-tune the base model on it, then
the target's held-out loss (examples never used to build the basis) and, for
multiple-choice targets, accuracy. Every method and budget found in the DuckDB
``selections`` table (gist and whatever baselines were selected) is fine-tuned with
the same hyperparameters, once per seed of ``seeds``: the seed drives the example
order, the LoRA init and, for ``random``, the draw itself (seed s takes the top of
``random_scores(ids, s)`` at the selection's size, so one random fine-tune is one
random sample). Two references per target: ``base`` (no fine-tuning, one row, no
seed) and ``full_pool`` (the whole pool, once per seed; target-independent, so
trained once per seed and judged on every target). Identical training sets (e.g. a
random baseline shared by all targets) are trained once per seed: the fine-tune
depends only on the set of candidates, not on their rank order.

``evaluation_summary`` (a DuckDB view, also the asset's metadata) gives per target,
method and budget the mean and standard deviation over seeds and the paired
difference to ``random`` (same budget) and to ``full_pool`` with a 95% t interval
over seeds, and a verdict.

Next to the quality, each method's cost as stored: bytes of features per scored
candidate and the seconds of its feature pass (``ArtifactStore.feature_costs``); None
where a method keeps no features.
"""

import json
import math
import time
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from gist_core.data import encode_messages
from gist_core.evaluate import FinetuneSpec, HeldoutSet, evaluate_heldout, finetune_and_evaluate_many, prepare_heldout
from gist_core.selection import capped_top
from gist_core.warmup import LoraTrainConfig
from gist_resources import ArtifactStore, ComputeResource, ScoreStore

from .baselines import baseline_selections, random_scores
from .config import EvaluationConfig
from .inputs import candidate_pool, target_sets
from .model import base_model, chat_format
from .plots import budget_plot, md_table
from .selection import selected_subset
from .steps import DUCKDB_POOL, GPU_STEP_TAGS

BASE, FULL_POOL, RANDOM = "base", "full_pool", "random"
SCHEMA = {
    "target": pl.Utf8,
    "method": pl.Utf8,
    "budget": pl.Utf8,
    "seed": pl.Int64,
    "train_examples": pl.Int64,
    "heldout_examples": pl.Int64,
    "heldout_loss": pl.Float64,
    "accuracy": pl.Float64,
    "bytes_per_candidate": pl.Float64,
    "feature_pass_seconds": pl.Float64,
}


def finetune_spec(config: EvaluationConfig, target_modules: list[str], seed: int) -> FinetuneSpec:
    return FinetuneSpec(
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=tuple(target_modules),
        train=LoraTrainConfig(
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            effective_batch_size=config.effective_batch_size,
            micro_batch_size=min(config.micro_batch_size, config.effective_batch_size),
            seed=seed,
        ),
    )


def heldout_sets(targets: pl.DataFrame, tokenizer, max_length: int, chat_format: str = "tulu") -> dict[str, HeldoutSet]:
    """Every target's held-out examples, encoded; a clear error for a target without any."""
    out, empty = {}, []
    for target in sorted(targets["target"].unique().to_list()):
        held = targets.filter((pl.col("target") == target) & (pl.col("split") == "heldout"))
        if held.height == 0:
            empty.append(target)
            continue
        out[target] = prepare_heldout(
            tokenizer,
            held["prompt"].to_list(),
            held["completion"].to_list(),
            max_length,
            name=f"target {target!r}",
            chat_format=chat_format,
        )
    if empty:
        raise ValueError(
            f"targets {empty} have no held-out examples, so nothing can judge the selections; set "
            "target_sets.heldout_fraction > 0 (e.g. 0.2) and re-materialize target_sets and what "
            "follows"
        )
    return out


def read_selections(score_store: ScoreStore) -> pl.DataFrame:
    """(target, method, budget, candidate_id) of every selection in DuckDB."""
    df = score_store.read_selections()
    if df is None:
        raise ValueError(f"{score_store.database} has no selections; materialize selected_subset first")
    return df


def random_draw(
    score_store: ScoreStore, storage: ArtifactStore, target: str, budget: str, size: int, seed: int
) -> list[str]:
    """Seed ``seed``'s random selection of ``size`` for (target, budget): the top of ``random_scores(ids, seed)``
    over the candidates the random baseline scored, under the selection's own per-source cap."""
    scored = score_store.read_scores(target, RANDOM)
    config = storage.read_selection_manifest(target, RANDOM, budget)["config"]
    ids = scored["candidate_id"]
    picked = capped_top(
        random_scores(ids.to_list(), seed), ids, size, scored["source"].to_list(), config["max_per_source"]
    )
    return ids.gather(picked).to_list()


def plan_finetunes(
    selections: pl.DataFrame, targets: list[str], pool_ids: list[str], include_full_pool: bool, seeds: list[int], draw
) -> dict[tuple[int, tuple[str, ...]], list[tuple[str, str, str | None]]]:
    """Group (target, method, budget) by seed and training set: one fine-tune per distinct (seed, set).

    ``draw(target, budget, size, seed)`` gives the random baseline's candidates for a seed.
    """
    plan: dict = {}
    groups = sorted(
        selections.filter(pl.col("target").is_in(targets)).group_by("target", "method", "budget"), key=lambda kv: kv[0]
    )
    for seed in seeds:
        if include_full_pool:
            plan.setdefault((seed, tuple(sorted(pool_ids))), []).extend((t, FULL_POOL, None) for t in targets)
        for (target, method, budget), df in groups:
            ids = df["candidate_id"].to_list()
            if method == RANDOM:
                ids = draw(target, budget, len(ids), seed)
            plan.setdefault((seed, tuple(sorted(ids))), []).append((target, method, budget))
    return plan


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return round(v, 4) if isinstance(v, float) else v


@dg.asset(
    group_name="evaluation",
    deps=[selected_subset, baseline_selections, target_sets, base_model, candidate_pool],
    code_version="2",
    pool=DUCKDB_POOL,
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "duckdb"},
)
def selection_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    storage: ArtifactStore,
    compute: ComputeResource,
    score_store: ScoreStore,
) -> dg.MaterializeResult:
    """Fine-tune on each method's selection at each budget and seed (same settings), then held-out loss and
    accuracy per target, and the summary over seeds."""
    ref = storage.read_model_ref()
    tokenizer = compute.load_tokenizer(storage.model_path(ref))
    pool = storage.read_pool(columns=["candidate_id", "messages", "shard"])
    heldouts = heldout_sets(storage.read_targets(), tokenizer, ref["max_length"], chat_format(ref))
    targets = sorted(heldouts)
    for target, held in heldouts.items():
        if held.dropped:
            context.log.warning(
                f"{target}: {held.dropped} held-out examples have no completion tokens within "
                f"max_length={ref['max_length']} and are not judged"
            )
    selections = read_selections(score_store)
    stray = sorted(set(selections["target"].unique().to_list()) - set(targets))
    if stray:
        context.log.warning(f"selections of targets {stray} are not in target_sets (stale); they are not evaluated")
    unknown = sorted(set(selections["candidate_id"].to_list()) - set(pool["candidate_id"].to_list()))
    if unknown:
        raise ValueError(
            f"{len(unknown)} selected candidates (e.g. {unknown[:3]}) are not in the current pool; "
            "re-materialize the scores and selected_subset"
        )
    methods = sorted(selections["method"].unique().to_list())
    for target in targets:
        have = selections.filter(pl.col("target") == target)["method"].unique().to_list()
        if not have:
            context.log.warning(f"target {target!r} has no selections; only the references are evaluated")

    messages = dict(zip(pool["candidate_id"].to_list(), pool["messages"].to_list(), strict=False))
    encoded: dict = {}

    def train_set(ids):
        for i in ids:
            if i not in encoded:
                encoded[i] = encode_messages(tokenizer, json.loads(messages[i]), ref["max_length"], chat_format(ref))
        return [encoded[i] for i in ids if encoded[i].n_label_tokens > 0]

    device, dtype = compute.torch_device(), compute.autocast_dtype()
    pad_id, max_tokens = tokenizer.pad_token_id, compute.max_tokens_per_batch
    results: dict[tuple[str, str, str | None, int | None], dict] = {}

    # The base model: no fine-tuning (no seed), judged on every target. The fine-tunes put LoRA where the
    # warmup did.
    start = time.perf_counter()
    modules = storage.read_warmup()["target_modules"]
    model = compute.load_model(storage.model_path(ref))
    for target, held in heldouts.items():
        results[(target, BASE, None, None)] = {
            **evaluate_heldout(model, held, device, pad_id, dtype, max_tokens),
            "train_examples": 0,
        }
    del model
    context.log.info(
        f"base model (no fine-tuning) judged on {len(targets)} targets in {time.perf_counter() - start:.1f}s"
    )

    plan = plan_finetunes(
        selections,
        targets,
        list(messages),
        config.include_full_pool,
        config.seeds,
        lambda t, b, n, seed: random_draw(score_store, storage, t, b, n, seed),
    )
    spec = finetune_spec(config, modules, config.seeds[0])
    context.log.info(
        f"{len(plan)} fine-tunes for {sum(len(v) for v in plan.values())} (target, method, budget, "
        f"seed) cells, methods {methods}; lr {spec.train.learning_rate:g}, {config.epochs} epochs, "
        f"r={config.lora_r}, seeds {config.seeds}"
    )
    for n, ((seed, ids), cells) in enumerate(plan.items(), 1):
        train = train_set(ids)
        names = ", ".join(f"{t}/{m}" + (f"/{b}" if b else "") for t, m, b in cells)
        if not train:
            raise ValueError(
                f"the selection of {names} has no example with completion tokens within max_length={ref['max_length']}"
            )
        start = time.perf_counter()
        context.log.info(f"fine-tune {n}/{len(plan)}: {names}, seed {seed} ({len(train)} examples)")
        judged = {t: heldouts[t] for t in sorted({t for t, _, _ in cells})}
        out = finetune_and_evaluate_many(
            lambda: compute.load_model(storage.model_path(ref)),
            train,
            judged,
            finetune_spec(config, modules, seed),
            device,
            pad_id,
            dtype,
            max_tokens,
            log=context.log.debug,
        )
        for target, method, budget in cells:
            results[(target, method, budget, seed)] = out[target]
        summary = "; ".join(
            f"{t} loss {out[t]['heldout_loss']:.4f}"
            + ("" if out[t]["accuracy"] is None else f" acc {out[t]['accuracy']:.3f}")
            for t in judged
        )
        context.log.info(f"fine-tune {n}/{len(plan)} done in {time.perf_counter() - start:.1f}s: {summary}")

    shards = sorted(pool["shard"].unique().to_list())
    costs = {m: storage.feature_costs(m, shards) for m in methods}
    rows = []
    for (target, method, budget, row_seed), r in results.items():
        cost = costs.get(method, (None, None))
        rows.append(
            {
                "target": target,
                "method": method,
                "budget": budget,
                "seed": row_seed,
                "train_examples": r["train_examples"],
                "heldout_examples": r["heldout_examples"],
                "heldout_loss": r["heldout_loss"],
                "accuracy": r["accuracy"],
                "bytes_per_candidate": cost[0],
                "feature_pass_seconds": cost[1],
            }
        )
    bad = [(r["target"], r["method"], r["budget"], r["seed"]) for r in rows if not np.isfinite(r["heldout_loss"])]
    if bad:
        raise ValueError(f"non-finite held-out loss for {bad}; lower evaluation learning_rate")
    df = pl.DataFrame(rows, schema=SCHEMA).sort("target", "budget", "heldout_loss", "method", "seed", nulls_last=True)
    score_store.replace_evaluations(df)
    summary_df = score_store.read_evaluation_summary()
    figure = budget_plot(summary_df.to_dicts())
    plot_file = storage.write_evaluation(summary_df, figure.png)

    meta: dict[str, Any] = {
        "summary": dg.MetadataValue.md(
            md_table([{k: _fmt(v) for k, v in r.items()} for r in summary_df.to_dicts()], limit=1000)
        ),
        "heldout_loss_by_budget": figure.markdown,
        "heldout_loss_by_budget_png": dg.MetadataValue.path(str(plot_file)),
        "comparison": dg.MetadataValue.md(
            md_table([{k: _fmt(v) for k, v in r.items()} for r in df.to_dicts()], limit=1000)
        ),
        "rows": df.height,
        "fine_tunes": len(plan),
        "methods": dg.MetadataValue.json(methods),
        "seeds": dg.MetadataValue.json(config.seeds),
        "heldout_examples": dg.MetadataValue.json({t: len(h) for t, h in heldouts.items()}),
        "hyperparameters": dg.MetadataValue.json(
            {
                "epochs": config.epochs,
                "learning_rate": spec.train.learning_rate,
                "lora_r": spec.lora_r,
                "lora_alpha": spec.lora_alpha,
                "lora_dropout": spec.lora_dropout,
                "target_modules": list(spec.target_modules),
                "effective_batch_size": spec.train.effective_batch_size,
                "micro_batch_size": spec.train.micro_batch_size,
                "seeds": config.seeds,
                "include_full_pool": config.include_full_pool,
            }
        ),
        "database": dg.MetadataValue.path(score_store.database),
    }
    for row in summary_df.filter(pl.col("better_than_random").is_not_null()).to_dicts():
        meta[f"{row['target']}/{row['budget']}/{row['method']}/better_than_random"] = row["better_than_random"]
    return dg.MaterializeResult(metadata=meta)
