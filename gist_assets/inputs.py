"""candidate_pool and target_sets: the inputs, validated and stored as Parquet."""

import json
import random
from collections import Counter
from typing import cast

import dagster as dg
import polars as pl

from gist_core import targets as target_loaders
from gist_core.data import file_signatures, read_candidates
from gist_demo import synthetic
from gist_resources import ArtifactStore

from .config import CandidatePoolConfig, TargetSetsConfig
from .partitions import candidate_shards, shard_keys_for_files
from .plots import md_table
from .versions import data_version, fingerprint, rows_fingerprint


@dg.asset(group_name="inputs", code_version="2", kinds={"polars", "parquet"})
def candidate_pool(
    context: dg.AssetExecutionContext, config: CandidatePoolConfig, storage: ArtifactStore
) -> dg.MaterializeResult:
    """The candidate pool: validated, deduplicated, stable ids, a source per row, sharded."""
    if config.shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {config.shard_size}")
    patterns = list(config.paths)
    if not patterns:
        out = storage.embedded_data_dir()
        synthetic.write_pool(out, n_examples=config.embedded_pool_size, seed=config.seed)
        patterns = [str(out / "train" / "processed" / "*" / "*_data.jsonl")]
        context.log.info(f"no candidate paths configured: using the embedded pool under {out}")
    rows, report = read_candidates(patterns, on_bad_record=config.on_bad_record)
    if not rows:
        raise ValueError(f"no usable candidates in {patterns} ({report.skipped} records skipped)")

    prefixes = shard_keys_for_files(report.files)
    per_file: Counter = Counter()
    shards = []
    for r in rows:
        shards.append(f"{prefixes[r.file]}-{per_file[r.file] // config.shard_size:04d}")
        per_file[r.file] += 1
    df = pl.DataFrame(
        {
            "candidate_id": [r.candidate_id for r in rows],
            "source": [r.source for r in rows],
            "shard": shards,
            "file": [r.file for r in rows],
            "line": [r.line for r in rows],
            "format": [r.format for r in rows],
            "messages": [json.dumps(r.messages, ensure_ascii=False) for r in rows],
            "original": [r.original for r in rows],
            "n_chars": [sum(len(m["content"]) for m in r.messages) for r in rows],
        }
    )
    keys = sorted(set(shards))
    shard_versions = {
        k: rows_fingerprint(part["candidate_id"], part["source"], part["messages"])
        for (k,), part in df.group_by("shard", maintain_order=True)
    }
    version = fingerprint(sorted(shard_versions.items()))
    storage.write_pool(df, {"version": version, "shards": shard_versions, "files": file_signatures(report.files)})

    existing = set(context.instance.get_dynamic_partitions(candidate_shards.name))
    new = [k for k in keys if k not in existing]
    if new:
        context.instance.add_dynamic_partitions(candidate_shards.name, new)
    for gone in sorted(existing - set(keys)):
        context.instance.delete_dynamic_partition(candidate_shards.name, gone)
    context.log.info(
        f"{df.height} candidates in {len(keys)} shards ({len(new)} new, {len(existing - set(keys))} removed)"
    )

    per_source = df.group_by("source").agg(pl.len().alias("rows")).sort("source")
    lengths = df["n_chars"]
    sample = df.sample(n=min(5, df.height), seed=config.seed).select("candidate_id", "source", "messages")
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "rows": df.height,
            "files": len(report.files),
            "shards": len(keys),
            "new_shards": len(new),
            "duplicates_dropped": report.duplicates_dropped,
            "records_skipped": report.skipped,
            "skip_reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in report.skip_reasons) or "(none)"),
            "ids_rederived": report.ids_rederived,
            "rows_per_source": dg.MetadataValue.md(md_table(per_source.to_dicts(), limit=100)),
            # polars types a Series' aggregates as any Python value; n_chars is an integer column
            "chars_mean": float(cast(float, lengths.mean())),
            "chars_p50": float(cast(float, lengths.median())),
            "chars_max": int(cast(int, lengths.max())),
            "sample": dg.MetadataValue.md(md_table(sample.to_dicts())),
            "path": dg.MetadataValue.path(str(storage.pool_file())),
        },
    )


