"""A small run config of the embedded default, so the whole graph runs in seconds."""

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
