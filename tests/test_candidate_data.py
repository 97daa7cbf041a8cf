"""Unit tests for gist_core/data.py: candidate formats, reading, ids, dedup, bad records, label masking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gist_core.data import (
    IGNORE_INDEX,
    BadRecordError,
    content_hash,
    encode_messages,
    encode_prompt_completion,
    read_candidates,
    record_to_messages,
)

# ----------------------------------------------------------------- helpers


def conv(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL; dict items are dumped, str items are written verbatim (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------- record_to_messages


def test_less_messages_layout_with_system():
    rec = {
        "dataset": "flan_v2",
        "id": "flan_v2_0",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ],
    }
    msgs, fmt = record_to_messages(rec)
    assert fmt == "messages"
    assert msgs == rec["messages"]


def test_prompt_completion_layout():
    msgs, fmt = record_to_messages({"prompt": "Q?", "completion": "A."})
    assert fmt == "prompt_completion"
    assert msgs == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_alpaca_layout_with_input():
    msgs, fmt = record_to_messages({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"})
    assert fmt == "alpaca"
    assert msgs == [{"role": "user", "content": "Translate.\n\nBonjour"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "   "}, {"input": None}])
def test_alpaca_layout_without_input(extra):
    msgs, fmt = record_to_messages({"instruction": "Say hi.", "output": "Hi", **extra})
    assert fmt == "alpaca"
    assert msgs == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": [{"role": "user"}]}, "must be an object with 'role' and 'content'"),
        (
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
            "must be a string, got int",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no non-empty assistant turn"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "no non-empty assistant turn",
        ),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"prompt": "Q"}, "no 'completion' field"),
        ({"completion": "A"}, "no 'prompt' field"),
        ({"prompt": "Q", "completion": " \n"}, "'completion' is empty"),
        ({"instruction": "Do it."}, "no 'output' field"),
        ({"instruction": "Do it.", "output": ""}, "'output' is empty"),
        ({"instruction": "Do it.", "input": 3, "output": "ok"}, "'input' must be a string"),
        ({"text": "hello"}, "unrecognized record layout"),
    ],
)
def test_record_to_messages_rejects(record, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        record_to_messages(record)


# ------------------------------------------------------------ read_candidates


def test_ids_kept_when_unique_and_rederived_when_shared(tmp_path):
    path = write_lines(
        tmp_path / "pool.jsonl",
        [
            conv("one", "1", id="x1"),
            conv("two", "2", id="dup"),
            conv("three", "3", id="dup"),
            conv("four", "4"),  # no id at all
            conv("five", "5", id=7),  # integer ids are kept as strings
        ],
    )
    rows, report = read_candidates([str(path)])
    ids = [r.candidate_id for r in rows]
    assert ids[0] == "x1"
    assert ids[4] == "7"
    for i in (1, 2, 3):
        assert re.fullmatch(r"pool-[0-9a-f]{16}", ids[i]), ids[i]
        assert ids[i] == f"pool-{content_hash('pool', rows[i].messages)}"
    assert len(set(ids)) == len(ids)
    assert report.ids_rederived == 2  # the two shared "dup" ids; the missing one is not counted
    again, _ = read_candidates([str(path)])
    assert [r.candidate_id for r in again] == ids


def test_duplicate_id_with_same_content_is_a_duplicate_not_a_rederivation(tmp_path):
    path = write_lines(tmp_path / "pool.jsonl", [conv("q", "a", id="same"), conv("q", "a", id="same")])
    rows, report = read_candidates([str(path)])
    assert [r.candidate_id for r in rows] == ["same"]
    assert report.duplicates_dropped == 1
    assert report.ids_rederived == 0


def test_source_from_field_or_file_name(tmp_path):
    less = write_lines(
        tmp_path / "flan_v2" / "flan_v2_data.jsonl",
        [
            conv("a", "1"),
            conv("b", "2", dataset="cot"),
            conv("c", "3", source="dolly"),
        ],
    )
    plain = write_lines(tmp_path / "my_pool.jsonl", [{"prompt": "d", "completion": "4"}])
    rows, report = read_candidates([str(less), str(plain)])
    by_user = {r.messages[0]["content"]: r for r in rows}
    assert by_user["a"].source == "flan_v2"
    assert by_user["b"].source == "cot"
    assert by_user["c"].source == "dolly"
    assert by_user["d"].source == "my_pool"
    assert by_user["d"].format == "prompt_completion"
    assert by_user["a"].file == str(less.resolve()) and by_user["a"].line == 1
    assert json.loads(by_user["b"].original)["dataset"] == "cot"


def test_exact_duplicates_dropped_and_counted(tmp_path):
    a = write_lines(
        tmp_path / "a.jsonl",
        [
            conv("What is  2+2?\n", "4"),
            conv("What is 2+2?", " 4 "),  # whitespace-only difference: duplicate
            conv("What is 2+3?", "5"),
            {"prompt": "What is 2+3?", "completion": "5"},  # same conversation, other layout: duplicate
        ],
    )
    b = write_lines(tmp_path / "b.jsonl", [conv("What is 2+2?", "4", id="b1"), conv("What is 2+2?", "four")])
    rows, report = read_candidates([str(a), str(b)])
    assert report.records_read == 6
    assert report.duplicates_dropped == 3
    assert [(Path(r.file).name, r.line) for r in rows] == [("a.jsonl", 1), ("a.jsonl", 3), ("b.jsonl", 2)]


def test_globs_including_recursive(tmp_path):
    write_lines(tmp_path / "pool" / "flan_v2" / "flan_v2_data.jsonl", [conv("a", "1")])
    write_lines(tmp_path / "pool" / "deep" / "er" / "cot_data.jsonl", [conv("b", "2")])
    write_lines(tmp_path / "pool" / "top.jsonl", [conv("c", "3")])
    (tmp_path / "pool" / "notes.txt").write_text("not a candidate file")
    rows, report = read_candidates([str(tmp_path / "pool" / "**" / "*.jsonl")])
    assert sorted(r.source for r in rows) == ["cot", "flan_v2", "top"]
    assert len(report.files) == 3 and report.files == sorted(report.files)
    # a single-level glob plus an overlapping explicit path: each file read once
    rows, report = read_candidates([str(tmp_path / "pool" / "*.jsonl"), str(tmp_path / "pool" / "top.jsonl")])
    assert [r.source for r in rows] == ["top"]
    assert report.files == [str((tmp_path / "pool" / "top.jsonl").resolve())]


def test_crlf_bom_and_unicode_line_separators_inside_strings(tmp_path):
    # U+2028 / U+0085 are legal unescaped inside JSON strings; they must not split a record.
    rec = conv("a\u2028b", "c\u0085d")
    path = tmp_path / "pool.jsonl"
    body = json.dumps(rec, ensure_ascii=False) + "\r\n" + json.dumps(conv("x", "y"), ensure_ascii=False) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    rows, report = read_candidates([str(path)])
    assert [r.line for r in rows] == [1, 2]
    assert rows[0].messages[0]["content"] == "a\u2028b"
    assert report.skipped == 0


# ---------------------------------------------------------------- bad records

GOOD = json.dumps(conv("fine", "ok"))

# (name, raw file bytes, expected 1-based line (0 = the whole file), fragment of the reason)
BAD_CASES = [
    ("malformed_json", (GOOD + "\n\n" + '{"prompt": "a", "completion": ' + "\n").encode(), 3, "malformed JSON"),
    ("json_array", (GOOD + "\n" + "[1, 2, 3]\n").encode(), 2, "expected a JSON object, got list"),
    (
        "content_number",
        (
            GOOD
            + "\n"
            + json.dumps({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]})
            + "\n"
        ).encode(),
        2,
        "messages[0].content must be a string, got int",
    ),
    ("empty_messages", (GOOD + "\n" + json.dumps({"messages": []}) + "\n").encode(), 2, "'messages' is empty"),
    (
        "no_assistant",
        (
            GOOD
            + "\n"
            + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
            + "\n"
        ).encode(),
        2,
        "no non-empty assistant turn",
    ),
    (
        "unknown_role",
        (
            GOOD
            + "\n"
            + json.dumps({"messages": [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}]})
            + "\n"
        ).encode(),
        2,
        "unknown role 'tool'",
    ),
    (
        "prompt_without_completion",
        (GOOD + "\n" + json.dumps({"prompt": "p"}) + "\n").encode(),
        2,
        "no 'completion' field",
    ),
    (
        "empty_completion",
        (GOOD + "\n" + json.dumps({"prompt": "p", "completion": ""}) + "\n").encode(),
        2,
        "'completion' is empty",
    ),
    (
        "source_not_a_string",
        (GOOD + "\n" + json.dumps(conv("u", "a", dataset=5)) + "\n").encode(),
        2,
        "'dataset'/'source' must be a string",
    ),
    (
        "unrecognized_layout",
        (GOOD + "\n" + json.dumps({"text": "hello"}) + "\n").encode(),
        2,
        "unrecognized record layout",
    ),
    ("empty_file", b"", 0, "file is empty"),
    ("blank_file", b"\n  \n", 0, "file is empty"),
    ("not_utf8_first_line", b"\xff\xfe{\x00}\x00\n", 1, "not valid UTF-8"),
    (
        "not_utf8_later_line",
        (GOOD + "\n" + GOOD.replace("fine", "other") + "\n").encode() + b"\xff\xfe oops\n",
        3,
        "not valid UTF-8",
    ),
]
# Only an empty file is skipped whole; a bad byte costs its own line.
FILE_LEVEL = {"empty_file", "blank_file", "not_utf8_first_line"}


@pytest.mark.parametrize("name, raw, line, reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_raises_by_default(tmp_path, name, raw, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(raw)
    with pytest.raises(BadRecordError) as info:
        read_candidates([str(path)])
    err = info.value
    msg = str(err)
    assert err.file == str(path.resolve()) and err.line == line
    assert f"{path.resolve()}:{line}:" in msg
    assert reason in msg and reason in err.reason
    assert "on_bad_record" in msg


@pytest.mark.parametrize("name, raw, line, reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_skipped_and_counted(tmp_path, name, raw, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(raw)
    good = write_lines(tmp_path / "good.jsonl", [conv("another", "fine answer")])
    rows, report = read_candidates([str(path), str(good)], on_bad_record="skip")
    assert report.skipped == 1
    assert len(report.skip_reasons) == 1
    assert report.skip_reasons[0].startswith(f"{path.resolve()}:{line}: ")
    assert reason in report.skip_reasons[0]
    users = [r.messages[0]["content"] for r in rows]
    assert "another" in users
    if name in FILE_LEVEL:
        assert all(r.file == str(good.resolve()) for r in rows)  # nothing usable in the bad file
    elif name == "not_utf8_later_line":
        assert users == ["fine", "other", "another"]  # the lines before the bad byte survive
    else:
        assert users == ["fine", "another"]  # good lines of the bad file survive


def test_skip_reasons_are_capped_but_all_counted(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["not json"] * 12 + [GOOD])
    rows, report = read_candidates([str(path)], on_bad_record="skip")
    assert len(rows) == 1
    assert report.skipped == 12 and report.records_read == 13
    assert len(report.skip_reasons) == 10


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_missing_file_and_empty_glob_are_config_errors_in_both_modes(tmp_path, mode):
    (tmp_path / "only_dirs" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_candidates([str(tmp_path / "nope.jsonl")], on_bad_record=mode)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        read_candidates([str(tmp_path / "*.jsonl")], on_bad_record=mode)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        read_candidates([str(tmp_path / "**" / "*.jsonl")], on_bad_record=mode)
    # a pattern that matches only directories matches no files
    with pytest.raises(FileNotFoundError, match="matched no files"):
        read_candidates([str(tmp_path / "only_dirs" / "*")], on_bad_record=mode)


def test_invalid_on_bad_record_value(tmp_path):
    path = write_lines(tmp_path / "pool.jsonl", [GOOD])
    with pytest.raises(ValueError, match="on_bad_record"):
        read_candidates([str(path)], on_bad_record="ignore")


# ------------------------------------------------------- tokenization / labels


@pytest.fixture(scope="module")
def tok():
    from gist_demo.tiny_model import train_bpe_tokenizer

    texts = [
        "The capital of France is Paris.",
        "The capital of Germany is Berlin.",
        "Be brief and answer the question.",
        "What is two plus two? Four.",
        "Hello world, how are you today?",
    ] * 4
    return train_bpe_tokenizer(texts, vocab_size=300)


def label_runs(enc):
    """Contiguous runs of labelled positions as lists of ids."""
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels, strict=False):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
                cur = []
        else:
            assert lab == tid
            cur.append(lab)
    if cur:
        runs.append(cur)
    return runs


def test_single_turn_labels_only_assistant_content_eos_newline(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "  Paris "},
    ]
    enc = encode_messages(tok, msgs, max_length=512)
    assert not enc.truncated
    assert len(enc.input_ids) == len(enc.labels)
    n_prompt = enc.labels.index(next(x for x in enc.labels if x != IGNORE_INDEX))
    # everything before the reply is masked, everything after it is labelled with the ids themselves
    assert all(x == IGNORE_INDEX for x in enc.labels[:n_prompt])
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.n_label_tokens == len(enc.input_ids) - n_prompt
    assert enc.input_ids[0] == tok.bos_token_id
    assert (
        tok.decode(enc.input_ids[:n_prompt])
        == "<s><|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\n"
    )
    assert tok.decode(enc.input_ids[n_prompt:]) == "Paris</s>\n"
    assert tok.eos_token_id in enc.input_ids[n_prompt:]


def test_two_turn_conversation_labels_both_assistant_turns(tok):
    msgs = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And Germany?"},
        {"role": "assistant", "content": "Berlin"},
    ]
    enc = encode_messages(tok, msgs, max_length=512)
    runs = label_runs(enc)
    assert [tok.decode(r) for r in runs] == ["Paris</s>\n", "Berlin</s>\n"]
    masked = [t for t, lab in zip(enc.input_ids, enc.labels, strict=False) if lab == IGNORE_INDEX]
    assert (
        tok.decode(masked) == "<s><|user|>\nCapital of France?\n<|assistant|>\n<|user|>\nAnd Germany?\n<|assistant|>\n"
    )


def test_prompt_completion_labels_completion_only_without_eos(tok):
    prompt = "<|user|>\nCapital of France?\n<|assistant|>\n"
    enc = encode_prompt_completion(tok, prompt, "Paris", max_length=512)
    runs = label_runs(enc)
    assert len(runs) == 1 and tok.decode(runs[0]) == "Paris"
    assert tok.eos_token_id not in enc.input_ids
    masked = [t for t, lab in zip(enc.input_ids, enc.labels, strict=False) if lab == IGNORE_INDEX]
    assert tok.decode(masked) == "<s>" + prompt
    assert enc.labels[-enc.n_label_tokens :] == enc.input_ids[-enc.n_label_tokens :]


def test_truncation(tok):
    msgs = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    full = encode_messages(tok, msgs, max_length=10_000)
    n = len(full.input_ids)
    n_prompt = n - full.n_label_tokens
    assert full.n_label_tokens > 2

    exact = encode_messages(tok, msgs, max_length=n)
    assert not exact.truncated and exact.input_ids == full.input_ids

    part = encode_messages(tok, msgs, max_length=n - 2)
    assert part.truncated
    assert part.input_ids == full.input_ids[: n - 2] and part.labels == full.labels[: n - 2]
    assert part.n_label_tokens == full.n_label_tokens - 2

    cut = encode_messages(tok, msgs, max_length=n_prompt)
    assert cut.truncated and len(cut.input_ids) == n_prompt
    assert cut.n_label_tokens == 0

    target = encode_prompt_completion(tok, "<|user|>\n" + "Hello world " * 20 + "\n<|assistant|>\n", "Paris", 8)
    assert target.truncated and len(target.input_ids) == 8 and target.n_label_tokens == 0
