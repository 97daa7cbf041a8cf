"""A small run config of the embedded default, so the whole graph runs in seconds."""

SMALL = {
    "ops": {
        "candidate_pool": {"config": {"embedded_pool_size": 480, "shard_size": 60}},
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
