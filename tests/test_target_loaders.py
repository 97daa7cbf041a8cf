"""Target loaders: LESS eval layout (MMLU/BBH/TyDiQA) and custom JSONL."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gist_core.targets import (
    TargetFormatError,
    load_bbh,
    load_custom_jsonl,
    load_mmlu,
    load_target,
    load_tydiqa,
    tulu_prompt,
)

FIXTURES = Path(__file__).parent / "fixtures"
LESS_ROOT = FIXTURES / "less_eval"
CUSTOM = FIXTURES / "custom_target.jsonl"

KEYS = {"target", "subtask", "prompt", "completion", "example_id"}


def _check_common(examples: list[dict], target: str) -> None:
    assert examples
    for ex in examples:
        assert set(ex) == KEYS
        assert all(isinstance(v, str) for v in ex.values())
        assert ex["target"] == target
        assert ex["prompt"].startswith("<|user|>\n")
    ids = [ex["example_id"] for ex in examples]
    assert len(ids) == len(set(ids))


def test_tulu_prompt():
    assert tulu_prompt("hi") == "<|user|>\nhi\n<|assistant|>\n"


# ------------------------------------------------------------------ MMLU


def test_mmlu_counts_and_format():
    exs = load_mmlu(LESS_ROOT)
    _check_common(exs, "mmlu")
    assert Counter(e["subtask"] for e in exs) == {"abstract_algebra": 5, "high_school_biology": 5}
    # Subjects sorted, rows in file order.
    assert [e["example_id"] for e in exs[:2]] == ["mmlu/abstract_algebra/0", "mmlu/abstract_algebra/1"]

    # Row with quoted commas in the question and in every choice.
    ex = exs[1]
    assert ex["prompt"] == (
        "<|user|>\n"
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. "
        "Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
        "A. True, True\n"
        "B. False, False\n"
        "C. True, False\n"
        "D. False, True\n"
        "Answer:\n"
        "<|assistant|>\n"
        "The answer is:"
    )
    assert ex["completion"] == " B"


def test_mmlu_quoted_newline_and_k():
    exs = load_mmlu(LESS_ROOT, target="m", k=2)
    assert len(exs) == 4 and exs[0]["target"] == "m"
    bio = [e for e in load_mmlu(LESS_ROOT) if e["subtask"] == "high_school_biology"]
    assert "nonpolar amino acid.\nHow might this mutation" in bio[3]["prompt"]
    assert " high school biology.\n\n" in bio[3]["prompt"]
    assert bio[3]["completion"] == " C"


def test_mmlu_missing_dir(tmp_path):
    with pytest.raises(TargetFormatError, match=r"eval/mmlu/dev.*<subject>_dev\.csv"):
        load_mmlu(tmp_path)


def test_mmlu_bad_row(tmp_path):
    d = tmp_path / "eval" / "mmlu" / "dev"
    d.mkdir(parents=True)
    (d / "x_dev.csv").write_text("q,a,b,c,d,A\nunquoted, comma,a,b,c,d,B\n")
    with pytest.raises(TargetFormatError, match=r"x_dev\.csv: row 2 has 7 fields"):
        load_mmlu(tmp_path)
    (d / "x_dev.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(TargetFormatError, match=r"x_dev\.csv: row 1 answer 'E'"):
        load_mmlu(tmp_path)


# ------------------------------------------------------------------ BBH


def test_bbh_counts_and_format():
    exs = load_bbh(LESS_ROOT)
    _check_common(exs, "bbh")
    assert Counter(e["subtask"] for e in exs) == {"boolean_expressions": 3, "date_understanding": 3}

    ex = exs[1]  # boolean_expressions, exemplar 1 is the target
    assert ex["example_id"] == "bbh/boolean_expressions/1"
    assert ex["prompt"] == (
        "<|user|>\n"
        "Evaluate the result of a random Boolean expression.\n\n"
        "Q: not ( ( not not True ) ) is\n"
        "A: Let's think step by step.\n"
        "Remember that (i) expressions inside brackets are always evaluated first. "
        "So the answer is False.\n\n"
        "Q: not not ( not ( False ) ) is\n"
        "A: Let's think step by step.\n"
        "We first simplify this expression. So the answer is True.\n\n"
        "Q: True and False and not True and True is\n"
        "<|assistant|>\n"
        "A:"
    )
    assert ex["completion"] == (
        " Let's think step by step.\nWe first simplify this expression. So the answer is False."
    )


def test_bbh_demonstrations_exclude_target():
    exs = load_bbh(LESS_ROOT)
    for task in ("boolean_expressions", "date_understanding"):
        group = [e for e in exs if e["subtask"] == task]
        questions = [e["prompt"].split("\n\n")[-1].split("\n<|assistant|>")[0] for e in group]
        for i, ex in enumerate(group):
            user = ex["prompt"].split("\n<|assistant|>\n")[0]
            # Target question appears exactly once (as the query), its answer never.
            assert user.count(questions[i]) == 1
            assert ex["completion"] not in user
            # Both other exemplars are present as demonstrations, with answers.
            for j, other in enumerate(group):
                if j != i:
                    assert questions[j] + "\nA:" + other["completion"] + "\n\n" in user


def test_bbh_bad_exemplar(tmp_path):
    d = tmp_path / "eval" / "bbh"
    d.mkdir(parents=True)
    bad = "Instr.\n\nQ: a\nA: 1\n\nQ: b (no answer)\n\nQ: c\nA: 3"
    (d / "bbh-three-shot.json").write_text(json.dumps({"t": bad}))
    with pytest.raises(TargetFormatError, match=r"bbh-three-shot\.json: task 't' exemplar 1 contains 0"):
        load_bbh(tmp_path)


def test_bbh_missing_and_invalid(tmp_path):
    with pytest.raises(TargetFormatError, match=r"bbh-three-shot\.json: file not found"):
        load_bbh(tmp_path)
    d = tmp_path / "eval" / "bbh"
    d.mkdir(parents=True)
    (d / "bbh-three-shot.json").write_text("{not json")
    with pytest.raises(TargetFormatError, match=r"bbh-three-shot\.json: invalid JSON at line 1"):
        load_bbh(tmp_path)


# ------------------------------------------------------------------ TyDiQA


def test_tydiqa_counts_and_format():
    exs = load_tydiqa(LESS_ROOT, instruction_sep="\n\n")
    _check_common(exs, "tydiqa")
    assert Counter(e["subtask"] for e in exs) == {"english": 1, "finnish": 1}

    en = exs[0]
    assert en["example_id"] == "tydiqa/english/0"
    assert en["prompt"] == (
        "<|user|>\n"
        "Answer the following question based on the information in the given passage.\n\n"
        "Passage: Quantum field theory naturally began with the study of electromagnetic "
        "interactions, as the electromagnetic field was the only known classical field as of "
        "the 1920s.\n"
        "Question: When did quantum field theory begin?\n"
        "<|assistant|>\n"
        "Answer:"
    )
    assert en["completion"] == " 1920s"

    fi = exs[1]
    assert fi["prompt"] == (
        "<|user|>\n"
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.\n\n"
        "Kappale: Helsinki on Suomen pääkaupunki ja väkirikkain kaupunki.\n"
        "Kysymys: Mikä on Suomen pääkaupunki?\n"
        "<|assistant|>\n"
        "Vastaus:"
    )
    assert fi["completion"] == " Helsinki"


def test_tydiqa_less_exact_separator():
    # The LESS script glues the instruction straight onto "Passage:".
    en = load_tydiqa(LESS_ROOT)[0]
    assert en["prompt"].startswith(
        "<|user|>\nAnswer the following question based on the information in the given passage.Passage: Quantum"
    )


def test_tydiqa_unknown_language(tmp_path):
    d = tmp_path / "eval" / "tydiqa"
    d.mkdir(parents=True)
    ex = {"context": "c", "question": "q", "answers": [{"text": "a"}]}
    (d / "tydiqa-one-shot.json").write_text(json.dumps({"klingon": [ex]}))
    with pytest.raises(
        TargetFormatError,
        match=r"tydiqa-one-shot\.json: unknown language 'klingon'; "
        r"supported: english, arabic, .*telugu",
    ):
        load_tydiqa(tmp_path)


# ------------------------------------------------------------------ custom JSONL


def test_custom_jsonl():
    exs = load_custom_jsonl(CUSTOM, target="mine")
    _check_common(exs, "mine")
    assert Counter(e["subtask"] for e in exs) == {"arithmetic": 2, "default": 1}
    assert exs[1] == {
        "target": "mine",
        "subtask": "arithmetic",
        "prompt": "<|user|>\nWhat is 7 * 6?\n<|assistant|>\n",
        "completion": "42",
        "example_id": "mine/arithmetic/1",
    }
    assert exs[2]["example_id"] == "mine/default/0"

    raw = load_custom_jsonl(CUSTOM, target="mine", apply_chat_format=False)
    assert raw[0]["prompt"] == "What is 2 + 3?"


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "p", "completion": "c"}\n{broken\n', r"line 2: invalid JSON"),
        ('\n["a", "b"]\n', r"line 2: expected a JSON object, got list"),
        ('{"completion": "c"}\n', r"line 1: missing field 'prompt'"),
        ('{"prompt": "p", "completion": 3}\n', r"line 1: field 'completion' must be a string"),
        ('{"prompt": "p", "completion": ""}\n', r"line 1: field 'completion' is empty"),
        ('{"prompt": "p", "completion": "c", "subtask": 1}\n', r"line 1: field 'subtask'"),
        ("\n  \n", r"no examples"),
    ],
)
def test_custom_jsonl_errors(tmp_path, content, expected):
    path = tmp_path / "bad_target.jsonl"
    path.write_text(content)
    with pytest.raises(TargetFormatError, match=r"bad_target\.jsonl: " + expected):
        load_custom_jsonl(path, target="t")


def test_custom_jsonl_missing_file(tmp_path):
    with pytest.raises(TargetFormatError, match=r"nope\.jsonl: file not found"):
        load_custom_jsonl(tmp_path / "nope.jsonl", target="t")


# ------------------------------------------------------------------ dispatch


def test_load_target_dispatch():
    assert len(load_target({"name": "mmlu", "format": "mmlu", "path": str(LESS_ROOT)})) == 10
    assert len(load_target({"name": "bbh", "format": "bbh", "path": str(LESS_ROOT)})) == 6
    ty = load_target({"name": "tq", "format": "tydiqa", "path": str(LESS_ROOT)})
    assert [e["example_id"] for e in ty] == ["tq/english/0", "tq/finnish/0"]
    raw = load_target({"name": "c", "format": "jsonl", "path": str(CUSTOM), "apply_chat_format": False})
    assert raw[0]["prompt"] == "What is 2 + 3?"


def test_load_target_errors():
    with pytest.raises(TargetFormatError, match=r"unknown format 'csv'; expected one of mmlu"):
        load_target({"name": "x", "format": "csv", "path": "p"})
    with pytest.raises(TargetFormatError, match=r"missing path"):
        load_target({"name": "x", "format": "jsonl"})
    with pytest.raises(TargetFormatError, match=r"apply_chat_format=false"):
        load_target({"name": "x", "format": "mmlu", "path": str(LESS_ROOT), "apply_chat_format": False})
