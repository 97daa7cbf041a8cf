"""The pool reader on hostile input: plain and gzip files, one corpus of bad-record classes (each must give
`file:line: reason`, or be skipped and counted under on_bad_record: skip), id uniqueness, and a seeded
byte-level fuzz over valid files. Everything runs on real files through `read_candidates`."""

import gzip
import json
import random
from pathlib import Path

import polars as pl
import pytest

from gist_core.data import BadRecordError, CorruptFileError, content_hash, read_candidates
from reliability_util import conv, fresh_instance, materialize, metadata, user_error

GOOD = json.dumps(conv("What is the capital of France?", "Paris."))
BIG_INT = "1" * 5000


def _strict_loads(text: str):
    def no_constant(name):
        raise ValueError(name)

    return json.loads(text, parse_constant=no_constant)


# name -> (the bad line, as raw bytes, words of the reason). Each file is GOOD, then the bad line.
BAD_LINES = {
    "invalid_utf8_byte": (b'{"prompt": "caf\xe9", "completion": "ok"}', "not valid UTF-8"),
    "utf8_encoded_surrogate": (b'{"prompt": "a\xed\xa0\x80", "completion": "ok"}', "not valid UTF-8"),
    "lone_surrogate_escape": (rb'{"prompt": "a\ud800b", "completion": "ok"}', "lone surrogate (\\ud800)"),
    "lone_surrogate_in_key": (rb'{"prompt": "a", "completion": "ok", "\udfff": 1}', "lone surrogate"),
    "recursion_depth": (
        b'{"prompt": "a", "completion": "ok", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nested too deeply",
    ),
    "depth_over_limit": (
        b'{"prompt": "a", "completion": "ok", "x": ' + b"[" * 150 + b"]" * 150 + b"}",
        "nested too deeply",
    ),
    "int_5000_digits_id": (
        b'{"id": ' + BIG_INT.encode() + b', "prompt": "a", "completion": "ok"}',
        "more digits than Python allows",
    ),
    "int_300_digits_id": (
        b'{"id": ' + b"9" * 300 + b', "prompt": "a", "completion": "ok"}',
        "'id' is 300 characters long",
    ),
    "float_id": (b'{"id": 1.5, "prompt": "a", "completion": "ok"}', "'id' must be a string or an integer, got float"),
    "list_id": (b'{"id": [1], "prompt": "a", "completion": "ok"}', "'id' must be a string or an integer, got list"),
    "nan_constant": (b'{"prompt": "a", "completion": "ok", "w": NaN}', "NaN is not valid JSON"),
    "infinity_constant": (b'{"prompt": "a", "completion": "ok", "w": -Infinity}', "-Infinity is not valid JSON"),
    "float_overflow": (b'{"prompt": "a", "completion": "ok", "w": 1e999}', "out of the range of a float"),
    "content_int": (
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}).encode(),
        "messages[0].content must be a string, got int",
    ),
    "messages_not_list": (b'{"messages": "hello"}', "'messages' must be a list"),
    "message_not_object": (b'{"messages": ["hi"]}', "messages[0] must be an object"),
    "missing_completion": (b'{"prompt": "a"}', "no 'completion' field"),
    "missing_output": (b'{"instruction": "a"}', "no 'output' field"),
    "source_int": (json.dumps(conv("a", "b", source=3)).encode(), "'dataset'/'source' must be a string"),
    "malformed_json": (b'{"prompt": "a", "completion": ', "malformed JSON"),
    "json_scalar": (b"42", "expected a JSON object, got int"),
    "oversize_line": (json.dumps(conv("long " * 70_000, "ok")).encode(), "record is longer than 300000 bytes"),
}
LIMIT = 300_000  # max_record_bytes in these tests (the default is 8 MiB), so an oversize line stays small