def split_heldout(examples: list[dict], fraction: float, seed: int) -> list[str]:
    """Seeded per-subtask split into 'basis' and 'heldout'.

    An example's own ``split`` (custom JSONL) is kept. Otherwise, with ``fraction > 0``,
    each subtask of >= 2 examples holds out ``fraction`` of them, at least one, and keeps
    at least one in the basis; a target whose subtasks all have one example holds out one
    of them (seeded), so that every target of >= 2 examples has a held-out example.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    split = [e.get("split") or "basis" for e in examples]
    by_target: dict[str, dict[str, list[int]]] = {}
    for i, e in enumerate(examples):
        if e.get("split") is None:
            by_target.setdefault(e["target"], {}).setdefault(e["subtask"], []).append(i)
    if fraction == 0:
        return split
    for target in sorted(by_target):
        for subtask in sorted(by_target[target]):
            idx = by_target[target][subtask]
            if len(idx) < 2:
                continue
            n_out = min(max(1, int(fraction * len(idx))), len(idx) - 1)
            rng = random.Random(f"{seed}/{target}/{subtask}")
            for i in rng.sample(idx, n_out):
                split[i] = "heldout"
        idx = sorted(i for part in by_target[target].values() for i in part)
        if len(idx) >= 2 and all(split[i] == "basis" for i in idx):
            split[random.Random(f"{seed}/{target}").choice(idx)] = "heldout"
    return split


def check_splits(examples: list[dict], split: list[str], fraction: float, sources: dict[str, str]) -> None:
    """Every target needs a basis example (target_gradients) and, when fraction > 0, a held-out one (evaluation)."""
    for target in sorted({e["target"] for e in examples}):
        got = Counter(s for e, s in zip(examples, split, strict=False) if e["target"] == target)
        n, where = sum(got.values()), sources[target]
        if not got["basis"]:
            raise ValueError(
                f"target {target!r} ({where}) has no basis examples ({n} examples, all held out); "
                'mark at least one example "split": "basis"'
            )
        if fraction > 0 and not got["heldout"]:
            raise ValueError(
                f"target {target!r} ({where}) has no held-out examples ({n} example(s)) while heldout_fraction="
                f'{fraction}: the evaluation needs at least one. Add examples, mark some "split": "heldout" '
                "in a JSONL target file, or set target_sets heldout_fraction: 0"
            )


@dg.asset(group_name="inputs", code_version="2", kinds={"polars", "parquet"})
def target_sets(
    context: dg.AssetExecutionContext, config: TargetSetsConfig, storage: ArtifactStore
) -> dg.MaterializeResult:
    """Target examples (target, subtask, prompt, completion) with a seeded basis/held-out split."""
    specs = [s.model_dump() for s in config.targets]
    if not specs:
        paths = synthetic.write_targets(storage.embedded_data_dir(), seed=config.seed)
        specs = [{"name": name, "format": "jsonl", "path": str(p)} for name, p in sorted(paths.items())]
        context.log.info(f"no targets configured: using the embedded targets {sorted(paths)}")
    names = [s["name"] for s in specs]
    # Validated here, before any model work, not when target_gradients writes files named after them.
    for name in names:
        target_loaders.check_target_name(name)
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be unique, got {names}")
    examples: list[dict] = []
    for spec in specs:
        loaded = target_loaders.load_target(spec)
        if not loaded:
            raise ValueError(f"target {spec['name']!r} ({spec['path']}) has no examples")
        examples.extend(loaded)
    split = split_heldout(examples, config.heldout_fraction, config.seed)
    check_splits(examples, split, config.heldout_fraction, {s["name"]: s["path"] for s in specs})
    df = pl.DataFrame([{k: v for k, v in e.items() if k != "split"} for e in examples]).with_columns(
        pl.Series("split", split)
    )
    version = rows_fingerprint(
        df["example_id"], df["target"], df["subtask"], df["prompt"], df["completion"], df["split"]
    )
    # The configured files' state, so that a later run can tell they were edited (the embedded ones are
    # written by this asset).
    files = target_loaders.source_files([spec.path for spec in config.targets])
    storage.write_targets(df, version, file_signatures(files))
    counts = (
        df.group_by("target", "subtask", "split")
        .agg(pl.len().alias("n"))
        .pivot(on="split", index=["target", "subtask"], values="n")
        .fill_null(0)
        .sort("target", "subtask")
    )
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "targets": dg.MetadataValue.json(names),
            "examples": df.height,
            "heldout": int((df["split"] == "heldout").sum()),
            "counts_per_subtask": dg.MetadataValue.md(md_table(counts.to_dicts(), limit=200)),
            "sample": dg.MetadataValue.md(
                md_table(df.head(3).select("target", "subtask", "prompt", "completion").to_dicts())
            ),
            "path": dg.MetadataValue.path(str(storage.targets_file())),
        },
    )
