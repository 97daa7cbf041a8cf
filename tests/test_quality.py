"""GIST on the embedded default against a random selection of the same size, on held-out target loss
over 3 seeds at the 5% budget.

What holds, and is asserted: on every target GIST's mean loss is below the base model's and never
significantly above random's; over all (target, seed) pairs the paired difference to random has a 95%
interval below zero. What does not hold (docs/evaluation.md): per target, GIST beats random with an
interval that excludes zero on arithmetic_sums and geography, while word_reversal is a tie (the tiny
model barely learns to reverse words from any 200 examples: every method stays within 0.2 nats of the
base model there), and its means fall either way from run to run of the code.

The objective (docs/design.md): fine-tune on the selection, judge by the target's held-out loss
(examples never used to build the basis). Source share is printed as a sanity indicator only.
"""

import dagster as dg
import duckdb
import numpy as np
import pytest

from gist_assets.run import materialize, run_all, summary_markdown
from gist_demo.synthetic import TARGET_SKILL
from gist_resources import ScoreStore
from gist_resources.score_store import T975

# The evaluation's own defaults (3 seeds, the 5% budget of selected_subset); only random as a baseline.
EVAL = {
    "ops": {
        "baseline_scores": {"config": {"methods": ["random"]}},
        "selection_evaluation": {"config": {"include_full_pool": False}},
    }
}


@pytest.mark.slow
def test_gist_selection_beats_random_on_heldout_loss(tmp_path):
    root = str(tmp_path)
    # An in-memory instance: this test reads no run history, and SQLite's event writes cost seconds per run.
    with dg.DagsterInstance.ephemeral() as instance:
        # The embedded default, as `make demo`, less the sketch pass this test does not judge (suite time).
        run_all(
            {"ops": {"candidate_scores": {"config": {"methods": ["gist"]}}}},
            root,
            instance=instance,
            log=lambda _: None,
        )
        materialize(["baseline_scores", "baseline_selections", "selection_evaluation"], EVAL, instance, root)
    rows = ScoreStore(database=str(tmp_path / "gist.duckdb")).read_evaluation_summary().to_dicts()
    with duckdb.connect(str(tmp_path / "gist.duckdb"), read_only=True) as db:
        share = {
            target: db.execute(
                "SELECT avg((source = ?)::INT) FROM selections WHERE target = ? AND method = 'gist'", [skill, target]
            ).fetchone()[0]
            for target, skill in TARGET_SKILL.items()
        }
    print("\n" + summary_markdown(rows))
    print("matching-source share of the GIST selections:", share)
    by = {(r["target"], r["method"]): r for r in rows}
    for target in TARGET_SKILL:
        gist = by[(target, "gist")]
        assert by[(target, "random")]["seeds"] == 3
        assert gist["budget"] == "p0.05" and gist["seeds"] == 3
        assert gist["better_than_random"] != "no", rows
        if target == "geography":  # the clearest target: about 1 nat below random, every seed
            assert gist["better_than_random"] == "yes", rows
        # Fine-tuning on the selection helps relative to the base model.
        assert gist["mean_loss"] < by[(target, "base")]["mean_loss"], rows
    # Pooled over targets and seeds: the paired (same target, same seed) difference GIST - random.
    with duckdb.connect(str(tmp_path / "gist.duckdb"), read_only=True) as db:
        diffs = np.array(
            [
                d
                for (d,) in db.execute(
                    "SELECT g.heldout_loss - r.heldout_loss FROM evaluations g JOIN evaluations r "
                    "USING (target, budget, seed) "
                    "WHERE g.method = 'gist' AND r.method = 'random' AND g.budget = 'p0.05'"
                ).fetchall()
            ]
        )
    assert len(diffs) == 3 * len(TARGET_SKILL)
    half = T975[len(diffs) - 2] * diffs.std(ddof=1) / np.sqrt(len(diffs))
    print(
        f"pooled GIST - random: {diffs.mean():+.3f} (95% interval {diffs.mean() - half:+.3f}, "
        f"{diffs.mean() + half:+.3f})"
    )
    assert diffs.mean() + half < 0, diffs
