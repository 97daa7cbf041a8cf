"""Candidate formats, Tulu chat formatting, tokenization with label masking.

Every candidate record is normalized to a list of chat messages; the loss is
taken on assistant tokens only. Targets arrive as (prompt, completion) text
pairs already in chat format (see ``targets.py``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class BadRecordError(ValueError):
    """A candidate record that cannot be used; the message names file and line."""

    def __init__(self, file: str, line: int, reason: str):
        self.file, self.line, self.reason = file, line, reason
        what = "this line" if line > 0 else "this file"  # line 0: the file as a whole
        super().__init__(
            f"{file}:{line}: {reason}. Fix or remove {what}, or set "
            f"on_bad_record: skip to skip bad records and count them."
        )


@dataclass
class ReadReport:
    """What happened while reading candidate files."""

    files: list[str] = field(default_factory=list)
    records_read: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    ids_rederived: int = 0

    def note_skip(self, err: BadRecordError, keep: int = 10) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < keep:
            self.skip_reasons.append(f"{err.file}:{err.line}: {err.reason}")


def _check_str(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def record_to_messages(record: dict) -> tuple[list[dict], str]:
    """Detect the record's format and return (messages, format name).

    Raises ValueError with a short reason when the record is unusable.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise ValueError("'messages' must be a list of {role, content} objects")
        if not msgs:
            raise ValueError("'messages' is empty")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            role = m["role"]
            if role not in ROLES:
                raise ValueError(f"messages[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
            out.append({"role": role, "content": _check_str(m["content"], f"messages[{i}].content")})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise ValueError("conversation has no non-empty assistant turn (nothing to train on)")
        return out, "messages"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise ValueError(f"record has 'prompt'/'completion' layout but no '{key}' field")
        prompt = _check_str(record["prompt"], "'prompt'")
        completion = _check_str(record["completion"], "'completion'")
        if not completion.strip():
            raise ValueError("'completion' is empty (nothing to train on)")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], "prompt_completion"
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"record has Alpaca layout but no '{key}' field")
        instruction = _check_str(record["instruction"], "'instruction'")
        extra = _check_str(record.get("input", "") or "", "'input'")
        output = _check_str(record["output"], "'output'")
        if not output.strip():
            raise ValueError("'output' is empty (nothing to train on)")
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], "alpaca"
    raise ValueError(
        "unrecognized record layout: expected 'messages', 'prompt'+'completion', "
        "or 'instruction'+'input'+'output' fields"
    )


def normalized_conversation(messages: Sequence[dict]) -> str:
    """Canonical text of a conversation used to detect exact duplicates."""
    parts = []
    for m in messages:
        text = unicodedata.normalize("NFC", m["content"]).strip()
        parts.append(f"{m['role']}\x1f{' '.join(text.split())}")
    return "\x1e".join(parts)


def content_hash(source: str, messages: Sequence[dict]) -> str:
    digest = hashlib.sha256((source + "\x1d" + normalized_conversation(messages)).encode("utf-8"))
    return digest.hexdigest()[:16]


def expand_paths(patterns: Iterable[str]) -> list[str]:
    """Expand paths and globs (recursive ``**`` allowed) into a sorted, unique list."""
    found: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if any(ch in pattern for ch in "*?["):
            # Only files count: a pattern that matches nothing but directories
            # must fail as loudly as one that matches nothing at all.
            matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"candidate pattern {pattern!r} matched no files; check the path in config")
            found.extend(matches)
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"candidate file {pattern!r} does not exist; check the path in config")
            found.append(pattern)
    return sorted(dict.fromkeys(os.path.abspath(p) for p in found))


def source_from_path(path: str) -> str:
    """LESS layout ``<source>/<source>_data.jsonl`` -> ``source``; else the file stem."""
    stem = Path(path).name.split(".")[0]
    return stem[: -len("_data")] if stem.endswith("_data") else stem


