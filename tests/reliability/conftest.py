"""Fixtures of the reliability matrix (tests/reliability): a small graph on user data, built on the
session's `small_run` (whose root is only ever copied, never written)."""

import os
import shutil

import dagster as dg
import pytest

from reliability_util import conv, materialize, user_error, write_jsonl

LONG_REPLY = "once upon a time there was a very long answer " * 60  # far over max_length=128 tokens
LONG_PROMPT = "please read all of this before you answer me " * 60  # pushes the reply past max_length


@pytest.fixture(scope="session")
def custom_graph(small_run, tmp_path_factory):
    """The small run's model and warmup, with a user pool and user targets that hit the edge cases:

    pool: normal records, one far longer than max_length (truncated, still scored), one whose reply is cut
    off entirely by truncation (excluded), two different records sharing the id "dup" (ids re-derived);
    targets: `single` (one basis example, by its explicit split) and `mixed` (subtask `sums` with 4 examples,
    `rare` with one), k=8.
    Runs with the working directory set to an empty folder, to check nothing is written outside the root.
    """
    base = tmp_path_factory.mktemp("custom_graph")
    root = base / "root"
    shutil.copytree(small_run["root"], root)
    (root / "gist.duckdb").unlink()  # a fresh score database: only this graph's methods and targets
    data = base / "data"
    pool_file = write_jsonl(
        data / "mypool.jsonl",
        [
            *[conv(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(6)],
            conv("Tell me a long story.", LONG_REPLY),  # line 7: truncated
            conv(LONG_PROMPT, "Yes."),  # line 8: cut off
            conv("Name a color.", "Blue.", id="dup"),  # line 9
            conv("Name a fruit.", "Apple.", id="dup"),  # line 10
            conv("Name an animal.", "Cat.", id="keep-me"),  # line 11
        ],
    )
    # One basis example (its own split fixes it), plus one held out: every target needs a held-out example.
    single = write_jsonl(
        data / "single.jsonl",
        [
            {"prompt": "What is 2 plus 2?", "completion": " 4", "subtask": "sums", "split": "basis"},
            {"prompt": "What is 3 plus 3?", "completion": " 6", "subtask": "sums", "split": "heldout"},
        ],
    )
    mixed = write_jsonl(
        data / "mixed.jsonl",
        [
            *[{"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}", "subtask": "sums"} for i in range(4)],
            {"prompt": "Spell cat backwards.", "completion": " tac", "subtask": "rare"},
        ],
    )
    ops = {
        "candidate_pool": {"paths": [str(pool_file)], "shard_size": 100},
        "target_sets": {
            "targets": [
                {"name": "single", "format": "jsonl", "path": str(single)},
                {"name": "mixed", "format": "jsonl", "path": str(mixed)},
            ],
            "heldout_fraction": 0.5,
        },
        "spectral_basis": {"k": 8},
        "selected_subset": {"fraction": 0.1},
    }
    cwd = base / "cwd"
    cwd.mkdir()
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        with dg.instance_for_test() as instance:
            prepare = materialize(
                ["candidate_pool", "target_sets", "target_gradients", "spectral_basis"], root, instance, ops
            )
            assert prepare.success, user_error(prepare)
            shards = sorted(instance.get_dynamic_partitions("candidate_shards"))
            assert shards == ["mypool-0000"]
            features = materialize(["candidate_features"], root, instance, partition_key=shards[0])
            assert features.success, user_error(features)
            select = materialize(["candidate_scores", "selected_subset"], root, instance, ops)
            assert select.success, user_error(select)
            yield {
                "root": root,
                "base": base,
                "cwd": cwd,
                "pool_file": pool_file,
                "instance": instance,
                "shards": shards,
                "ops": ops,
                "prepare": prepare,
                "features": features,
                "select": select,
            }
    finally:
        os.chdir(old_cwd)
