"""Target problems fail in target_sets, naming the target, before any model work (not at target_gradients or
~12 minutes later at the evaluation). Real files, real `target_sets` materializations."""

import json

import polars as pl
import pytest

from gist_assets.inputs import split_heldout
from reliability_util import fresh_instance, materialize, user_error, write_jsonl


def _sums(n: int, **extra) -> list[dict]:
    return [{"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}", "subtask": "sums", **extra} for i in range(n)]


def _target_sets(tmp_path, targets: list[dict], fraction: float = 0.2):
    with fresh_instance() as instance:
        return materialize(
            ["target_sets"],
            tmp_path / "root",
            instance,
            {"target_sets": {"targets": targets, "heldout_fraction": fraction}},
        )


@pytest.mark.parametrize("name", ["t" * 300, "t" * 65, "with space", "dotted.name", "ünï", ""])
def test_bad_target_name_fails_in_target_sets(tmp_path, name):
    path = write_jsonl(tmp_path / "t.jsonl", _sums(4))
    result = _target_sets(tmp_path, [{"name": name, "format": "jsonl", "path": str(path)}])
    msg = user_error(result)
    assert "is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'" in msg, msg
    assert repr(name[:80]) in msg
    assert not (tmp_path / "root" / "targets" / "target_sets.parquet").exists()


def test_longest_valid_target_name_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", _sums(4))
    result = _target_sets(tmp_path, [{"name": "A-z_9" * 12 + "abcd", "format": "jsonl", "path": str(path)}])
    assert result.success, user_error(result)


def test_small_subtasks_still_get_a_heldout_example():
    # 0.2 x 2 rounds down to 0: still one held out per subtask of >= 2, and one basis example kept.
    examples = [
        {"target": "t", "subtask": s, "example_id": f"t/{s}/{i}"}
        for s, n in (("a", 2), ("b", 3), ("c", 1))
        for i in range(n)
    ]
    split = split_heldout(examples, 0.2, seed=0)
    per = {(e["subtask"], s) for e, s in zip(examples, split, strict=False)}
    assert ("a", "heldout") in per and ("a", "basis") in per and ("b", "heldout") in per and ("c", "basis") in per
    assert split.count("heldout") == 2
    assert split_heldout(examples, 0.2, seed=0) == split  # seeded
    assert split_heldout(examples, 0.0, seed=0) == ["basis"] * len(examples)


def test_target_of_single_example_subtasks_holds_one_out():
    examples = [{"target": "t", "subtask": lang, "example_id": f"t/{lang}/0"} for lang in ("en", "fi", "sw")]
    split = split_heldout(examples, 0.2, seed=3)
    assert sorted(split) == ["basis", "basis", "heldout"]


def test_explicit_split_field_is_kept(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [*_sums(3, split="basis"), *_sums(1, split="heldout")])
    result = _target_sets(tmp_path, [{"name": "mine", "format": "jsonl", "path": str(path)}], fraction=0.5)
    assert result.success, user_error(result)
    df = pl.read_parquet(tmp_path / "root" / "targets" / "target_sets.parquet")
    assert df["split"].to_list() == ["basis", "basis", "basis", "heldout"]


@pytest.mark.parametrize(
    "lines, shown",
    [
        ([*_sums(2, split="basis"), *_sums(1)], "t.jsonl: line 3: 'split' is given on some lines and not on others"),
        ([*_sums(2, split="test")], "t.jsonl: line 1: field 'split' must be 'basis' or 'heldout', got 'test'"),
    ],
)
def test_bad_split_field_names_file_and_line(tmp_path, lines, shown):
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    msg = user_error(_target_sets(tmp_path, [{"name": "mine", "format": "jsonl", "path": str(path)}]))
    assert shown in msg, msg


@pytest.mark.parametrize(
    "lines, fraction, shown",
    [
        (_sums(1), 0.2, "target 'mine' ({path}) has no held-out examples (1 example(s)) while heldout_fraction=0.2"),
        (_sums(3, split="basis"), 0.2, "target 'mine' ({path}) has no held-out examples (3 example(s))"),
        (_sums(3, split="heldout"), 0.2, "target 'mine' ({path}) has no basis examples (3 examples, all held out)"),
        (_sums(3, split="heldout"), 0.0, "target 'mine' ({path}) has no basis examples"),
    ],
)
def test_empty_split_fails_in_target_sets_naming_the_target(tmp_path, lines, fraction, shown):
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    good = write_jsonl(tmp_path / "good.jsonl", _sums(5))
    result = _target_sets(
        tmp_path,
        [
            {"name": "fine", "format": "jsonl", "path": str(good)},
            {"name": "mine", "format": "jsonl", "path": str(path)},
        ],
        fraction,
    )
    msg = user_error(result)
    assert shown.format(path=path) in msg, msg
    assert not (tmp_path / "root" / "targets" / "target_sets.parquet").exists()


def test_single_example_target_is_fine_without_heldout(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", _sums(1))
    result = _target_sets(tmp_path, [{"name": "mine", "format": "jsonl", "path": str(path)}], fraction=0.0)
    assert result.success, user_error(result)
    assert json.loads((tmp_path / "root" / "targets" / "version.json").read_text())["version"]
