"""Candidate formats, Tulu chat formatting, tokenization with label masking.

Every candidate record is normalized to a list of chat messages; the loss is
taken on assistant tokens only. Targets arrive as (prompt, completion) text
pairs already in chat format (see ``targets.py``).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def record_to_messages(record: object) -> tuple[list[dict], str]:
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


def file_signatures(paths: list[str]) -> dict[str, list[int]]:
    """(size, mtime) per file: how the refresh sensor tells new or changed files without reading them."""
    out = {}
    for path in paths:
        st = os.stat(path)
        out[path] = [st.st_size, st.st_mtime_ns]
    return out


def source_from_path(path: str) -> str:
    """LESS layout ``<source>/<source>_data.jsonl`` -> ``source``; else the file stem."""
    stem = Path(path).name.split(".")[0]
    return stem[: -len("_data")] if stem.endswith("_data") else stem


# One line (record) at most this many bytes: a longer line is a bad record, and is never
# held in memory whole (a file without newlines would otherwise be read as one line).
MAX_RECORD_BYTES = 8 << 20
# JSON nested deeper than this is refused: Python's json recursion (loads and dumps) ends near 1000.
MAX_DEPTH = 100
MAX_ID_CHARS = 256
# Compressed pool files are read as streams, by suffix.
_STREAMS: dict[str, tuple[str, Callable[..., Any]]] = {
    ".gz": ("gzip", gzip.open),
    ".bz2": ("bzip2", bz2.open),
    ".xz": ("xz", lzma.open),
}


class CorruptFileError(ValueError):
    """A file that cannot be read to its end (a damaged compressed stream).

    Never skipped, even with ``on_bad_record: skip``: how many records were lost is unknown.
    """

    def __init__(self, file: str, line: int, reason: str):
        self.file, self.line, self.reason = file, line, reason
        super().__init__(
            f"{file}: {reason} (after line {line}). The file cannot be read to its end, so it is not used "
            f"even with on_bad_record: skip; re-create or re-download it, or remove it from the candidate paths."
        )


def _open_stream(path: str):
    suffix = Path(path).suffix.lower()
    if suffix in (".zst", ".zstd"):
        raise ValueError(
            f"{path}: zstandard-compressed files are not supported; decompress it "
            "(zstd -d) or recompress it with gzip (.jsonl.gz)"
        )
    kind, opener = _STREAMS.get(suffix, ("plain", None))
    try:
        return kind, (opener(path, "rb") if opener else open(path, "rb"))
    except OSError as exc:
        raise BadRecordError(path, 0, f"cannot read file: {exc}") from None


def _raw_lines(path: str, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw line) of a plain or compressed file; None for a line over ``max_bytes``."""
    kind, fh = _open_stream(path)
    lineno = 0
    try:
        with fh:
            while True:
                raw = fh.readline(max_bytes + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):  # drain the rest of the long line
                        raw = fh.readline(1 << 20)
                    yield lineno, None
                else:
                    yield lineno, raw
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        what = "file" if kind == "plain" else f"{kind} stream"
        raise CorruptFileError(path, lineno, f"the {what} is damaged or truncated ({exc})") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of the range of a float (strict JSON has no Infinity)")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (strict JSON has no NaN/Infinity); write it as a string or null")


