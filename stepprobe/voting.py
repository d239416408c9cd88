"""Voting over a problem's traces, merging equivalent answers with math-verify.

- ``majority``: one vote per trace;
- ``score``: each trace votes with its probe score (the paper's score-weighted vote);
- ``confidence``: each trace votes with its token confidence (DeepConf-style).

Answers are grouped with :func:`stepprobe.data_collection.grading.answers_equivalent`
("1/2" and "0.5" are one answer). Pruned traces do not vote unless ``include_pruned``.
A trace without an answer does not vote. Ties go to the answer seen first.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .errors import StepprobeError

METHODS = ("majority", "score", "confidence")


@dataclasses.dataclass
class Ballot:
    answer: str | None
    pruned: bool = False
    score: float | None = None
    confidence: float | None = None


@dataclasses.dataclass
class VoteResult:
    answer: str | None
    weight: float
    tally: list[tuple[str, float]]
    voters: int


def merge_answers(answers: Sequence[str]) -> list[list[int]]:
    """Indices of ``answers`` grouped into classes of equivalent answers (first seen first)."""
    from stepprobe.data_collection.grading import answers_equivalent

    classes: list[list[int]] = []
    reps: list[str] = []
    for i, a in enumerate(answers):
        for cls, rep in zip(classes, reps):
            if answers_equivalent(rep, a):
                cls.append(i)
                break
        else:
            classes.append([i])
            reps.append(a)
    return classes


def vote(ballots: Sequence[Ballot], method: str = "majority", *, include_pruned: bool = False) -> VoteResult:
    if method not in METHODS:
        raise StepprobeError(f"unknown voting method {method!r}; known: {', '.join(METHODS)}")
    voters = [b for b in ballots if b.answer is not None and (include_pruned or not b.pruned)]
    if not voters:
        return VoteResult(None, 0.0, [], 0)

    def weight(b: Ballot) -> float:
        if method == "majority":
            return 1.0
        w = b.score if method == "score" else b.confidence
        return 1.0 if w is None else max(float(w), 0.0)  # unscored: counts as a plain vote

    classes = merge_answers([b.answer for b in voters])  # type: ignore[misc]
    tally = [(voters[c[0]].answer, sum(weight(voters[i]) for i in c)) for c in classes]
    best = max(range(len(tally)), key=lambda k: (tally[k][1], -k))
    return VoteResult(tally[best][0], tally[best][1], tally, len(voters))  # type: ignore[arg-type]
