"""A third built-in problem set, for *testing only*: subtraction and sharing stories.

``builtin-ood2`` / ``builtin-ood2:n=96,seed=0``. Written for issue 23's judging protocol
(docs/group_signal.md) after the group scorers were planned and before any of them was
measured, so that no choice was tuned on it. Its template family differs from both the
training generator (:mod:`stepprobe.data_collection.tasks`: sums and products, arithmetic
and word problems) and ``builtin-ood`` (:mod:`stepprobe.data_collection.ood_tasks`: sums and
products in prices, ages, rates): every question here asks for a **difference or a quotient**
(what is left, how many more, an equal share, change from a payment, a two-step "make then
give away"), with its own names and items. The numbers stay small (the default model is weak).

Never train or tune on it; ``collect`` marks the problem ids ``builtin-ood2-s<seed>-<index>``.
``meta`` holds ``family``, ``operands``, ``expression`` and ``template``, as the other generators do.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from .ood_tasks import generate_family_tasks
from .problems import Problem

DEFAULT_N = 96
PREFIX = "builtin-ood2"

_NAMES = ("Noor", "Bram", "Sione", "Aiko", "Dmitri", "Lucia", "Obi", "Freya", "Ravi", "Zanele")
_THINGS = ("marbles", "stickers", "shells", "crayons", "acorns", "buttons")

Generated = tuple[str, int, dict]


def _pick(rng: random.Random, frames: Sequence[str], **v) -> tuple[str, int]:
    k = rng.randrange(len(frames))
    return frames[k].format(**v), k


def _meta(ops: list[int], expr: str, k: int) -> dict:
    return {"operands": ops, "expression": expr, "template": k}


def _left(rng: random.Random) -> Generated:
    who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    b = rng.randint(2, 8)
    a = b + rng.randint(2, 9)
    q, k = _pick(rng, ("{w} had {a} {t} and lost {b} of them on the bus. How many {t} remain?",
                       "A jar held {a} {t} until {w} removed {b}. What is left in the jar?",
                       "Take {b} away from {a}: what remains?"), w=who, t=thing, a=a, b=b)
    return q, a - b, _meta([a, b], f"{a} - {b}", k)


def _more(rng: random.Random) -> Generated:
    x, y = rng.sample(_NAMES, 2)
    b = rng.randint(2, 9)
    a = b + rng.randint(1, 9)
    q, k = _pick(rng, ("{x} owns {a} {t} while {y} owns {b}. By how many does {x} have more?",
                       "A red shelf holds {a} jars and a green shelf holds {b}. By how much do the two shelves "
                       "differ?"), x=x, y=y, t=rng.choice(_THINGS), a=a, b=b)
    return q, a - b, _meta([a, b], f"{a} - {b}", k)


def _share(rng: random.Random) -> Generated:
    who = rng.choice(_NAMES)
    b, c = rng.randint(2, 5), rng.randint(2, 6)
    a = b * c
    q, k = _pick(rng, ("{w} splits {a} {t} evenly among {b} friends; what is each friend's share?",
                       "Divide {a} by {b}.",
                       "{a} chairs stand in {b} equal rows. How many chairs are in one row?"),
                 w=who, t=rng.choice(_THINGS), a=a, b=b)
    return q, c, _meta([a, b], f"{a} / {b}", k)


def _change(rng: random.Random) -> Generated:
    who = rng.choice(_NAMES)
    b = rng.randint(2, 9)
    a = rng.choice([x for x in (5, 10, 20) if x > b])
    q, k = _pick(rng, ("{w} hands the cashier a {a} dollar note for a scarf that costs {b} dollars. How much "
                       "change comes back?",
                       "A kite costs {b} dollars. {w} paid with {a} dollars. Work out the change."),
                 w=who, a=a, b=b)
    return q, a - b, _meta([a, b], f"{a} - {b}", k)


def _twostep(rng: random.Random) -> Generated:
    who = rng.choice(_NAMES)
    a, b = rng.randint(2, 4), rng.randint(2, 5)
    c = rng.randint(1, a * b - 1)
    q, k = _pick(rng, ("{w} bakes {a} trays of {b} muffins and gives {c} muffins to a neighbour. How many muffins "
                       "does {w} keep?",
                       "Each of {a} boxes holds {b} pencils. {c} pencils break. How many pencils still work?"),
                 w=who, a=a, b=b, c=c)
    return q, a * b - c, _meta([a, b, c], f"{a} * {b} - {c}", k)


FAMILIES: dict[str, Callable[[random.Random], Generated]] = {
    "left": _left, "more": _more, "share": _share, "change": _change, "twostep": _twostep,
}


def generate_ood2_tasks(n: int = DEFAULT_N, seed: int = 0, *, families: Sequence[str] | None = None,
                        levels: Sequence[int] | None = None) -> list[Problem]:
    """``n`` test-only problems cycling through ``families``; deterministic in all arguments."""
    return generate_family_tasks(FAMILIES, n, seed, families=families, levels=levels,
                                 what="built-in test problems (ood2)", rng_key="stepprobe-builtin-ood2",
                                 prefix=PREFIX, split="ood2-test")
