"""The built-in task generator: deterministic, varied, and its answers are right."""

from __future__ import annotations

import re

import pytest

from stepprobe.data_collection.tasks import DEFAULT_N, FAMILIES, LEVELS, generate_tasks
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


def _answer_from_question(q: str) -> int:
    m = re.fullmatch(r"What is (.+)\?", q)
    if m:
        return eval(m.group(1))  # noqa: S307  (generated "3 + 4 - 2" only)
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if "more" in q:
        return nums[0] + nums[1]
    if "gives" in q:
        return nums[0] - nums[1]
    if "Each" in q:
        return nums[0] * nums[1]
    raise AssertionError(q)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("level", LEVELS)
def test_answers_are_correct_and_non_negative(family, level):
    ps = generate_tasks(30, seed=1, families=[family], levels=[level])
    for p in ps:
        assert p.meta["family"] == family and p.meta["level"] == level
        assert int(p.gold) == _answer_from_question(p.question) >= 0


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
