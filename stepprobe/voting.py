"""Voting over a problem's traces, merging equivalent answers with math-verify.

- ``majority``: one vote per trace;
- ``score``: each trace votes with its probe score (the paper's score-weighted vote);
- ``confidence``: each trace votes with its token confidence (DeepConf-style).

Answers are grouped with :func:`stepprobe.data_collection.grading.answers_equivalent`
("1/2" and "0.5" are one answer). Pruned traces do not vote unless ``include_pruned``.
A trace without an answer does not vote. Ties go to the answer seen first.

A voter without a score (no step boundary yet: the short guesses) or without a confidence
votes with the **mean weight of its scored fellow voters** (1.0 when none is scored), not
with 1.0: a calibrated score is a probability (about 0.1 for a weak model), so a plain 1.0
let one unscored guess outweigh ten scored traces (:func:`weights`, used by the replay too).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .errors import StepprobeError

METHODS = ("majority", "score", "confidence")
#: The vote of a policy's own rows where none is asked for (any other policy: majority).
DEFAULT_VOTE = {"none": "majority", "confidence": "confidence"}


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


def weights(values: Sequence[float | None], method: str) -> list[float]:
    """Vote weights of one problem's voters: 1.0 each for ``majority``; else each voter's value
    (score or confidence, clipped at 0), and a voter without one the mean of the others'."""
    if method == "majority":
        return [1.0] * len(values)
    known = [max(float(v), 0.0) for v in values if v is not None]
    fill = sum(known) / len(known) if known else 1.0
    return [fill if v is None else max(float(v), 0.0) for v in values]


def vote(ballots: Sequence[Ballot], method: str = "majority", *, include_pruned: bool = False) -> VoteResult:
    if method not in METHODS:
        raise StepprobeError(f"unknown voting method {method!r}; known: {', '.join(METHODS)}")
    voters = [b for b in ballots if b.answer is not None and (include_pruned or not b.pruned)]
    if not voters:
        return VoteResult(None, 0.0, [], 0)

    w = weights([b.score if method == "score" else b.confidence for b in voters], method)
    classes = merge_answers([b.answer for b in voters])  # type: ignore[misc]
    tally = [(voters[c[0]].answer, sum(w[i] for i in c)) for c in classes]
    best = max(range(len(tally)), key=lambda k: (tally[k][1], -k))
    return VoteResult(tally[best][0], tally[best][1], tally, len(voters))  # type: ignore[arg-type]
