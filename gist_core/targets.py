"""Target (validation) set loaders.

Turns the LESS eval layout (``<data_dir>/eval/{mmlu,bbh,tydiqa}``) or a plain JSONL
of ``{"prompt", "completion", "subtask"}`` into a flat list of examples::

    {"target", "subtask", "prompt", "completion", "example_id"}

``prompt`` is the full text fed to the tokenizer before the completion, already in
Tulu chat format; the loss is later taken on the completion tokens only. No eos is
appended to target completions, mirroring princeton-nlp/LESS
``less/data_selection/get_validation_dataset.py`` whose prompt strings are
reproduced here (tulu chat format).

Pure Python on purpose (no dagster, no pandas) so it can be unit-tested cheaply.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "TargetFormatError",
    "TYDIQA_TEMPLATES",
    "check_target_name",
    "load_bbh",
    "load_custom_jsonl",
    "load_mmlu",
    "load_target",
    "load_tydiqa",
    "source_files",
    "tulu_prompt",
]


class TargetFormatError(ValueError):
    """A target file is missing or malformed; the message names the file and the fix."""


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SPLITS = ("basis", "heldout")


def source_files(paths: list[str]) -> list[str]:
    """The files target specs with these ``path``s are read from: each file itself, or every file under a
    LESS data dir (none for a missing path: loading reports that)."""
    out: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(path)
    return out


def check_target_name(name) -> str:
    """Target names become file names under the storage root: 1-64 of [A-Za-z0-9_-]."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if len(str(name)) <= 80 else f"{str(name)[:80]!r}... ({len(str(name))} characters)"
        raise TargetFormatError(
            f"target name {shown} is not valid: use 1 to 64 characters from A-Z, a-z, 0-9, "
            "'_' and '-' (it names files under the storage root); rename it in target_sets targets"
        )
    return name


def tulu_prompt(user_text: str) -> str:
    """Wrap a user turn in Tulu chat format, ending where the assistant starts talking."""
    return "<|user|>\n" + user_text + "\n<|assistant|>\n"


def _example(target: str, subtask: str, i: int, prompt: str, completion: str) -> dict:
    return {
        "target": target,
        "subtask": subtask,
        "prompt": prompt,
        "completion": completion,
        "example_id": f"{target}/{subtask}/{i}",
    }