def iter_jsonl(path: str) -> Iterator[tuple[int, object | BadRecordError]]:
    """Yield (line number, parsed object or BadRecordError); blank lines skipped."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BadRecordError(path, 0, f"cannot read file: {exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadRecordError(path, line, f"file is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    if not text.strip():
        raise BadRecordError(path, 0, "file is empty (no records)")
    # Split on "\n" only: str.splitlines() also breaks on U+2028/U+2029/U+0085,
    # which JSON allows unescaped inside strings (json.dumps(ensure_ascii=False)
    # writes them raw), so it would corrupt valid records and shift line numbers.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, BadRecordError(path, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})")


@dataclass
class CandidateRow:
    candidate_id: str
    source: str
    file: str
    line: int
    format: str
    messages: list[dict]
    original: str  # the record as read (JSON), exported unchanged for fine-tuning


def read_candidates(patterns: Sequence[str], on_bad_record: str = "error") -> tuple[list[CandidateRow], ReadReport]:
    """Read, validate and deduplicate candidate JSONL files.

    Ids: a record's own ``id`` is kept when it is unique across the pool;
    otherwise (missing or shared by different conversations) the id is
    derived from source and content hash, so it is stable across runs.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    report = ReadReport(files=expand_paths(patterns))
    rows: list[CandidateRow] = []
    seen: set[str] = set()
    for path in report.files:
        try:
            records = list(iter_jsonl(path))
        except BadRecordError as err:
            if on_bad_record == "error":
                raise
            report.note_skip(err)
            continue
        for lineno, obj in records:
            report.records_read += 1
            try:
                if isinstance(obj, BadRecordError):
                    raise obj
                try:
                    messages, fmt = record_to_messages(obj)
                    source = obj.get("dataset") or obj.get("source") or source_from_path(path)
                    _check_str(source, "'dataset'/'source'")
                except ValueError as exc:
                    raise BadRecordError(path, lineno, str(exc)) from None
            except BadRecordError as err:
                if on_bad_record == "error":
                    raise
                report.note_skip(err)
                continue
            key = normalized_conversation(messages)
            if key in seen:
                report.duplicates_dropped += 1
                continue
            seen.add(key)
            rid = obj.get("id")
            rows.append(
                CandidateRow(
                    candidate_id=str(rid) if isinstance(rid, (str, int)) and str(rid).strip() else "",
                    source=source,
                    file=path,
                    line=lineno,
                    format=fmt,
                    messages=messages,
                    original=json.dumps(obj, ensure_ascii=False),
                )
            )
    counts: dict[str, int] = {}
    for r in rows:
        if r.candidate_id:
            counts[r.candidate_id] = counts.get(r.candidate_id, 0) + 1
    for r in rows:
        if not r.candidate_id or counts[r.candidate_id] > 1:
            if r.candidate_id:
                report.ids_rederived += 1
            r.candidate_id = f"{r.source}-{content_hash(r.source, r.messages)}"
    return rows, report


# ---------------------------------------------------------------- chat format

def tulu_segments(messages: Sequence[dict], eos: str) -> list[tuple[str, bool]]:
    """Split a conversation into (text, is_label) segments in Tulu chat format.

    Matches LESS / open-instruct ``encode_with_messages_format``: the
    ``<|assistant|>\\n`` header is prompt, the reply + eos + newline is label.
    """
    segs: list[tuple[str, bool]] = []
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "assistant":
            segs.append(("<|assistant|>\n", False))
            segs.append((content + eos + "\n", True))
        else:
            segs.append((f"<|{m['role']}|>\n{content}\n", False))
    return segs


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_segments(tokenizer, segments: Sequence[tuple[str, bool]], max_length: int) -> Encoded:
    """Tokenize segments one by one so label boundaries are exact, then truncate."""
    ids: list[int] = []
    labels: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", True):
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    for text, is_label in segments:
        if not text:
            continue
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if is_label else [IGNORE_INDEX] * len(piece))
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def encode_messages(tokenizer, messages: Sequence[dict], max_length: int) -> Encoded:
    return encode_segments(tokenizer, tulu_segments(messages, tokenizer.eos_token or ""), max_length)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> Encoded:
    """Target examples: loss on the completion only, no eos (as LESS evaluates)."""
    return encode_segments(tokenizer, [(prompt, False), (completion, True)], max_length)