def _write(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_record_names_file_and_line_in_error_mode(tmp_path, name, suffix):
    bad, reason = BAD_LINES[name]
    path = _write(tmp_path / f"{name}{suffix}", [GOOD.encode(), bad])
    with pytest.raises(BadRecordError) as err:
        read_candidates([str(path)], max_record_bytes=LIMIT)
    assert err.value.file == str(path) and err.value.line == 2
    assert str(err.value).startswith(f"{path}:2: ") and reason in str(err.value), str(err.value)
    assert "on_bad_record: skip" in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_every_bad_record_class_is_skipped_and_counted_and_the_rest_is_written(tmp_path, suffix):
    data = tmp_path / "data"
    for i, (name, (bad, _)) in enumerate(sorted(BAD_LINES.items())):
        _write(data / f"{name}{suffix}", [json.dumps(conv(f"question {i}", f"answer {i}")).encode(), bad])
    rows, report = read_candidates([str(data / f"*{suffix}")], on_bad_record="skip", max_record_bytes=LIMIT)
    assert report.skipped == len(BAD_LINES) and report.records_read == 2 * len(BAD_LINES)
    assert len(rows) == len(BAD_LINES)  # no file dropped whole: every good first line is kept
    assert {r.line for r in rows} == {1}
    # What would have crashed later (at write time) is gone: every kept row is strict, encodable JSON.
    for r in rows:
        assert _strict_loads(r.original) and r.original.encode("utf-8")
    pl.DataFrame({"original": [r.original for r in rows]}).write_parquet(tmp_path / "out.parquet")


def test_gzip_pool_reads_like_the_plain_file(tmp_path):
    lines = [json.dumps(conv(f"q{i}", f"a{i}", id=f"r{i}")).encode() for i in range(5)]
    plain, _ = read_candidates([str(_write(tmp_path / "p.jsonl", lines))])
    packed, _ = read_candidates([str(_write(tmp_path / "p.jsonl.gz", lines))])
    assert [(r.candidate_id, r.messages, r.line) for r in plain] == [
        (r.candidate_id, r.messages, r.line) for r in packed
    ]
    assert packed[0].source == "p"


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_truncated_gzip_is_a_clear_error_naming_the_file_in_both_modes(tmp_path, mode):
    path = _write(tmp_path / "pool.jsonl.gz", [json.dumps(conv(f"q{i}", "a" * 50)).encode() for i in range(200)])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptFileError) as err:
        read_candidates([str(path)], on_bad_record=mode)
    assert str(err.value).startswith(f"{path}: the gzip stream is damaged or truncated")
    assert "re-create or re-download it" in str(err.value)


def test_zstd_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "pool.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(ValueError, match=rf"{path}: zstandard-compressed files are not supported"):
        read_candidates([str(path)], on_bad_record="skip")


def _colliding_pair():
    """A record without id, and a later one whose own id is the id derived for the first."""
    first = conv("Name a color.", "Blue.")
    derived = f"pool-{content_hash('pool', first['messages'])}"
    return first, conv("Name a fruit.", "Apple.", id=derived), derived


def test_own_id_equal_to_a_derived_id_is_refused_naming_both_lines(tmp_path):
    first, second, derived = _colliding_pair()
    path = _write(tmp_path / "pool.jsonl", [json.dumps(first).encode(), json.dumps(second).encode()])
    with pytest.raises(BadRecordError) as err:
        read_candidates([str(path)])
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: candidate id {derived!r} is already the id of {path}:1"), msg


def test_own_id_equal_to_a_derived_id_skips_the_later_line(tmp_path):
    first, second, derived = _colliding_pair()
    path = _write(
        tmp_path / "pool.jsonl",
        [json.dumps(first).encode(), json.dumps(second).encode(), json.dumps(conv("Name a planet.", "Mars.")).encode()],
    )
    rows, report = read_candidates([str(path)], on_bad_record="skip")
    assert [(r.line, r.candidate_id) for r in rows][:1] == [(1, derived)]
    assert [r.line for r in rows] == [1, 3]
    assert report.skipped == 1 and report.skip_reasons[0].startswith(f"{path}:2: candidate id")


