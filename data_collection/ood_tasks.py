"""A second built-in problem set, for *testing only*: other phrasings, other vocabulary.

``builtin-ood`` / ``builtin-ood:n=96,seed=0``. Written separately from
:mod:`stepprobe.data_collection.tasks` (no template, name, item or sentence frame is shared
with it) so that a probe's score on these problems says how it does on wording it has
never seen: prices, ages, distances, recipes, game scores, gardens and classrooms, and
arithmetic asked as "Evaluate ...", "How much is ...", "What number is ... more than ...".
The numbers stay as small as the training set's level 1, because the default model is weak
(it must still get some right for the ranking metrics to exist).

Never train on it: the pipeline uses it only for evaluation, and ``collect`` marks the
traces' problem ids ``builtin-ood-s<seed>-<index>``. ``meta`` holds ``family``, ``operands``,
``expression`` (the arithmetic asked for) and ``template``, as in the training generator.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..errors import StepprobeError
from .problems import Problem

DEFAULT_N = 96
PREFIX = "builtin-ood"

_PEOPLE = (("Priya", "her"), ("Kofi", "his"), ("Ines", "her"), ("Tariq", "his"), ("Yuki", "her"),
           ("Mateo", "his"), ("Amara", "her"), ("Lars", "his"), ("Chen", "his"), ("Fatima", "her"))

Generated = tuple[str, int, dict]


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_PEOPLE)


def _fmt(rng: random.Random, frames: Sequence[str], **v) -> tuple[str, int]:
    k = rng.randrange(len(frames))
    return frames[k].format(**v), k


def _m(ops: list[int], expr: str, k: int) -> dict:
    return {"operands": ops, "expression": expr, "template": k}


def _arith(rng: random.Random) -> Generated:
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q, k = _fmt(rng, ("Evaluate {a} + {b}.", "How much is {a} plus {b}?", "What number is {b} more than {a}?",
                          "{a} and {b} make how many when put together?", "Put {a} and {b} together: what total do you get?"),
                    a=a, b=b)
        return q, a + b, _m([a, b], f"{a} + {b}", k)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q, k = _fmt(rng, ("Evaluate {a} x {b}.", "How much is {a} groups of {b}?", "What number is {a} lots of {b}?",
                      "Work out {b} taken {a} times."), a=a, b=b)
    return q, a * b, _m([a, b], f"{a} * {b}", k)


def _money(rng: random.Random) -> Generated:
    who, his = _person(rng)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 6), rng.randint(2, 5)
        thing = rng.choice(("notebook", "sandwich", "ticket", "comic", "pot plant"))
        q, k = _fmt(rng, ("One {t} costs {a} dollars. What do {b} of them cost?",
                          "At the fair a {t} sells for {a} dollars. {w} pays for {b}. How many dollars is that?"),
                    t=thing, a=a, b=b, w=who)
        return q, a * b, _m([a, b], f"{a} * {b}", k)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q, k = _fmt(rng, ("A ticket costs {a} dollars and a drink costs {b} dollars. What is the price of both?",
                      "{w} spent {a} dollars at the bakery and {b} dollars at the market. How many dollars did "
                      "{w} spend?"), a=a, b=b, w=who)
    return q, a + b, _m([a, b], f"{a} + {b}", k)


def _age(rng: random.Random) -> Generated:
    who, his = _person(rng)
    a, b = rng.randint(4, 12), rng.randint(2, 9)
    q, k = _fmt(rng, ("{w} turned {a} this spring. {h} cousin is {b} years older. What is the cousin's age?",
                      "In {b} years, how old will {w} be if {w} is {a} now?"),
                w=who, h=his.capitalize(), a=a, b=b)
    return q, a + b, _m([a, b], f"{a} + {b}", k)


def _rate(rng: random.Random) -> Generated:
    who, his = _person(rng)
    a, b = rng.randint(2, 6), rng.randint(2, 5)
    q, k = _fmt(rng, ("{w} cycles {a} kilometres every day. How far does {w} cycle in {b} days?",
                      "A recipe uses {a} eggs per cake. How many eggs go into {b} cakes?",
                      "A garden bed has {b} rows with {a} tulips in every row. Count the tulips.",
                      "A pump fills {a} buckets an hour. After {b} hours, how many buckets are full?"),
                w=who, a=a, b=b)
    return q, a * b, _m([a, b], f"{a} * {b}", k)


def _score(rng: random.Random) -> Generated:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q, k = _fmt(rng, ("A team scored {a} points in the first half and {b} points in the second half. What was its "
                      "final score?",
                      "In a quiz the blue table earned {a} points, then {b} bonus points. What is their total?"),
                a=a, b=b)
    return q, a + b, _m([a, b], f"{a} + {b}", k)


def _multi(rng: random.Random) -> Generated:
    who, his = _person(rng)
    if rng.random() < 0.5:
        a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(2, 5)
        q, k = _fmt(rng, ("A farm had {a} hens. The farmer bought {b} more, and then {c} chicks hatched. How many "
                          "birds are on the farm?",
                          "{w} walked {a} km on Friday, {b} km on Saturday and {c} km on Sunday. What distance "
                          "did {w} walk over the weekend?"), w=who, a=a, b=b, c=c)
        return q, a + b + c, _m([a, b, c], f"{a} + {b} + {c}", k)
    a, b, c = rng.randint(2, 4), rng.randint(2, 4), rng.randint(2, 5)
    q, k = _fmt(rng, ("{w} buys {a} pens at {b} dollars each and a ruler for {c} dollars. How many dollars does "
                      "{w} spend?",
                      "Each of {a} classrooms has {b} computers, and the library has {c} more. Count the school's "
                      "computers."), w=who, a=a, b=b, c=c)
    return q, a * b + c, _m([a, b, c], f"{a} * {b} + {c}", k)


FAMILIES: dict[str, Callable[[random.Random], Generated]] = {
    "arith": _arith, "money": _money, "age": _age, "rate": _rate, "score": _score, "multi": _multi,
}


def generate_ood_tasks(n: int = DEFAULT_N, seed: int = 0, *, families: Sequence[str] | None = None,
                       levels: Sequence[int] | None = None) -> list[Problem]:
    """``n`` test-only problems cycling through ``families``; deterministic in all arguments."""
    return generate_family_tasks(FAMILIES, n, seed, families=families, levels=levels, what="built-in test problems",
                                 rng_key="stepprobe-builtin-ood", prefix=PREFIX, split="ood-test")


def generate_family_tasks(table: dict[str, Callable[[random.Random], Generated]], n: int, seed: int, *,
                          families: Sequence[str] | None, levels: Sequence[int] | None, what: str, rng_key: str,
                          prefix: str, split: str) -> list[Problem]:
    """``n`` one-level problems cycling through ``families`` of ``table`` (each family draws a
    question, its answer and metadata from one seeded generator; a repeated question is drawn
    again); shared by the test-only sets (this module's and ``ood2_tasks``)."""
    families = list(families or table)
    if n < 1:
        raise StepprobeError(f"{what}: n must be at least 1, got {n}")
    unknown = [f for f in families if f not in table]
    if unknown:
        raise StepprobeError(f"{what}: unknown family {', '.join(unknown)}; known: {', '.join(table)}")
    if levels and list(levels) != [1]:
        raise StepprobeError(f"{what} have one level (1)")
    rng = random.Random(f"{rng_key}-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    for i in range(n):
        family = families[i % len(families)]
        for _ in range(50):
            question, answer, meta = table[family](rng)
            if question not in seen:
                break
        seen.add(question)
        out.append(Problem(problem_id=f"{prefix}-s{seed}-{i:05d}", question=question, gold=str(answer),
                           meta={"family": family, "level": 1, "split": split, **meta}))
    return out
