"""Synthetic multi-skill instruction pool and held-out targets (the embedded default).

This is what the pipeline selects from when no real pool is configured, so that the
whole graph runs offline on a laptop CPU with a tiny (~1M parameter) Llama model
trained from scratch on the pool itself. Everything here is pure stdlib and
deterministic: all randomness comes from ``random.Random`` instances seeded from the
caller's integer seed, and nothing depends on set order or ``hash()``, so the same
arguments give byte-identical files on every run and machine.

Pool skills (the ``dataset`` field of each record):

* ``addition``      two/three-digit ``a + b``
* ``subtraction``   two/three-digit ``a - b`` (``a >= b``)
* ``reverse_word``  reverse the letters of a word
* ``uppercase``     rewrite a short lowercase phrase in capitals
* ``capitals``      country -> capital, fixed table of 40 countries
* ``sort_numbers``  sort 3-6 small distinct integers ascending
* ``antonyms``      fixed table of ~65 antonym pairs (both directions)
* ``chitchat``      generic low-value conversational filler

``addition`` and ``subtraction`` are *deliberately close*: the same operand formats,
mirrored user templates ("What is 12 plus 30?" / "What is 42 minus 30?") and mirrored
answer forms. A selector that keys on surface features will confuse them; one that
keys on what lowers the target's loss should prefer addition for a sums target.

Every skill has 5-6 user templates and 3-4 answer forms (the bare answer is the most
common form, the one the targets use). A few conversations start with a system turn
(~5%) and a few are two-turn (~8%, both turns from the same skill).

Noise: in each skill, exactly one example in every consecutive block of 20 (5%) has a
corrupted final assistant turn: a plausible wrong answer (for the close pair, often
the *other* operation's result), a truncated answer, or a reply that ignores the
question. Nothing in the record marks it; ``_clean_replies`` lets tests tell.

Targets (``generate_targets``) are the custom-target JSONL format
``{"prompt", "completion", "subtask"}``. Their prompt templates share no fixed text
with any pool template, so selection must generalize from gradients rather than
string-match; their completions use the pool's bare answer form, so learning the skill
from the pool transfers. Arithmetic targets additionally use only "reserved" operand
pairs (``_is_reserved_pair``) that the pool never asks about, so the exact sums are
never seen in training either.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SKILLS",
    "CLOSE_SKILLS",
    "TARGETS",
    "TARGET_SUBTASKS",
    "TARGET_SKILL",
    "USER_TEMPLATES",
    "ANSWER_TEMPLATES",
    "TARGET_TEMPLATES",
    "generate_pool",
    "write_pool",
    "generate_targets",
    "write_targets",
    "template_fixed_parts",
]

# --------------------------------------------------------------------------- tables

SHORT_WORDS = (
    "cat",
    "dog",
    "sun",
    "map",
    "cup",
    "pen",
    "box",
    "hat",
    "car",
    "tree",
    "fish",
    "bird",
    "lamp",
    "door",
    "milk",
    "rain",
    "star",
    "moon",
    "ship",
    "frog",
    "book",
    "king",
    "rose",
    "sand",
    "wind",
    "cake",
    "desk",
    "ring",
    "gold",
    "leaf",
    "apple",
    "bread",
    "chair",
    "cloud",
    "dream",
    "earth",
    "flame",
    "grape",
    "horse",
    "house",
    "juice",
    "knife",
    "lemon",
    "money",
    "night",
    "ocean",
    "paper",
    "queen",
    "river",
    "snake",
    "stone",
    "table",
    "tiger",
    "train",
    "water",
    "whale",
    "zebra",
    "plant",
    "smile",
    "light",
)

LONG_WORDS = (
    "blanket",
    "captain",
    "chicken",
    "diamond",
    "dolphin",
    "elephant",
    "evening",
    "factory",
    "feather",
    "giraffe",
    "harvest",
    "holiday",
    "kitchen",
    "library",
    "monster",
    "morning",
    "network",
    "octopus",
    "package",
    "painting",
    "penguin",
    "picture",
    "pumpkin",
    "rainbow",
    "sandwich",
    "scissors",
    "station",
    "teacher",
    "thunder",
    "treasure",
    "umbrella",
    "vacation",
    "village",
    "volcano",
    "weather",
    "whistle",
    "airplane",
    "balloon",
    "bicycle",
    "building",
    "calendar",
    "chocolate",
    "computer",
    "dinosaur",
    "festival",
    "football",
    "hospital",
    "kangaroo",
    "mountain",
    "notebook",
    "orchestra",
    "pancake",
    "question",
    "sunflower",
    "squirrel",
    "triangle",
    "universe",
    "waterfall",
    "yesterday",
    "lighthouse",
)

PHRASE_WORDS = (
    "green",
    "apple",
    "happy",
    "little",
    "red",
    "house",
    "blue",
    "sky",
    "quick",
    "brown",
    "fox",
    "lazy",
    "dog",
    "good",
    "morning",
    "sunny",
    "day",
    "cold",
    "winter",
    "night",
    "bright",
    "star",
    "sweet",
    "tea",
    "big",
    "city",
    "old",
    "friend",
    "new",
    "book",
    "warm",
    "bread",
    "small",
    "garden",
    "fresh",
    "water",
    "kind",
    "heart",
    "soft",
    "music",
    "open",
    "road",
    "silver",
    "moon",
    "early",
    "bird",
)

# (country, capital, continent); continents become the geography target's subtasks.
COUNTRIES = (
    ("France", "Paris", "europe"),
    ("Germany", "Berlin", "europe"),
    ("Italy", "Rome", "europe"),
    ("Spain", "Madrid", "europe"),
    ("Portugal", "Lisbon", "europe"),
    ("Greece", "Athens", "europe"),
    ("Poland", "Warsaw", "europe"),
    ("Sweden", "Stockholm", "europe"),
    ("Norway", "Oslo", "europe"),
    ("Austria", "Vienna", "europe"),
    ("Japan", "Tokyo", "asia"),
    ("China", "Beijing", "asia"),
    ("India", "New Delhi", "asia"),
    ("Thailand", "Bangkok", "asia"),
    ("Vietnam", "Hanoi", "asia"),
    ("Indonesia", "Jakarta", "asia"),
    ("Iran", "Tehran", "asia"),
    ("Iraq", "Baghdad", "asia"),
    ("Nepal", "Kathmandu", "asia"),
    ("Mongolia", "Ulaanbaatar", "asia"),
    ("Egypt", "Cairo", "africa"),
    ("Kenya", "Nairobi", "africa"),
    ("Nigeria", "Abuja", "africa"),
    ("Ghana", "Accra", "africa"),
    ("Ethiopia", "Addis Ababa", "africa"),
    ("Morocco", "Rabat", "africa"),
    ("Senegal", "Dakar", "africa"),
    ("Uganda", "Kampala", "africa"),
    ("Tanzania", "Dodoma", "africa"),
    ("Zimbabwe", "Harare", "africa"),
    ("Canada", "Ottawa", "americas"),
    ("Mexico", "Mexico City", "americas"),
    ("Brazil", "Brasilia", "americas"),
    ("Argentina", "Buenos Aires", "americas"),
    ("Chile", "Santiago", "americas"),
    ("Peru", "Lima", "americas"),
    ("Colombia", "Bogota", "americas"),
    ("Cuba", "Havana", "americas"),
    ("Venezuela", "Caracas", "americas"),
    ("Ecuador", "Quito", "americas"),
)
CAPITAL_OF = {country: capital for country, capital, _ in COUNTRIES}
CONTINENTS = ("europe", "asia", "africa", "americas")

ANTONYM_PAIRS = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("old", "young"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("true", "false"),
    ("good", "bad"),
    ("win", "lose"),
    ("push", "pull"),
    ("begin", "end"),
    ("up", "down"),
    ("in", "out"),
    ("left", "right"),
    ("day", "night"),
    ("black", "white"),
    ("north", "south"),
    ("east", "west"),
    ("first", "last"),
    ("buy", "sell"),
    ("give", "take"),
    ("come", "go"),
    ("inside", "outside"),
    ("above", "below"),
    ("before", "after"),
    ("front", "back"),
    ("top", "bottom"),
    ("love", "hate"),
    ("friend", "enemy"),
    ("laugh", "cry"),
    ("sweet", "sour"),
    ("cheap", "expensive"),
    ("safe", "dangerous"),
    ("wide", "narrow"),
    ("deep", "shallow"),
    ("near", "far"),
    ("always", "never"),
    ("more", "less"),
    ("accept", "refuse"),
    ("arrive", "leave"),
    ("asleep", "awake"),
    ("ancient", "modern"),
    ("absent", "present"),
    ("alive", "dead"),
    ("rough", "smooth"),
    ("tight", "loose"),
    ("sharp", "dull"),
    ("remember", "forget"),
    ("rise", "fall"),
    ("smile", "frown"),
    ("entrance", "exit"),
    ("victory", "defeat"),
    ("teach", "learn"),
)
# Both directions are asked, so each word must belong to exactly one pair.
ANTONYM_OF = {a: b for a, b in ANTONYM_PAIRS} | {b: a for a, b in ANTONYM_PAIRS}
ANTONYM_WORDS = tuple(w for pair in ANTONYM_PAIRS for w in pair)  # fixed order

TOPICS = (
    "music",
    "the weather",
    "movies",
    "cooking",
    "weekends",
    "coffee",
    "dogs",
    "cats",
    "gardening",
    "travel",
    "the beach",
    "board games",
    "rainy days",
    "summer",
    "books",
    "hiking",
    "pizza",
    "the ocean",
    "painting",
    "birthdays",
    "trains",
    "the moon",
    "football",
    "ice cream",
    "old songs",
    "video games",
    "picnics",
    "snow",
    "tea",
    "mornings",
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Keep answers short.",
    "You are a friendly tutor.",
)

# Replies that ignore the question; used only for noisy examples.
OFF_TOPIC_REPLIES = (
    "I'm not sure, but I hope you have a lovely day!",
    "Let's talk about something else instead.",
    "That reminds me of a nice walk I took yesterday.",
    "Good question! Anyway, how is the weather where you are?",
    "Sorry, I can't help with that right now.",
)

# ------------------------------------------------------------------------ templates

SKILLS: tuple[str, ...] = (
    "addition",
    "subtraction",
    "reverse_word",
    "uppercase",
    "capitals",
    "sort_numbers",
    "antonyms",
    "chitchat",
)
CLOSE_SKILLS: tuple[str, str] = ("addition", "subtraction")

# User-turn templates; every slot appears at most once per template (they double as
# parsing regexes in ``_match_template``).
USER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "addition": (
        "What is {a} plus {b}?",
        "Compute {a} + {b}.",
        "Find the sum of {a} and {b}.",
        "Calculate: {a} + {b} =",
        "How much is {a} plus {b}?",
        "{a} + {b} = ?",
    ),
    # Mirrors addition template by template: the deliberately close pair.
    "subtraction": (
        "What is {a} minus {b}?",
        "Compute {a} - {b}.",
        "Find the difference of {a} and {b}.",
        "Calculate: {a} - {b} =",
        "How much is {a} minus {b}?",
        "{a} - {b} = ?",
    ),
    "reverse_word": (
        "Reverse the letters of the word '{word}'.",
        "Write '{word}' backwards.",
        "What is '{word}' spelled backwards?",
        "Please reverse this word: {word}",
        "{word} reversed is what?",
    ),
    "uppercase": (
        "Rewrite in capital letters: {phrase}",
        "Convert '{phrase}' to uppercase.",
        "Make this all caps: {phrase}",
        "Write {phrase} using only uppercase letters.",
        "Shout this phrase: {phrase}",
    ),
    "capitals": (
        "What is the capital of {country}?",
        "Name the capital of {country}.",
        "Which city is the capital of {country}?",
        "Tell me the capital city of {country}.",
        "{country} has which capital?",
        "What city is {country}'s capital?",
    ),
    "sort_numbers": (
        "Sort these numbers from smallest to largest: {nums}",
        "Put in ascending order: {nums}",
        "Arrange {nums} in increasing order.",
        "Order the list {nums} from low to high.",
        "Sort ascending: {nums}",
    ),
    "antonyms": (
        "What is the opposite of '{word}'?",
        "Give an antonym for {word}.",
        "Name a word that means the opposite of {word}.",
        "Antonym of {word}?",
        "Which word has the opposite meaning of {word}?",
    ),
    "chitchat": (
        "Hi! How is your day going? Do you like {topic}?",
        "What do you think about {topic}?",
        "Tell me something about {topic}.",
        "I had a long day. Any thoughts on {topic}?",
        "Can we just chat about {topic} for a minute?",
        "Do you enjoy {topic}?",
    ),
}

# Assistant-turn forms. The first is always the bare answer, the form the targets
# use, and it gets the largest weight so the skill transfers to them.
ANSWER_TEMPLATES: dict[str, tuple[str, ...]] = {
    "addition": ("{ans}", "{a} + {b} = {ans}", "The sum is {ans}.", "The answer is {ans}."),
    "subtraction": ("{ans}", "{a} - {b} = {ans}", "The difference is {ans}.", "The answer is {ans}."),
    "reverse_word": ("{ans}", "Reversed: {ans}", "'{word}' backwards is '{ans}'."),
    "uppercase": ("{ans}", "In capitals: {ans}", "Here it is: {ans}"),
    "capitals": ("{ans}", "The capital of {country} is {ans}.", "It is {ans}.", "{ans} is the capital of {country}."),
    "sort_numbers": ("{ans}", "Sorted: {ans}", "In ascending order: {ans}"),
    "antonyms": ("{ans}", "The opposite of {word} is {ans}.", "An antonym of {word} is {ans}."),
    # Chitchat has no answer to get right: generic filler, the low-value source.
    "chitchat": (
        "That's a fun topic! There is a lot to say about {topic}.",
        "Sure, I'm happy to chat. I think {topic} can be nice.",
        "Thanks for asking! Many people enjoy {topic}.",
        "Great question. People often talk about {topic}.",
        "{Topic} is a pleasant thing to think about.",
    ),
}

# Targets: prompt templates with no fixed text in common with USER_TEMPLATES.
TARGETS: tuple[str, ...] = ("arithmetic_sums", "word_reversal", "geography")
TARGET_SKILL = {"arithmetic_sums": "addition", "word_reversal": "reverse_word", "geography": "capitals"}
TARGET_SUBTASKS: dict[str, tuple[str, ...]] = {
    "arithmetic_sums": ("two_digit", "three_digit"),
    "word_reversal": ("short_word", "long_word"),
    "geography": CONTINENTS,
}
TARGET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "arithmetic_sums": (
        "Add {a} and {b} together. Result:",
        "Combine {a} with {b} to get a total. Total:",
        "Start at {a}, count up by {b}, and you land on",
    ),
    "word_reversal": (
        "Flip the order of characters in {word}. Output:",
        "Read {word} right to left and write it down:",
        "Mirror the word {word} letter by letter ->",
    ),
    "geography": (
        "The seat of government of {country} is located in",
        "Country: {country}. Its main governing city:",
        "In {country}, the national government sits in",
        "Seat of power for {country} =>",
    ),
}

NOISE_BLOCK = 20  # one noisy example per block of 20 -> exactly 5%
SYSTEM_RATE = 0.05  # share of conversations with a system turn
TWO_TURN_RATE = 0.08  # share of two-turn conversations
_MAX_DUP_TRIES = 500  # consecutive duplicate draws before a skill counts as exhausted

# ------------------------------------------------------------ template helpers

_FORMATTER = string.Formatter()

# How each slot looks in text; used to turn templates back into parsers.
_SLOT_PATTERNS = {
    "a": r"\d+",
    "b": r"\d+",
    "word": r"[a-z]+",
    "phrase": r"[a-z]+(?: [a-z]+)*",
    "country": r"[A-Z][A-Za-z ]*?",
    "nums": r"\d+(?:, \d+)+",
    "topic": r"[a-z][a-z ]*?",
}


def template_fixed_parts(template: str) -> list[str]:
    """The non-empty literal pieces of a ``str.format`` template, in order."""
    return [lit for lit, _f, _s, _c in _FORMATTER.parse(template) if lit]


def _template_regex(template: str) -> re.Pattern:
    pieces = []
    for literal, field, _spec, _conv in _FORMATTER.parse(template):
        pieces.append(re.escape(literal))
        if field is not None:
            pieces.append(f"(?P<{field}>{_SLOT_PATTERNS[field]})")
    return re.compile("".join(pieces))


_USER_REGEXES = {s: tuple(_template_regex(t) for t in ts) for s, ts in USER_TEMPLATES.items()}
_TARGET_REGEXES = {s: tuple(_template_regex(t) for t in ts) for s, ts in TARGET_TEMPLATES.items()}


def _match_template(skill: str, user_text: str) -> tuple[int, dict[str, str]] | None:
    """Index of the pool template of ``skill`` that produced ``user_text``, and its slots."""
    for i, rx in enumerate(_USER_REGEXES[skill]):
        m = rx.fullmatch(user_text)
        if m:
            return i, m.groupdict()
    return None


def _match_target_template(target: str, prompt: str) -> tuple[int, dict[str, str]] | None:
    for i, rx in enumerate(_TARGET_REGEXES[target]):
        m = rx.fullmatch(prompt)
        if m:
            return i, m.groupdict()
    return None


# ------------------------------------------------------------------- skills


def _is_reserved_pair(a: int, b: int) -> bool:
    """Operand pairs kept for the arithmetic target only (~1 in 13, order-free).

    A fixed arithmetic rule rather than a stored list, so pool and targets agree
    without either knowing the other's seed or size.
    """
    lo, hi = min(a, b), max(a, b)
    return (lo * 31 + hi * 17) % 13 == 0


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _sample_pair(rng: random.Random, ordered: bool) -> tuple[int, int]:
    # Each operand independently two or three digits; reserved pairs never enter the pool.
    while True:
        a, b = _operand(rng, rng.choice((2, 3))), _operand(rng, rng.choice((2, 3)))
        if ordered and a < b:
            a, b = b, a
        if not _is_reserved_pair(a, b):
            return a, b


def _sample_addition(rng):
    a, b = _sample_pair(rng, ordered=False)
    return {"a": str(a), "b": str(b)}


def _sample_subtraction(rng):
    a, b = _sample_pair(rng, ordered=True)  # a >= b keeps answers non-negative
    return {"a": str(a), "b": str(b)}


def _wrong_addition(rng, slots, ans):
    a, b = int(slots["a"]), int(slots["b"])
    if rng.random() < 0.4:
        return str(abs(a - b))  # the close skill's answer: a sum/difference mix-up
    return str(max(0, int(ans) + rng.choice((-10, -2, -1, 1, 2, 10, 100))))


def _wrong_subtraction(rng, slots, ans):
    a, b = int(slots["a"]), int(slots["b"])
    if rng.random() < 0.4:
        return str(a + b)
    return str(max(0, int(ans) + rng.choice((-10, -2, -1, 1, 2, 10, 100))))


def _sample_reverse(rng):
    return {"word": rng.choice(SHORT_WORDS + LONG_WORDS)}


def _wrong_reverse(rng, slots, ans):
    word = slots["word"]
    kind = rng.randrange(3)
    if kind == 0:
        return word  # not reversed at all
    if kind == 1:
        i = rng.randrange(len(ans) - 1)  # two neighbouring letters swapped
        return ans[:i] + ans[i + 1] + ans[i] + ans[i + 2 :]
    i = rng.randrange(len(ans))  # one letter dropped
    return ans[:i] + ans[i + 1 :]


def _sample_uppercase(rng):
    return {"phrase": " ".join(rng.sample(PHRASE_WORDS, rng.randint(2, 4)))}


def _wrong_uppercase(rng, slots, ans):
    phrase = slots["phrase"]
    words = phrase.split()
    return rng.choice(
        (
            phrase,  # unchanged
            " ".join(w.capitalize() for w in words),  # title case
            " ".join([words[0].upper()] + words[1:]),  # only the first word
        )
    )


def _sample_capitals(rng):
    return {"country": rng.choice(COUNTRIES)[0]}


def _wrong_capitals(rng, slots, ans):
    return rng.choice([cap for _c, cap, _k in COUNTRIES if cap != ans])


def _sample_sort(rng):
    nums = rng.sample(range(1, 31), rng.randint(3, 6))
    while nums == sorted(nums):  # an already sorted list teaches nothing
        rng.shuffle(nums)
    return {"nums": ", ".join(map(str, nums))}


def _wrong_sort(rng, slots, ans):
    nums = sorted(int(x) for x in slots["nums"].split(", "))
    kind = rng.randrange(3)
    if kind == 0:
        return ", ".join(map(str, reversed(nums)))  # descending
    if kind == 1:
        return slots["nums"]  # the input order
    del nums[rng.randrange(len(nums))]  # one number lost
    return ", ".join(map(str, nums))


def _sample_antonym(rng):
    return {"word": rng.choice(ANTONYM_WORDS)}


def _wrong_antonym(rng, slots, ans):
    if rng.random() < 0.4:
        return slots["word"]  # echo the question word
    return rng.choice([w for w in ANTONYM_WORDS if w != ans and w != slots["word"]])


def _sample_chitchat(rng):
    return {"topic": rng.choice(TOPICS)}


@dataclass(frozen=True)
class _Skill:
    sample: Callable[[random.Random], dict[str, str]]
    solve: Callable[[dict[str, str]], str | None]
    wrong: Callable | None
    answer_weights: tuple[float, ...]


_SKILL_DEFS: dict[str, _Skill] = {
    "addition": _Skill(_sample_addition, lambda s: str(int(s["a"]) + int(s["b"])), _wrong_addition, (5, 2, 2, 1)),
    "subtraction": _Skill(
        _sample_subtraction, lambda s: str(int(s["a"]) - int(s["b"])), _wrong_subtraction, (5, 2, 2, 1)
    ),
    "reverse_word": _Skill(_sample_reverse, lambda s: s["word"][::-1], _wrong_reverse, (6, 2, 2)),
    "uppercase": _Skill(_sample_uppercase, lambda s: s["phrase"].upper(), _wrong_uppercase, (6, 2, 2)),
    "capitals": _Skill(_sample_capitals, lambda s: CAPITAL_OF[s["country"]], _wrong_capitals, (5, 2, 2, 1)),
    "sort_numbers": _Skill(
        _sample_sort,
        lambda s: ", ".join(map(str, sorted(int(x) for x in s["nums"].split(", ")))),
        _wrong_sort,
        (6, 2, 2),
    ),
    "antonyms": _Skill(_sample_antonym, lambda s: ANTONYM_OF[s["word"]], _wrong_antonym, (6, 2, 2)),
    "chitchat": _Skill(_sample_chitchat, lambda s: None, None, (1, 1, 1, 1, 1)),
}


def _format_slots(slots: dict[str, str], ans: str | None) -> dict[str, str | None]:
    out = dict(slots, ans=ans)
    if "topic" in slots:
        out["Topic"] = slots["topic"][0].upper() + slots["topic"][1:]
    return out


def _replies_for(skill: str, slots: dict[str, str], ans: str | None) -> list[str]:
    fmt = _format_slots(slots, ans)
    return [t.format(**fmt) for t in ANSWER_TEMPLATES[skill]]


def _solve(skill: str, user_text: str) -> str | None:
    """The canonical (bare) answer to a pool user turn; None for chitchat.

    Raises ValueError when ``user_text`` is not one of the skill's templates.
    """
    match = _match_template(skill, user_text)
    if match is None:
        raise ValueError(f"{skill}: no template matches {user_text!r}")
    return _SKILL_DEFS[skill].solve(match[1])


def _clean_replies(skill: str, user_text: str) -> list[str]:
    """Every assistant reply a clean (non-noisy) example may give to ``user_text``."""
    match = _match_template(skill, user_text)
    if match is None:
        raise ValueError(f"{skill}: no template matches {user_text!r}")
    slots = match[1]
    return _replies_for(skill, slots, _SKILL_DEFS[skill].solve(slots))


# ---------------------------------------------------------------------- pool


def _rng(seed: int, stream: int) -> random.Random:
    """An independent generator per stream, derived from the user's seed only."""
    return random.Random(seed * 1_000_003 + stream)