def _load_json(path: Path, layout: str) -> Any:
    if not path.is_file():
        raise TargetFormatError(f"{path}: file not found; expected LESS layout {layout}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TargetFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


# --------------------------------------------------------------------------- MMLU

_MMLU_LAYOUT = "<data_dir>/eval/mmlu/dev/<subject>_dev.csv"
_MMLU_LETTERS = ("A", "B", "C", "D")


def _format_subject(subject: str) -> str:
    # Reference quirk kept verbatim: every word gets a leading space, so the
    # header reads "... about  abstract algebra." (two spaces after "about").
    return "".join(" " + word for word in subject.split("_"))


def load_mmlu(data_dir: str | Path, target: str = "mmlu", k: int = 5) -> list[dict]:
    """First ``k`` dev rows of every subject, zero-shot, as in LESS ``get_mmlu_dataset``.

    Subjects are the sorted stems of ``eval/mmlu/dev/*_dev.csv`` (LESS lists
    ``test/`` but only ever reads ``dev/``, so we do not require ``test/``).
    Cells are read as raw strings with the ``csv`` module; unlike the pandas
    reference, numeric-looking choices ("0.50", "NA") are therefore not
    reformatted or turned into "nan".
    """
    dev_dir = Path(data_dir) / "eval" / "mmlu" / "dev"
    if not dev_dir.is_dir():
        raise TargetFormatError(f"{dev_dir}: directory not found; expected LESS layout {_MMLU_LAYOUT}")
    files = sorted(dev_dir.glob("*_dev.csv"))
    if not files:
        raise TargetFormatError(f"{dev_dir}: no *_dev.csv files; expected LESS layout {_MMLU_LAYOUT}")

    examples: list[dict] = []
    for path in files:
        subject = path.name[: -len("_dev.csv")]
        with path.open(encoding="utf-8", newline="") as f:
            rows = [r for r in csv.reader(f) if r]  # newline="" keeps quoted newlines
        if not rows:
            raise TargetFormatError(f"{path}: no rows; expected headerless CSV rows 'question,A,B,C,D,answer'")
        header = f"The following are multiple choice questions (with answers) about {_format_subject(subject)}.\n\n"
        for i, row in enumerate(rows[:k]):
            if len(row) != 2 + len(_MMLU_LETTERS):
                raise TargetFormatError(
                    f"{path}: row {i + 1} has {len(row)} fields, expected 6 "
                    "(question, A, B, C, D, answer letter; quote fields containing commas)"
                )
            question, *choices, answer = row
            if answer.strip() not in _MMLU_LETTERS:
                raise TargetFormatError(f"{path}: row {i + 1} answer {answer!r} is not one of A/B/C/D")
            body = (
                question
                + "".join(f"\n{letter}. {choice}" for letter, choice in zip(_MMLU_LETTERS, choices, strict=False))
                + "\nAnswer:"
            )
            prompt = "<|user|>\n" + header + body + "\n<|assistant|>\nThe answer is:"
            examples.append(_example(target, subject, i, prompt, " " + answer))
    return examples


# --------------------------------------------------------------------------- BBH

_BBH_LAYOUT = "<data_dir>/eval/bbh/bbh-three-shot.json ({task: 'instruction\\n\\nQ: ...\\nA: ...' x3})"


def load_bbh(data_dir: str | Path, target: str = "bbh") -> list[dict]:
    """Each of the 3 exemplars per task becomes a target, with the other two as
    in-context demonstrations (LESS ``get_bbh_dataset``)."""
    path = Path(data_dir) / "eval" / "bbh" / "bbh-three-shot.json"
    data = _load_json(path, _BBH_LAYOUT)
    if not isinstance(data, dict) or not data:
        raise TargetFormatError(f"{path}: expected a non-empty JSON object mapping task name -> few-shot prompt string")

    examples: list[dict] = []
    for task, text in data.items():
        if not isinstance(text, str):
            raise TargetFormatError(f"{path}: task {task!r} value must be a string, got {type(text).__name__}")
        parts = text.split("\n\n")
        if len(parts) < 3:
            raise TargetFormatError(
                f"{path}: task {task!r} has {len(parts)} blank-line separated parts, expected instruction + 3 exemplars"
            )
        task_prompt = "\n\n".join(parts[:-3])
        qa = []
        for j, ex in enumerate(parts[-3:]):
            pieces = ex.split("\nA:")
            if len(pieces) != 2:
                raise TargetFormatError(
                    f"{path}: task {task!r} exemplar {j} contains {len(pieces) - 1} "
                    "'\\nA:' markers, expected exactly one ('Q: ...\\nA: ...')"
                )
            qa.append((pieces[0], pieces[1]))

        for i, (question, answer) in enumerate(qa):
            icl = "".join(q + "\nA:" + a + "\n\n" for j, (q, a) in enumerate(qa) if j != i)
            prompt = "<|user|>\n" + task_prompt.strip() + "\n\n" + icl + question + "\n<|assistant|>\nA:"
            examples.append(_example(target, task, i, prompt, answer))
    return examples


# --------------------------------------------------------------------------- TyDiQA

# (instruction, passage label, question label, answer label), the open-instruct
# eval/tydiqa templates that LESS copies.
TYDIQA_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "english": (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "finnish": (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    "indonesian": (
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:", "Ответ:"),
    "swahili": (
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}

_TYDIQA_LAYOUT = "<data_dir>/eval/tydiqa/tydiqa-one-shot.json ({language: [{context, question, answers: [{text}]}]})"


def load_tydiqa(
    data_dir: str | Path, target: str = "tydiqa", examples_per_language: int = 1, instruction_sep: str = ""
) -> list[dict]:
    """First ``examples_per_language`` examples per language (LESS uses 1).

    ``instruction_sep`` goes between the instruction and "Passage:". The default
    reproduces the LESS script byte for byte, which glues them together
    ("...passage.Passage: ..."); open-instruct's evaluation uses "\n\n".
    """
    path = Path(data_dir) / "eval" / "tydiqa" / "tydiqa-one-shot.json"
    data = _load_json(path, _TYDIQA_LAYOUT)
    if not isinstance(data, dict) or not data:
        raise TargetFormatError(f"{path}: expected a non-empty JSON object mapping language -> list of examples")

    examples: list[dict] = []
    for lang, items in data.items():
        if lang not in TYDIQA_TEMPLATES:
            raise TargetFormatError(f"{path}: unknown language {lang!r}; supported: {', '.join(TYDIQA_TEMPLATES)}")
        if not isinstance(items, list) or not items:
            raise TargetFormatError(f"{path}: language {lang!r} must map to a non-empty list")
        instruction, p_label, q_label, a_label = TYDIQA_TEMPLATES[lang]
        for i, ex in enumerate(items[:examples_per_language]):
            where = f"{path}: language {lang!r} example {i}"
            if not isinstance(ex, dict):
                raise TargetFormatError(f"{where} must be an object")
            for key in ("context", "question"):
                if not isinstance(ex.get(key), str):
                    raise TargetFormatError(f"{where}: missing or non-string {key!r}")
            answers = ex.get("answers")
            if (
                not isinstance(answers, list)
                or not answers
                or not isinstance(answers[0], dict)
                or not isinstance(answers[0].get("text"), str)
            ):
                raise TargetFormatError(f"{where}: 'answers' must be a non-empty list of {{'text': str}} objects")
            text = (
                instruction
                + instruction_sep
                + p_label
                + " "
                + ex["context"]
                + "\n"
                + q_label
                + " "
                + ex["question"]
                + "\n"
            )
            prompt = "<|user|>\n" + text + "<|assistant|>\n" + a_label
            examples.append(_example(target, lang, i, prompt, " " + answers[0]["text"]))
    return examples


# --------------------------------------------------------------------------- JSONL


def load_custom_jsonl(path: str | Path, target: str, apply_chat_format: bool = True) -> list[dict]:
    """One ``{"prompt", "completion", "subtask"?, "split"?}`` object a line; blank lines skipped.

    ``example_id`` counts per subtask in file order, like the LESS loaders. ``split``
    ("basis" or "heldout") fixes the split of the example; it is given on every line
    or on none (then the seeded split of ``heldout_fraction`` applies).
    """
    path = Path(path)
    if not path.is_file():
        raise TargetFormatError(
            f"{path}: file not found; expected a JSONL file with one "
            '{"prompt", "completion", "subtask"} object per line'
        )
    examples: list[dict] = []
    counts: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TargetFormatError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise TargetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("prompt", "completion"):
                if key not in obj:
                    raise TargetFormatError(f"{where}: missing field {key!r}")
                if not isinstance(obj[key], str):
                    raise TargetFormatError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
            # The completion is the only thing the loss sees; empty means no signal.
            if not obj["completion"]:
                raise TargetFormatError(f"{where}: field 'completion' is empty")
            subtask = obj.get("subtask", "default")
            if subtask is None:
                subtask = "default"
            if not isinstance(subtask, str) or not subtask:
                raise TargetFormatError(f"{where}: field 'subtask' must be a non-empty string")
            split = obj.get("split")
            if split is not None and split not in SPLITS:
                raise TargetFormatError(f"{where}: field 'split' must be 'basis' or 'heldout', got {split!r}")
            if examples and (split is None) != ("split" not in examples[0]):
                raise TargetFormatError(
                    f"{where}: 'split' is given on some lines and not on others; give it "
                    "on every line (basis/heldout) or on none (seeded split)"
                )
            prompt = tulu_prompt(obj["prompt"]) if apply_chat_format else obj["prompt"]
            i = counts.get(subtask, 0)
            counts[subtask] = i + 1
            example = _example(target, subtask, i, prompt, obj["completion"])
            if split is not None:
                example["split"] = split
            examples.append(example)
    if not examples:
        raise TargetFormatError(f"{path}: no examples (file is empty or only blank lines)")
    return examples


# --------------------------------------------------------------------------- dispatch

_LESS_LOADERS = {"mmlu": load_mmlu, "bbh": load_bbh, "tydiqa": load_tydiqa}
_FORMATS = (*_LESS_LOADERS, "jsonl")


def load_target(spec: dict) -> list[dict]:
    """Load one target from ``{"name", "format", "path", "apply_chat_format"?}``.

    For mmlu/bbh/tydiqa ``path`` is the LESS data root (the folder holding
    ``eval/``); for jsonl it is the file itself.
    """
    if not isinstance(spec, dict):
        raise TargetFormatError(f"target spec must be a mapping, got {type(spec).__name__}")
    missing = [k for k in ("name", "format", "path") if not spec.get(k)]
    if missing:
        raise TargetFormatError(
            f"target spec {spec!r} is missing {', '.join(missing)}; expected {{'name', 'format', 'path'}}"
        )
    name, fmt, path = spec["name"], spec["format"], spec["path"]
    chat = spec.get("apply_chat_format", True)
    if fmt == "jsonl":
        return load_custom_jsonl(path, target=name, apply_chat_format=bool(chat))
    if fmt in _LESS_LOADERS:
        # The LESS formats bake the Tulu template into their prompts; silently
        # ignoring a request to turn it off would be worse than refusing.
        if not chat:
            raise TargetFormatError(f"target {name!r}: apply_chat_format=false is only supported for format 'jsonl'")
        return _LESS_LOADERS[fmt](path, target=name)
    raise TargetFormatError(f"target {name!r}: unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}")
