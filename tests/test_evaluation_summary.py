"""The evaluation summary (DuckDB view) against a plain computation; budgets, recipes and exports."""

import json

import numpy as np
import polars as pl
import pytest

from gist_assets.config import RunConfigError, SelectionConfig, TargetGradientsConfig, check_run_config
from gist_assets.evaluation import SCHEMA, plan_finetunes
from gist_assets.run import summary_markdown
from gist_assets.selection import training_messages
from gist_assets.target_gradients import recipe_epochs
from gist_core.data import record_to_messages
from gist_core.selection import budgets
from gist_resources import ScoreStore

T975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds)


def _row(target, method, budget, seed, loss, heldout=7, train=20):
    return {
        "target": target,
        "method": method,
        "budget": budget,
        "seed": seed,
        "train_examples": train,
        "heldout_examples": heldout,
        "heldout_loss": loss,
        "accuracy": None,
        "bytes_per_candidate": None,
        "feature_pass_seconds": None,
    }


def test_summary_view_matches_plain_computation(tmp_path):
    gist = [4.0, 4.2, 4.1]  # clearly below random on every seed
    random = [5.0, 5.1, 5.3]
    less = [5.2, 4.9, 5.6]  # differences of mixed sign: can't tell
    worse = [6.0, 6.3, 6.1]  # clearly above random
    full = [4.5, 4.6, 4.4]
    rows = [_row("t", "base", None, None, 6.5, train=0)]
    for s in range(3):
        rows += [
            _row("t", "gist", "p0.05", s, gist[s]),
            _row("t", "random", "p0.05", s, random[s]),
            _row("t", "less", "p0.05", s, less[s]),
            _row("t", "worse", "p0.05", s, worse[s]),
            _row("t", "full_pool", None, s, full[s], train=400),
            _row("u", "gist", "p0.05", s, 1.0 + s),
        ]  # another target: no random there, no cross-talk
    store = ScoreStore(database=str(tmp_path / "db.duckdb"))
    store.replace_evaluations(pl.DataFrame(rows, schema=SCHEMA))
    summary = {(r["target"], r["method"], r["budget"]): r for r in store.read_evaluation_summary().to_dicts()}

    def paired(a, b):
        d = np.array(a) - np.array(b)
        half = T975_DF2 * d.std(ddof=1) / np.sqrt(len(d))
        return d.mean(), d.mean() - half, d.mean() + half

    for method, losses, verdict in (("gist", gist, "yes"), ("less", less, "can't tell"), ("worse", worse, "no")):
        r = summary[("t", method, "p0.05")]
        assert r["seeds"] == 3 and r["heldout_examples"] == 7
        assert r["mean_loss"] == pytest.approx(np.mean(losses))
        assert r["std_loss"] == pytest.approx(np.std(losses, ddof=1))
        mean, lo, hi = paired(losses, random)
        assert (r["diff_vs_random"], r["diff_vs_random_lo"], r["diff_vs_random_hi"]) == pytest.approx(
            (mean, lo, hi), abs=1e-3
        )  # the view's quantile has 3 decimals
        assert r["better_than_random"] == verdict
        mean, lo, hi = paired(losses, full)
        assert (r["diff_vs_full_pool"], r["diff_vs_full_pool_lo"], r["diff_vs_full_pool_hi"]) == pytest.approx(
            (mean, lo, hi), abs=1e-3
        )
    assert summary[("t", "gist", "p0.05")]["better_than_full_pool"] == "yes"
    base = summary[("t", "base", None)]
    assert base["seeds"] == 1 and base["mean_loss"] == 6.5 and base["std_loss"] is None
    assert base["diff_vs_random"] is None  # no seed to pair with
    assert summary[("t", "full_pool", None)]["mean_loss"] == pytest.approx(np.mean(full))
    assert summary[("u", "gist", "p0.05")]["diff_vs_random"] is None
    table = summary_markdown(store.read_evaluation_summary().to_dicts())
    assert f"| t | p0.05 | gist | 3 | 20 | 7 | {np.mean(gist):.3f} ± {np.std(gist, ddof=1):.3f} |" in table


