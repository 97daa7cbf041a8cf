"""A small run config of the embedded default, so the whole graph runs in seconds."""

import json
from pathlib import Path

from gist_demo import synthetic

SMALL = {
    "ops": {
        "candidate_pool": {"config": {"embedded_pool_size": 240, "shard_size": 30}},
        "base_model": {
            "config": {
                "vocab_size": 400,
                "hidden_size": 32,
                "layers": 2,
                "heads": 2,
                "kv_heads": 1,
                "pretrain_steps": 40,
            }
        },
        "warmup_checkpoint": {"config": {"fraction": 0.1, "epochs": 2}},
        "spectral_basis": {"config": {"k": 8}},
        "selected_subset": {"config": {"fraction": [0.05, 0.1]}},  # two budgets
        "selection_evaluation": {"config": {"epochs": 1, "seeds": [0, 1]}},
    }
}

# Smaller still: 160 candidates (20 per skill file, 8 shards), the whole graph in well under a minute.
TINY = {"ops": {**SMALL["ops"], "candidate_pool": {"config": {"embedded_pool_size": 160, "shard_size": 40}}}}
# The exact path alone (no sketch pass), for tests that are not about the sketches.
TINY_EXACT = {"ops": {**TINY["ops"], "candidate_scores": {"config": {"methods": ["gist"]}}}}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def two_file_pool(folder: Path, shard_size: int = 40, n: int = 160) -> dict:
    """The embedded generator's first ``n`` records written as two JSONL files in ``folder`` (fewer shards, so
    fewer steps, than the embedded pool's file per skill); returns the candidate_pool entry reading them."""
    records = synthetic.generate_pool(n, seed=0)
    for part in range(2):
        write_jsonl(folder / f"part_{part}.jsonl", records[part::2])
    return {"config": {"paths": [str(folder / "*.jsonl")], "shard_size": shard_size}}
