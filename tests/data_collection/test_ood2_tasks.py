"""issue 23's third test set (``builtin-ood2``): registered, deterministic, right, and written apart."""

from __future__ import annotations

import re

import pytest

from stepprobe.data_collection.ood2_tasks import FAMILIES, generate_ood2_tasks
from stepprobe.data_collection.ood_tasks import generate_ood_tasks
from stepprobe.data_collection.sources import load_problem_source
from stepprobe.data_collection.tasks import FAMILIES as TRAIN_FAMILIES
from stepprobe.data_collection.tasks import LEVELS, generate_tasks
from stepprobe.errors import StepprobeError


def _shingles(q: str, k: int = 5) -> set[tuple[str, ...]]:
    w = re.sub(r"\d+", "#", q.lower()).replace("?", " ?").replace(".", " .").split()
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_registered_deterministic_and_answers_right():
    probs = load_problem_source("builtin-ood2:n=100,seed=2")
    assert [p.question for p in probs] == [p.question for p in generate_ood2_tasks(100, seed=2)]
    assert [p.question for p in probs] != [p.question for p in generate_ood2_tasks(100, seed=3)]
    assert len({p.question for p in probs}) == 100
    assert all(p.problem_id.startswith("builtin-ood2-s2-") and p.meta["split"] == "ood2-test" for p in probs)
    assert {p.meta["family"] for p in probs} == set(FAMILIES)
    for p in probs:
        expr = p.meta["expression"].replace("/", "//")
        assert int(p.gold) == eval(expr) > 0  # noqa: S307 - our own generated arithmetic
        ops = [int(x) for x in re.findall(r"\d+", p.question)]
        assert sorted(ops) == sorted(p.meta["operands"])


def test_shares_no_five_word_frame_with_the_training_or_first_test_set():
    probs = generate_ood2_tasks(300, seed=0)
    train = generate_tasks(3000, seed=0, families=sorted(TRAIN_FAMILIES), levels=LEVELS)
    ood = generate_ood_tasks(600, seed=0)
    frames = set().union(*(_shingles(p.question) for p in train + ood))
    assert not [p.question for p in probs if _shingles(p.question) & frames]


def test_bad_arguments():
    with pytest.raises(StepprobeError, match="unknown family"):
        generate_ood2_tasks(4, families=["add"])
    with pytest.raises(StepprobeError, match="one level"):
        load_problem_source("builtin-ood2:n=4,levels=2")