def test_one_seed_cannot_tell(tmp_path):
    store = ScoreStore(database=str(tmp_path / "db.duckdb"))
    store.replace_evaluations(
        pl.DataFrame([_row("t", "gist", "p0.05", 0, 1.0), _row("t", "random", "p0.05", 0, 9.0)], schema=SCHEMA)
    )
    r = [r for r in store.read_evaluation_summary().to_dicts() if r["method"] == "gist"][0]
    assert r["diff_vs_random"] == -8.0 and r["diff_vs_random_lo"] is None and r["better_than_random"] == "can't tell"


def test_budgets_and_their_config():
    assert budgets(0.05) == [("p0.05", 0.05, None)]
    assert budgets([0.01, 0.1]) == [("p0.01", 0.01, None), ("p0.1", 0.1, None)]
    assert budgets(None, [100, 20]) == [("n100", None, 100), ("n20", None, 20)]
    with pytest.raises(ValueError, match="repeat"):
        budgets([0.1, 0.1])
    with pytest.raises(ValueError, match="exactly one"):
        budgets(0.1, 5)
    assert SelectionConfig(fraction=[0.01, 0.05]).fraction == [0.01, 0.05]
    with pytest.raises(RunConfigError, match=r"ops.selected_subset.config.fraction.*float or a non-empty list"):
        check_run_config({"ops": {"selected_subset": {"config": {"fraction": ["5%"]}}}})
    with pytest.raises(RunConfigError, match=r"seeds.*distinct"):
        check_run_config({"ops": {"selection_evaluation": {"config": {"seeds": [1, 1]}}}})


def test_recipes_decide_the_checkpoints():
    saved = [1, 2, 3, 4]
    assert recipe_epochs(TargetGradientsConfig(), saved) == saved  # the default: less_style
    assert recipe_epochs(TargetGradientsConfig(recipe="gist_paper"), saved) == [4]
    assert recipe_epochs(TargetGradientsConfig(recipe="gist_paper", checkpoints=[2]), saved) == [2]
    assert recipe_epochs(TargetGradientsConfig(checkpoints=[1, 3]), saved) == [1, 3]
    with pytest.raises(ValueError, match="gist_paper selects with one checkpoint.*less_style"):
        recipe_epochs(TargetGradientsConfig(recipe="gist_paper", checkpoints=[1, 2]), saved)
    with pytest.raises(ValueError, match=r"checkpoints \[7\] do not exist"):
        recipe_epochs(TargetGradientsConfig(checkpoints=[7]), saved)


def test_plan_one_finetune_per_seed_and_set():
    sel = pl.DataFrame(
        {
            "target": ["a", "a", "b", "b", "a", "b"],
            "method": ["gist", "gist", "gist", "gist", "random", "random"],
            "budget": ["p0.1"] * 6,
            "candidate_id": ["x", "y", "x", "y", "z", "z"],
        }
    )
    drawn = []

    def draw(target, budget, size, seed):
        drawn.append((target, budget, size, seed))
        return [f"r{seed}"]  # the same draw for every target, another for every seed

    plan = plan_finetunes(sel, ["a", "b"], ["x", "y", "z"], True, [0, 1], draw)
    assert sorted(drawn) == [(t, "p0.1", 1, s) for t in "ab" for s in (0, 1)]
    assert plan[(0, ("x", "y"))] == [("a", "gist", "p0.1"), ("b", "gist", "p0.1")]  # same set: trained once
    assert plan[(1, ("r1",))] == [("a", "random", "p0.1"), ("b", "random", "p0.1")]
    assert plan[(0, ("x", "y", "z"))] == [("a", "full_pool", None), ("b", "full_pool", None)]
    assert len(plan) == 2 * 3


@pytest.mark.parametrize(
    "record",
    [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
            ]
        },
        {"prompt": "Hi", "completion": "Hello."},
        {"instruction": "Greet", "input": "Hi", "output": "Hello."},
    ],
)
def test_training_messages_are_trl_conversations(record):
    messages, _ = record_to_messages(record)
    out = training_messages(json.dumps(messages))
    assert out[-1]["role"] == "assistant" and out[-1]["content"] == "Hello."
    assert all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant") for m in out)
    assert out == [m for m in messages[: len(out)]]  # a prefix of the conversation, nothing rewritten