def test_gzip_pool_with_bad_records_materializes_under_skip(tmp_path):
    """Through the asset: a .jsonl.gz pool with a surrogate and a deep record is read, skipped, counted, written."""
    path = _write(
        tmp_path / "data" / "pool.jsonl.gz",
        [
            GOOD.encode(),
            BAD_LINES["lone_surrogate_escape"][0],
            BAD_LINES["recursion_depth"][0],
            BAD_LINES["int_5000_digits_id"][0],
            json.dumps(conv("Name a prime.", "7.")).encode(),
        ],
    )
    with fresh_instance() as instance:
        result = materialize(
            ["candidate_pool"],
            tmp_path / "root",
            instance,
            {"candidate_pool": {"paths": [str(path)], "on_bad_record": "skip"}},
        )
    assert result.success, user_error(result)
    meta = metadata(result, "candidate_pool")
    assert meta["rows"] == 2 and meta["records_skipped"] == 3
    for line in (2, 3, 4):
        assert f"{path}:{line}: " in meta["skip_reasons"]
    pool = pl.read_parquet(tmp_path / "root" / "pool" / "candidate_pool.parquet")
    assert pool["line"].to_list() == [1, 5]


# ---------------------------------------------------------------- fuzz


def _valid_corpus(rng: random.Random) -> bytes:
    recs = []
    for i in range(12):
        kind = rng.randrange(3)
        extra = {"id": rng.choice([f"r{i}", i, None, "shared"])}
        if kind == 0:
            r = conv(f"question {i} é ✓", f"answer {i}", **extra)
        elif kind == 1:
            r = {"prompt": f"p{i}", "completion": f"c{i}", **extra}
        else:
            r = {"instruction": f"i{i}", "input": "", "output": f"o{i}", **extra}
        recs.append(json.dumps(r, ensure_ascii=rng.random() < 0.5))
    return ("\n".join(recs) + "\n").encode()


NASTY = [
    b"\xff",
    b"\xed\xa0\x80",
    rb"\ud800",
    b"[" * 300,
    b"9" * 5000,
    b"NaN",
    b"1e999",
    b"\n",
    b"\x00",
    b'"',
    b"{",
    b"}",
    b",",
    b"\xef\xbb\xbf",
    b"\r\n",
    b"\xe2\x80\xa8",
]


def _corrupt(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.randrange(5), rng.randrange(max(1, len(b)))
        if op == 0 and b:
            b[at] = rng.randrange(256)
        elif op == 1:
            b[at:at] = rng.choice(NASTY)
        elif op == 2:
            del b[at : at + rng.randint(1, 20)]
        elif op == 3:  # duplicate a slice (often a whole line: an exact duplicate or an id clash)
            n = rng.randint(1, 200)
            b[at:at] = b[at : at + n]
        else:
            del b[at:]
    return bytes(b)


def _check_outcome(path: Path, mode: str, compressed: bool):
    try:
        rows, report = read_candidates([str(path)], on_bad_record=mode, max_record_bytes=LIMIT)
    except BadRecordError as err:
        assert mode == "error" and err.file == str(path) and err.line >= 0
        assert str(err).startswith(f"{path}:{err.line}: ")
        return "rejected"
    except CorruptFileError as err:
        assert compressed and err.file == str(path) and str(err).startswith(f"{path}: ")
        return "corrupt"
    ids = [r.candidate_id for r in rows]
    assert len(ids) == len(set(ids)), ids
    for r in rows:
        assert _strict_loads(r.original) and r.original.encode("utf-8") and r.candidate_id
    assert all(s.startswith(f"{path}:") for s in report.skip_reasons)
    assert len(rows) + report.duplicates_dropped <= report.records_read
    return "read"


def test_fuzzed_pool_files_are_read_or_rejected_by_file_and_line(tmp_path):
    rng = random.Random(20240514)
    outcomes = {"read": 0, "rejected": 0, "corrupt": 0}
    for i in range(1000):
        valid = _valid_corpus(rng)
        compressed = i % 2 == 1
        if compressed:
            # Half corrupt the text before compressing (bad records), half the compressed bytes (bad stream).
            raw = (
                gzip.compress(_corrupt(rng, valid), mtime=0)
                if rng.random() < 0.5
                else _corrupt(rng, gzip.compress(valid, mtime=0))
            )
        else:
            raw = _corrupt(rng, valid)
        path = tmp_path / f"f{i}.jsonl{'.gz' if compressed else ''}"
        path.write_bytes(raw)
        for mode in ("error", "skip"):
            outcomes[_check_outcome(path, mode, compressed)] += 1
    print(outcomes)
    assert outcomes["read"] > 100 and outcomes["rejected"] > 50 and outcomes["corrupt"] > 20, outcomes
