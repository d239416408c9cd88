"""The built-in task generator: deterministic, varied, and its answers are right."""

from __future__ import annotations

import re

import pytest

from stepprobe.data_collection.tasks import DEFAULT_FAMILIES, DEFAULT_N, FAMILIES, LEVELS, generate_tasks
from stepprobe.errors import StepprobeError


def test_deterministic_and_seed_dependent():
    a, b = generate_tasks(50, seed=7), generate_tasks(50, seed=7)
    assert [(p.problem_id, p.question, p.gold) for p in a] == [(p.problem_id, p.question, p.gold) for p in b]
    c = generate_tasks(50, seed=8)
    assert [p.question for p in a] != [p.question for p in c]
    # a prefix of a longer run is the shorter run
    assert [p.question for p in generate_tasks(20, seed=7)] == [p.question for p in a[:20]]


def test_default_size_and_unique_ids():
    ps = generate_tasks()
    assert len(ps) == DEFAULT_N >= 200
    assert len({p.problem_id for p in ps}) == len(ps)
    assert len({p.question for p in ps}) > 0.9 * len(ps)


def _answer_from_question(q: str, meta: dict) -> int:
    """The answer from the recorded expression, after checking the question states its operands.

    (The phrasings vary, so the question text is not parsed; every operand must occur in it
    as a number, and the expression uses exactly the operands.)"""
    expr = meta["expression"]
    assert re.fullmatch(r"[\d +*-]+", expr), expr
    assert [int(x) for x in re.findall(r"\d+", expr)] == meta["operands"]
    numbers = [int(x) for x in re.findall(r"\d+", q)]
    for x in meta["operands"]:
        assert x in numbers, (x, q)
    if not meta.get("distractor"):
        assert sorted(numbers) == sorted(meta["operands"]), q
    return eval(expr)  # noqa: S307  (digits, + - * only, checked above)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("level", LEVELS)
def test_answers_are_correct_and_non_negative(family, level):
    ps = generate_tasks(30, seed=1, families=[family], levels=[level])
    for p in ps:
        assert p.meta["family"] == family and p.meta["level"] == level
        assert int(p.gold) == _answer_from_question(p.question, p.meta) >= 0


def test_levels_make_numbers_bigger():
    def mean_operand(level):
        ps = generate_tasks(60, seed=0, families=["add"], levels=[level])
        return sum(sum(p.meta["operands"]) for p in ps) / len(ps)

    assert mean_operand(1) < mean_operand(2) < mean_operand(3)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "at least 1"),
    ({"families": ["nope"]}, "unknown family"),
    ({"levels": [4]}, "levels must be among"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(StepprobeError, match=message):
        generate_tasks(**{"n": 5, **kwargs})


def test_phrasings_vary_and_word_problems_have_distractors():
    ps = generate_tasks(600, seed=0)
    by_family: dict[str, set[int]] = {}
    for p in ps:
        by_family.setdefault(p.meta["family"], set()).add(p.meta["template"])
    assert set(by_family) == set(DEFAULT_FAMILIES)
    assert all(len(t) >= 3 for t in by_family.values()), by_family
    words = [p for p in ps if p.meta["family"].startswith("word")]
    share = sum(p.meta["distractor"] for p in words) / len(words)
    assert 0.2 < share < 0.5
    # a distractor's number is in the question but not among the operands
    d = next(p for p in words if p.meta["distractor"])
    assert len(re.findall(r"\d+", d.question)) > len(d.meta["operands"])


def _shingles(q: str, k: int = 5) -> set[tuple[str, ...]]:
    w = re.sub(r"\d+", "#", q.lower()).replace("?", " ?").replace(".", " .").split()
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_out_of_template_set_is_written_differently():
    from stepprobe.data_collection.ood_tasks import generate_ood_tasks
    from stepprobe.data_collection.sources import load_problem_source

    ood = load_problem_source("builtin-ood:n=120,seed=3")
    assert [p.question for p in ood] == [p.question for p in generate_ood_tasks(120, seed=3)]
    assert all(p.problem_id.startswith("builtin-ood-s3-") and p.meta["split"] == "ood-test" for p in ood)
    train = generate_tasks(3000, seed=0, families=sorted(FAMILIES), levels=LEVELS)
    frames = set().union(*(_shingles(p.question) for p in train))
    # no five-word frame (numbers masked) of a test question occurs in any training question
    assert not [p.question for p in ood if _shingles(p.question) & frames]
    for p in ood:
        assert int(p.gold) == _answer_from_question(p.question, {**p.meta, "distractor": False}) >= 0