def _too_deep(obj, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def parse_record(text: str) -> tuple[object, str]:
    """Strictly parse one JSON line: (object, its strict UTF-8-safe JSON text); ValueError with a reason."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"JSON nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise ValueError("a number has more digits than Python allows (4300); store it as a string") from None
        raise ValueError(str(exc)) from None
    if _too_deep(obj, MAX_DEPTH):
        raise ValueError(f"JSON nested too deeply (more than {MAX_DEPTH} levels)")
    try:
        original = json.dumps(obj, ensure_ascii=False, allow_nan=False)
        original.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        raise ValueError(
            f"a string holds a lone surrogate ({bad}), which is not valid Unicode; remove it or escape it as a pair"
        ) from None
    return obj, original


def iter_jsonl(
    path: str, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[tuple[int, tuple[object, str] | BadRecordError]]:
    """Yield (line number, (parsed object, strict JSON text) or BadRecordError); blank lines skipped.

    ``.gz``, ``.bz2`` and ``.xz`` files are decompressed as streams. Lines are split on
    b"\\n" only: str.splitlines() would also break on U+2028/U+2029/U+0085, which JSON
    allows unescaped inside strings. Each line is decoded on its own, so one bad byte
    costs one record, not the file.
    """
    any_record = False
    for lineno, raw in _raw_lines(path, max_record_bytes):
        if raw is None:
            any_record = True
            yield (
                lineno,
                BadRecordError(
                    path, lineno, f"record is longer than {max_record_bytes} bytes (the limit for one line)"
                ),
            )
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            any_record = True
            yield (
                lineno,
                BadRecordError(
                    path, lineno, f"line is not valid UTF-8 (byte {exc.start} of the line); re-encode the file as UTF-8"
                ),
            )
            continue
        if not text.strip():
            continue
        any_record = True
        try:
            yield lineno, parse_record(text)
        except ValueError as exc:
            yield lineno, BadRecordError(path, lineno, str(exc))
    if not any_record:
        raise BadRecordError(path, 0, "file is empty (no records)")


def _record_id(obj: dict) -> str:
    rid = obj.get("id")
    if rid is None:
        return ""
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    rid = str(rid)
    if len(rid) > MAX_ID_CHARS:
        raise ValueError(f"'id' is {len(rid)} characters long, more than {MAX_ID_CHARS}")
    return rid if rid.strip() else ""


@dataclass
class CandidateRow:
    candidate_id: str
    source: str
    file: str
    line: int
    format: str
    messages: list[dict]
    original: str  # the record as read (strict JSON), exported unchanged for fine-tuning


def read_candidates(
    patterns: Sequence[str], on_bad_record: str = "error", max_record_bytes: int = MAX_RECORD_BYTES
) -> tuple[list[CandidateRow], ReadReport]:
    """Read, validate and deduplicate candidate JSONL files (plain, .gz, .bz2 or .xz).

    Ids: a record's own ``id`` is kept when it is unique across the pool;
    otherwise (missing or shared by different conversations) the id is
    derived from source and content hash, so it is stable across runs. An own id
    equal to an id derived for another record is a bad record (the later line).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    report = ReadReport(files=expand_paths(patterns))
    rows: list[CandidateRow] = []
    seen: set[str] = set()

    def bad(err: BadRecordError) -> None:
        if on_bad_record == "error":
            raise err
        report.note_skip(err)

    for path in report.files:
        try:
            records = list(iter_jsonl(path, max_record_bytes))
        except BadRecordError as err:
            bad(err)
            continue
        for lineno, item in records:
            report.records_read += 1
            if isinstance(item, BadRecordError):
                bad(item)
                continue
            obj, original = item
            try:
                messages, fmt = record_to_messages(obj)
                assert isinstance(obj, dict)  # record_to_messages rejects anything else
                source = obj.get("dataset") or obj.get("source") or source_from_path(path)
                _check_str(source, "'dataset'/'source'")
                rid = _record_id(obj)
            except ValueError as exc:
                bad(BadRecordError(path, lineno, str(exc)))
                continue
            key = normalized_conversation(messages)
            if key in seen:
                report.duplicates_dropped += 1
                continue
            seen.add(key)
            rows.append(
                CandidateRow(
                    candidate_id=rid,
                    source=source,
                    file=path,
                    line=lineno,
                    format=fmt,
                    messages=messages,
                    original=original,
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
    # Own ids and derived ids share one namespace: a clash is refused, never two rows with one id.
    owner: dict[str, CandidateRow] = {}
    unique: list[CandidateRow] = []
    for r in rows:
        first = owner.setdefault(r.candidate_id, r)
        if first is r:
            unique.append(r)
            continue
        bad(
            BadRecordError(
                r.file,
                r.line,
                f"candidate id {r.candidate_id!r} is already the id of "
                f"{first.file}:{first.line} (an own 'id' equal to an id derived from "
                "another record's content); give this record another 'id'",
            )
        )
    return unique, report


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


def encode_segments(tokenizer, segments: Sequence[tuple[str, bool]], max_length: int, add_bos: bool = True) -> Encoded:
    """Tokenize segments one by one so label boundaries are exact, then truncate."""
    ids: list[int] = []
    labels: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None and getattr(tokenizer, "add_bos_token", True):
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


# How conversations become text: "tulu" (LESS and the paper; the default) or "model" (the tokenizer's
# own chat template, tokenizer.apply_chat_template).
CHAT_FORMATS = ("tulu", "model")


def _check_chat_format(tokenizer, chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {list(CHAT_FORMATS)}, got {chat_format!r}")
    if chat_format == "model" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat_format 'model' needs a tokenizer with a chat template, and this one has none; use chat_format 'tulu'"
        )


def _render(tokenizer, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def template_segments(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """(text, is_label) segments from the tokenizer's chat template, rendered turn by turn.

    Label: each assistant reply as the template writes it, up to and including the EOS token
    (the end of the turn, what generation stops at); the template's headers, system prompt and the
    separator after EOS are prompt. Contents are stripped, as in ``tulu_segments``.
    """
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    eos = tokenizer.eos_token or ""
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, msgs[:i], True)
        full = _render(tokenizer, msgs[: i + 1], False)
        if not head.startswith(done) or not full.startswith(head):
            raise ValueError(
                f"the chat template does not render this conversation turn by turn (turn {i}); use chat_format 'tulu'"
            )
        reply = full[len(head) :]
        cut = reply.find(eos) if eos else -1
        end = len(reply) if cut < 0 else cut + len(eos)
        segs.append((head[len(done) :], False))
        segs.append((reply[:end], True))
        done = full[: len(head) + end]
    return segs


_TULU_HEADER = re.compile(r"<\|(system|user|assistant)\|>\n")


def parse_tulu_prompt(prompt: str) -> tuple[list[dict], str] | None:
    """A Tulu-format prompt (``<|user|>\\n...\\n<|assistant|>\\n`` + an answer prefix) as (messages, prefix);
    None for a prompt in no chat format (a raw prompt is used as given)."""
    parts = _TULU_HEADER.split(prompt)
    if len(parts) < 3 or parts[0] != "" or parts[-2] != "assistant":
        return None
    turns = list(zip(parts[1::2], parts[2::2], strict=True))
    messages = []
    for role, text in turns[:-1]:
        if not text.endswith("\n"):
            return None
        messages.append({"role": role, "content": text[:-1]})
    return messages, turns[-1][1]


def chat_prompt(tokenizer, prompt: str, chat_format: str = "tulu") -> str:
    """A target prompt (stored in Tulu format) in the chosen chat format."""
    _check_chat_format(tokenizer, chat_format)
    parsed = parse_tulu_prompt(prompt) if chat_format == "model" else None
    if parsed is None:
        return prompt
    messages, prefix = parsed
    return _render(tokenizer, [{"role": m["role"], "content": m["content"].strip()} for m in messages], True) + prefix


def encode_messages(tokenizer, messages: Sequence[dict], max_length: int, chat_format: str = "tulu") -> Encoded:
    """A conversation, loss on the assistant replies only; ``chat_format`` "tulu" or "model" (CHAT_FORMATS)."""
    _check_chat_format(tokenizer, chat_format)
    if chat_format == "model":  # the template writes what it needs (BOS included)
        return encode_segments(tokenizer, template_segments(tokenizer, messages), max_length, add_bos=False)
    return encode_segments(tokenizer, tulu_segments(messages, tokenizer.eos_token or ""), max_length)


def encode_prompt_completion(
    tokenizer, prompt: str, completion: str, max_length: int, chat_format: str = "tulu"
) -> Encoded:
    """Target examples: loss on the completion only, no eos (as LESS evaluates)."""
    if chat_format == "model":
        text = chat_prompt(tokenizer, prompt, chat_format)
        return encode_segments(tokenizer, [(text, False), (completion, True)], max_length, add_bos=text == prompt)
    return encode_segments(tokenizer, [(prompt, False), (completion, True)], max_length)
