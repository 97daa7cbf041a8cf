"""Judge the selections: ``python -m gist_assets.compare`` (after ``make demo``).

For each target, LoRA fine-tune the base model (same seed and hyperparameters) on
the GIST selection, on a seeded random sample of the same size, and on the same
number of examples from the target's matching source when one is given, then report
the held-out target loss (examples never used to build the basis), and the base
model's loss without fine-tuning. Source precision is printed as a sanity indicator,
not the objective (DESIGN.md §7).
"""

import argparse
import json
import random
import sys

import duckdb
import polars as pl

from gist_core.evaluate import FinetuneSpec, compare_selections
from gist_core.synthetic import TARGET_SKILL
from gist_core.warmup import LoraTrainConfig
from gist_resources import ComputeResource, StorageResource

from .model import read_model_ref


def finetune_spec(embedded: bool, seed: int = 0) -> FinetuneSpec:
    lr = 1e-3 if embedded else 2e-5
    return FinetuneSpec(train=LoraTrainConfig(epochs=3, learning_rate=lr, effective_batch_size=16,
                                              micro_batch_size=16, seed=seed))


def evaluate_targets(storage: StorageResource, compute: ComputeResource, matching: dict[str, str] | None = None,
                     seed: int = 0, log=lambda _: None) -> list[dict]:
    ref = read_model_ref(storage)
    tokenizer = compute.load_tokenizer(ref["path"])
    pool = storage.read_parquet(storage.path("pool", "candidate_pool.parquet"), "candidate_pool")
    messages = dict(zip(pool["candidate_id"], pool["messages"]))
    source = dict(zip(pool["candidate_id"], pool["source"]))
    targets = storage.read_parquet(storage.path("targets", "target_sets.parquet"), "target_sets")
    spec = finetune_spec(ref["embedded"], seed)
    rows = []
    with duckdb.connect(str(storage.path("gist.duckdb")), read_only=True) as db:
        for target in sorted(targets["target"].unique()):
            held = targets.filter((pl.col("target") == target) & (pl.col("split") == "heldout"))
            chosen = [r[0] for r in db.execute("SELECT candidate_id FROM selections WHERE target = ? AND "
                                               "method = 'gist' ORDER BY rank", [target]).fetchall()]
            if not chosen:
                continue
            ids = {"gist": chosen, "random": random.Random(seed).sample(sorted(messages), len(chosen))}
            skill = (matching or {}).get(target)
            if skill:
                same = sorted(i for i in messages if source[i] == skill)
                ids["matching_source"] = random.Random(seed).sample(same, min(len(same), len(chosen)))
            ids["none"] = []
            result = compare_selections(
                lambda: compute.load_model(ref["path"]), tokenizer,
                {name: [json.loads(messages[i]) for i in sel] for name, sel in ids.items()},
                list(zip(held["prompt"], held["completion"])), spec, ref["max_length"],
                compute.torch_device(), log)
            for name, sel in ids.items():
                precision = sum(source[i] == skill for i in sel) / len(sel) if skill and sel else None
                rows.append({"target": target, "selection": name, "examples": len(sel),
                             "heldout_loss": round(result[name]["heldout_loss"], 4),
                             "matching_source_share": None if precision is None else round(precision, 3)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    storage = StorageResource(root=args.root)
    ref = read_model_ref(storage)
    rows = evaluate_targets(storage, ComputeResource(), TARGET_SKILL if ref["embedded"] else None, args.seed,
                            log=lambda m: print(m, file=sys.stderr))
    print("| target | selection | examples | held-out loss | matching-source share |")
    print("|---|---|---|---|---|")
    for r in rows:
        share = "" if r["matching_source_share"] is None else r["matching_source_share"]
        print(f"| {r['target']} | {r['selection']} | {r['examples']} | {r['heldout_loss']:.3f} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