class _SkillGenerator:
    """Streams unique conversations of one skill, with the 1-in-20 noise schedule."""

    def __init__(self, skill: str, seed: int, stream: int):
        self.skill = skill
        self.defn = _SKILL_DEFS[skill]
        self.rng = _rng(seed, stream)
        self.noise_rng = _rng(seed, 1000 + stream)  # the schedule ignores retries
        self.seen: set[tuple] = set()  # membership only, never iterated
        self.count = 0
        self.exhausted = False
        self._block = -1
        self._noisy_pos = 0

    def _turn(self, noisy: bool) -> tuple[str, str]:
        rng, defn = self.rng, self.defn
        slots = defn.sample(rng)
        user = rng.choice(USER_TEMPLATES[self.skill]).format(**slots)
        ans = defn.solve(slots)
        clean = _replies_for(self.skill, slots, ans)
        reply = rng.choices(clean, weights=defn.answer_weights)[0]
        if noisy:
            reply = self._corrupt(slots, ans, clean, reply)
        return user, reply

    def _corrupt(self, slots, ans, clean: list[str], reply: str) -> str:
        rng = self.rng
        kind = rng.choice(("wrong", "wrong", "truncated", "off_topic"))
        bad = None
        if kind == "wrong" and self.defn.wrong is not None:
            wrong = self.defn.wrong(rng, slots, ans)
            bad = rng.choices(_replies_for(self.skill, slots, wrong), weights=self.defn.answer_weights)[0]
        elif kind == "truncated" and len(reply) >= 2:
            bad = reply[: rng.randint(1, len(reply) // 2)].rstrip()
            if ans is not None and ans in bad:
                bad = None  # still carries the full answer: not really truncated
        # Fall back to ignoring the question whenever the corruption came out clean.
        if not bad or bad in clean:
            bad = rng.choice(OFF_TOPIC_REPLIES)
        return bad

    def next(self) -> list[dict] | None:
        """The next unique conversation's messages, or None once the skill is exhausted."""
        if self.exhausted:
            return None
        i = self.count
        if i // NOISE_BLOCK != self._block:
            self._block = i // NOISE_BLOCK
            self._noisy_pos = self.noise_rng.randrange(NOISE_BLOCK)
        noisy = i % NOISE_BLOCK == self._noisy_pos
        for _ in range(_MAX_DUP_TRIES):
            rng = self.rng
            messages = []
            if rng.random() < SYSTEM_RATE:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            n_turns = 2 if rng.random() < TWO_TURN_RATE else 1
            for t in range(n_turns):
                # Only the final assistant turn is ever corrupted.
                user, reply = self._turn(noisy and t == n_turns - 1)
                messages.append({"role": "user", "content": user})
                messages.append({"role": "assistant", "content": reply})
            key = tuple((m["role"], m["content"]) for m in messages)
            if key not in self.seen:
                self.seen.add(key)
                self.count += 1
                return messages
        self.exhausted = True
        return None


def generate_pool(n_examples: int = 4000, seed: int = 0) -> list[dict]:
    """``n_examples`` unique LESS/Tulu-layout records, balanced across ``SKILLS``.

    Records are grouped by skill in ``SKILLS`` order; ids are ``<skill>_<n>``.
    """
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    k = len(SKILLS)
    quotas = [n_examples // k + (1 if i < n_examples % k else 0) for i in range(k)]
    gens = [_SkillGenerator(skill, seed, i) for i, skill in enumerate(SKILLS)]
    convs: list[list[list[dict]]] = [[] for _ in SKILLS]
    shortfall = 0
    for i, (gen, quota) in enumerate(zip(gens, quotas, strict=False)):
        while len(convs[i]) < quota:
            msgs = gen.next()
            if msgs is None:
                break
            convs[i].append(msgs)
        shortfall += quota - len(convs[i])
    # Only for very large n: skills that ran out of unique conversations hand their
    # quota to the others, round-robin, so the total is still exact.
    while shortfall:
        progressed = False
        for i, gen in enumerate(gens):
            if shortfall and (msgs := gen.next()) is not None:
                convs[i].append(msgs)
                shortfall -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot generate {n_examples} unique examples")
    return [
        {"id": f"{skill}_{j}", "dataset": skill, "messages": msgs}
        for skill, skill_convs in zip(SKILLS, convs, strict=False)
        for j, msgs in enumerate(skill_convs)
    ]


# The embedded base model's pretraining corpus: fixed (its own seed and size, never the pool's), so
# the model does not move when the pool grows, just as a real pretrained model would not.
PRETRAIN_CORPUS_SIZE = 4000
PRETRAIN_CORPUS_SEED = 20260218


def pretraining_corpus() -> list[list[dict]]:
    """The fixed conversations the embedded tokenizer and model are trained on."""
    return [r["messages"] for r in generate_pool(PRETRAIN_CORPUS_SIZE, PRETRAIN_CORPUS_SEED)]


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    # Temp file + rename so a crash never leaves a half-written file behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_pool(out_dir, n_examples: int = 4000, seed: int = 0) -> list[Path]:
    """Write the pool in the LESS layout, one file per skill; returns the paths.

    ``out_dir/train/processed/<skill>/<skill>_data.jsonl``; skills that received no
    examples (only when ``n_examples < len(SKILLS)``) get no file.
    """
    records = generate_pool(n_examples, seed)
    base = Path(out_dir) / "train" / "processed"
    paths = []
    for skill in SKILLS:
        rows = [r for r in records if r["dataset"] == skill]
        if not rows:
            continue
        path = base / skill / f"{skill}_data.jsonl"
        _write_jsonl_atomic(path, rows)
        paths.append(path)
    return paths


# -------------------------------------------------------------------- targets


def _sample_target_slots(target: str, subtask: str, rng: random.Random) -> dict[str, str]:
    if target == "arithmetic_sums":
        digits = 2 if subtask == "two_digit" else 3
        while True:  # only reserved pairs: the pool never asks these sums
            a, b = _operand(rng, digits), _operand(rng, digits)
            if _is_reserved_pair(a, b):
                return {"a": str(a), "b": str(b)}
    if target == "word_reversal":
        return {"word": rng.choice(SHORT_WORDS if subtask == "short_word" else LONG_WORDS)}
    if target == "geography":
        return {"country": rng.choice([c for c, _cap, cont in COUNTRIES if cont == subtask])}
    raise KeyError(target)


def _target_capacity(target: str, subtask: str) -> int | None:
    """How many distinct prompts a subtask has, where small enough to matter."""
    n_templates = len(TARGET_TEMPLATES[target])
    if target == "word_reversal":
        return n_templates * len(SHORT_WORDS if subtask == "short_word" else LONG_WORDS)
    if target == "geography":
        return n_templates * sum(1 for *_x, cont in COUNTRIES if cont == subtask)
    return None


def generate_targets(seed: int = 0, n_per_subtask: int = 24) -> dict[str, list[dict]]:
    """``{target: [{"prompt", "completion", "subtask"}, ...]}``, n_per_subtask each.

    Completions are the bare answer, the pool skill's most common answer form.
    """
    if n_per_subtask < 0:
        raise ValueError(f"n_per_subtask must be >= 0, got {n_per_subtask}")
    out: dict[str, list[dict]] = {}
    for t_idx, target in enumerate(TARGETS):
        skill = TARGET_SKILL[target]
        records: list[dict] = []
        for s_idx, subtask in enumerate(TARGET_SUBTASKS[target]):
            cap = _target_capacity(target, subtask)
            if cap is not None and n_per_subtask > cap:
                raise ValueError(
                    f"{target}/{subtask} has only {cap} distinct prompts; n_per_subtask={n_per_subtask} is too many"
                )
            rng = _rng(seed, 10_000 + 100 * t_idx + s_idx)
            seen: set[str] = set()  # membership only
            while len(seen) < n_per_subtask:
                slots = _sample_target_slots(target, subtask, rng)
                prompt = rng.choice(TARGET_TEMPLATES[target]).format(**slots)
                if prompt in seen:
                    continue
                seen.add(prompt)
                records.append({"prompt": prompt, "completion": _SKILL_DEFS[skill].solve(slots), "subtask": subtask})
        out[target] = records
    return out


def write_targets(out_dir, seed: int = 0, n_per_subtask: int = 24) -> dict[str, Path]:
    """Write ``out_dir/targets/<target>.jsonl`` for every target; returns the paths."""
    base = Path(out_dir) / "targets"
    paths = {}
    for target, records in generate_targets(seed, n_per_subtask).items():
        path = base / f"{target}.jsonl"
        _write_jsonl_atomic(path, records)
        paths[target] = path
    return paths
