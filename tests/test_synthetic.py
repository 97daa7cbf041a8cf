"""Tests for the embedded synthetic pool and targets (gist_demo.synthetic)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from gist_demo import synthetic as syn

N = 4000


@pytest.fixture(scope="module")
def pool():
    return syn.generate_pool(N, seed=0)


@pytest.fixture(scope="module")
def targets():
    return syn.generate_targets(seed=0)


def _turns(record):
    """(user, assistant) content pairs of a record, system turn skipped."""
    msgs = [m for m in record["messages"] if m["role"] != "system"]
    return [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2], strict=False)]


def _is_noisy(record):
    return any(reply not in syn._clean_replies(record["dataset"], user) for user, reply in _turns(record))


# ------------------------------------------------------------------ determinism


def test_generate_pool_is_deterministic(pool):
    assert syn.generate_pool(N, seed=0) == pool
    assert syn.generate_pool(N, seed=1) != pool


def test_write_pool_is_byte_identical(tmp_path):
    a = syn.write_pool(tmp_path / "a", n_examples=800, seed=5)
    b = syn.write_pool(tmp_path / "b", n_examples=800, seed=5)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for pa, pb in zip(a, b, strict=False):
        assert pa.read_bytes() == pb.read_bytes()


def test_generate_targets_is_deterministic(targets):
    assert syn.generate_targets(seed=0) == targets
    assert syn.generate_targets(seed=1) != targets


# ------------------------------------------------------------ counts and shape


def test_counts_ids_and_balance(pool):
    assert len(pool) == N
    assert len({r["id"] for r in pool}) == N
    counts = Counter(r["dataset"] for r in pool)
    assert len(syn.SKILLS) >= 7 and set(counts) == set(syn.SKILLS)
    assert max(counts.values()) <= 1.5 * min(counts.values())
    for r in pool:
        assert r["id"].rsplit("_", 1)[0] == r["dataset"]


@pytest.mark.parametrize("n", [0, 1, 5, 8, 97, 1001])
def test_exact_count_for_any_n(n):
    records = syn.generate_pool(n, seed=2)
    assert len(records) == n
    assert len({r["id"] for r in records}) == n


def test_no_duplicate_conversations(pool):
    keys = [json.dumps(r["messages"]) for r in pool]
    assert len(set(keys)) == len(keys)


def test_message_structure(pool):
    n_system = n_two_turn = 0
    for r in pool:
        msgs = r["messages"]
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            n_system += 1
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2), roles
        n_two_turn += len(roles) == 4
        assert all(m["content"].strip() for m in msgs)
        # Short sequences for a tiny model.
        assert sum(len(m["content"].split()) for m in msgs) < 60
    # "A few" of each, not none and not most.
    assert 0.01 * N < n_system < 0.15 * N
    assert 0.02 * N < n_two_turn < 0.2 * N


def test_templates_per_skill_are_used(pool):
    used = {s: set() for s in syn.SKILLS}
    answer_forms = {s: set() for s in syn.SKILLS}
    for r in pool:
        for user, reply in _turns(r):
            match = syn._match_template(r["dataset"], user)
            assert match is not None, (r["dataset"], user)
            used[r["dataset"]].add(match[0])
            clean = syn._clean_replies(r["dataset"], user)
            if reply in clean:
                answer_forms[r["dataset"]].add(clean.index(reply))
    for skill in syn.SKILLS:
        assert len(syn.USER_TEMPLATES[skill]) >= 4
        assert len(used[skill]) >= 4, skill
        assert len(answer_forms[skill]) >= 2, skill


def test_close_skills_are_documented():
    a, b = syn.CLOSE_SKILLS
    assert {a, b} <= set(syn.SKILLS)
    assert a in syn.__doc__ and b in syn.__doc__ and "deliberately close" in syn.__doc__
    assert len(syn.USER_TEMPLATES[a]) == len(syn.USER_TEMPLATES[b])


def test_word_tables_are_sane():
    assert all(3 <= len(w) <= 5 for w in syn.SHORT_WORDS)
    assert all(7 <= len(w) <= 10 for w in syn.LONG_WORDS)
    # Palindromes would make "not reversed" noise indistinguishable from clean.
    assert all(w != w[::-1] for w in syn.SHORT_WORDS + syn.LONG_WORDS)
    assert len(syn.COUNTRIES) >= 40 and len(syn.ANTONYM_PAIRS) >= 60
    assert len(syn.ANTONYM_WORDS) == len(set(syn.ANTONYM_WORDS))  # one pair per word


# ------------------------------------------------------------------ correctness


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def test_clean_answers_are_correct(pool):
    """Independent re-derivation of the answer for every clean example."""
    checked = Counter()
    for r in pool:
        if _is_noisy(r):
            continue
        skill = r["dataset"]
        for user, reply in _turns(r):
            if skill in ("addition", "subtraction"):
                a, b = _ints(user)
                expected = a + b if skill == "addition" else a - b
                assert _ints(reply)[-1] == expected, (user, reply)
                assert expected >= 0
            elif skill == "reverse_word":
                m = (
                    re.search(r"'([a-z]+)'", user)
                    or re.search(r": ([a-z]+)$", user)
                    or re.match(r"([a-z]+) reversed", user)
                )
                word = m.group(1)
                assert word[::-1] in reply, (user, reply)
            elif skill == "uppercase":
                phrase = " ".join(
                    w
                    for w in re.findall(r"\b[a-z]+\b", user.split(":")[-1] if ":" in user else user)
                    if w not in {"to", "uppercase", "using", "only", "letters"}
                )
                assert phrase.upper() in reply, (user, reply)
            elif skill == "capitals":
                country = next(c for c, _cap, _k in syn.COUNTRIES if c in user)
                assert syn.CAPITAL_OF[country] in reply
            elif skill == "sort_numbers":
                nums = _ints(user)
                assert _ints(reply) == sorted(nums) and 3 <= len(nums) <= 6
            elif skill == "antonyms":
                word = syn._match_template(skill, user)[1]["word"]
                assert syn.ANTONYM_OF[word] in reply.split(" ")[-1].rstrip(".")
            checked[skill] += 1
    assert all(checked[s] > 100 for s in syn.SKILLS if s != "chitchat")


def test_solve_helper():
    assert syn._solve("addition", "What is 23 plus 58?") == "81"
    assert syn._solve("subtraction", "Compute 90 - 12.") == "78"
    assert syn._solve("reverse_word", "Write 'hello' backwards.") == "olleh"
    assert syn._solve("uppercase", "Make this all caps: good day") == "GOOD DAY"
    assert syn._solve("capitals", "What city is France's capital?") == "Paris"
    assert syn._solve("sort_numbers", "Sort ascending: 9, 2, 5") == "2, 5, 9"
    assert syn._solve("antonyms", "Antonym of hot?") == "cold"
    assert syn._solve("chitchat", "Do you enjoy tea?") is None
    with pytest.raises(ValueError):
        syn._solve("addition", "Add 2 and 3 together. Result:")


def test_noise_rate_and_kinds(pool):
    noisy_by_skill = Counter()
    off_topic = wrong_or_truncated = 0
    for r in pool:
        if _is_noisy(r):
            noisy_by_skill[r["dataset"]] += 1
            last_reply = _turns(r)[-1][1]
            if last_reply in syn.OFF_TOPIC_REPLIES:
                off_topic += 1
            else:
                wrong_or_truncated += 1
    counts = Counter(r["dataset"] for r in pool)
    for skill in syn.SKILLS:
        assert 0.02 <= noisy_by_skill[skill] / counts[skill] <= 0.10, skill
    assert off_topic > 0 and wrong_or_truncated > off_topic
    # Nothing in the record gives the noise away.
    assert all(set(r) == {"id", "dataset", "messages"} for r in pool)


def test_reserved_pairs_never_in_pool(pool):
    for r in pool:
        if r["dataset"] in ("addition", "subtraction"):
            for user, _reply in _turns(r):
                a, b = _ints(user)
                assert not syn._is_reserved_pair(a, b)


# ------------------------------------------------------------------ layout


def test_write_pool_layout(tmp_path):
    paths = syn.write_pool(tmp_path, n_examples=400, seed=0)
    assert [p.parent.name for p in paths] == list(syn.SKILLS)
    total = 0
    for skill, path in zip(syn.SKILLS, paths, strict=False):
        assert path == tmp_path / "train" / "processed" / skill / f"{skill}_data.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        assert all(rec["dataset"] == skill for rec in records)
        total += len(records)
    assert total == 400
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_targets_layout(tmp_path):
    paths = syn.write_targets(tmp_path, seed=0, n_per_subtask=5)
    assert set(paths) == set(syn.TARGETS)
    for target, path in paths.items():
        assert path == tmp_path / "targets" / f"{target}.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(set(rec) == {"prompt", "completion", "subtask"} for rec in records)
        assert len(records) == 5 * len(syn.TARGET_SUBTASKS[target])
    again = syn.write_targets(tmp_path / "again", seed=0, n_per_subtask=5)
    assert all(paths[t].read_bytes() == again[t].read_bytes() for t in paths)


# ------------------------------------------------------------------ targets


def test_target_counts_and_uniqueness(targets):
    assert len(targets) >= 2
    assert len({syn.TARGET_SKILL[t] for t in targets}) == len(targets)
    for target, records in targets.items():
        counts = Counter(r["subtask"] for r in records)
        assert counts == {s: 24 for s in syn.TARGET_SUBTASKS[target]}
        assert len({r["prompt"] for r in records}) == len(records)
    big = syn.generate_targets(seed=3, n_per_subtask=30)
    assert all(len(v) == 30 * len(syn.TARGET_SUBTASKS[t]) for t, v in big.items())
    with pytest.raises(ValueError):
        syn.generate_targets(n_per_subtask=1000)


def test_target_completions_match_pool_answer_form(targets):
    for target, records in targets.items():
        skill = syn.TARGET_SKILL[target]
        for r in records:
            _idx, slots = syn._match_target_template(target, r["prompt"])
            # The bare answer form is the pool skill's first (most common) reply form.
            assert r["completion"] == syn._SKILL_DEFS[skill].solve(slots)
            if target == "arithmetic_sums":
                a, b = int(slots["a"]), int(slots["b"])
                assert r["completion"] == str(a + b)
                digits = 2 if r["subtask"] == "two_digit" else 3
                assert len(slots["a"]) == len(slots["b"]) == digits
            elif target == "word_reversal":
                assert r["completion"] == slots["word"][::-1]
                short = r["subtask"] == "short_word"
                assert slots["word"] in (syn.SHORT_WORDS if short else syn.LONG_WORDS)
            elif target == "geography":
                country = slots["country"]
                assert (country, r["completion"], r["subtask"]) in syn.COUNTRIES


def _significant(part):
    """A fixed part long enough to be a phrasing rather than a stop word."""
    core = part.strip(" .,:;?!'-<>=")
    return core if (len(core.split()) >= 2 or len(core) >= 6) else None


@pytest.mark.parametrize("seed", [0, 1])
def test_targets_disjoint_from_pool(seed, targets):
    pool = syn.generate_pool(N, seed=seed)
    user_texts = [u for r in pool for u, _a in _turns(r)]
    haystack = "\n".join(user_texts).lower()
    # The pool's own fixed text (slot names like {country} left out).
    pool_templates = "\n".join(
        part
        for ts in (*syn.USER_TEMPLATES.values(), *syn.ANSWER_TEMPLATES.values(), syn.SYSTEM_PROMPTS)
        for t in ts
        for part in syn.template_fixed_parts(t)
    ).lower()
    for templates in syn.TARGET_TEMPLATES.values():
        for template in templates:
            parts = [p for p in map(_significant, syn.template_fixed_parts(template)) if p]
            assert parts, template  # each target template has distinctive text
            for part in parts:
                assert part.lower() not in haystack, (template, part)
                assert part.lower() not in pool_templates, (template, part)
            # The template as a whole (slots as wildcards) matches no pool message.
            rx = syn._template_regex(template)
            assert not any(rx.search(u) for u in user_texts), template
    # Exact target prompts never occur, not even inside a longer pool message.
    prompts = [r["prompt"] for recs in syn.generate_targets(seed=seed).values() for r in recs]
    assert not set(prompts) & set(user_texts)
    assert not any(p.lower() in haystack for p in prompts)
    # And the target sums are never computed in the pool.
    for r in syn.generate_targets(seed=seed)["arithmetic_sums"]:
        assert syn._is_reserved_pair(*_ints(r["prompt"]))
