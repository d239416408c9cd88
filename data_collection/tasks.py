"""The built-in task generator: seeded, deterministic arithmetic and short word problems.

The embedded default model (SmolLM2-135M-Instruct) is weak, so the tasks are small:
each *family* has *levels* 1 (easiest) to 3 that set the size of the numbers. The default
mix (:data:`DEFAULT_FAMILIES` x :data:`DEFAULT_LEVELS`) is tuned so that the default model
gets roughly 20-60% of its samples right (measured rates: ``docs/collect.md``).

Problem ids are ``builtin-s<seed>-<index>``; the same ``(n, seed, families, levels)``
always gives the same problems. ``meta`` holds ``family``, ``level`` and the operands.

Families:

==========  ===========================================================
``add``      "What is 7 + 5?"  (L1 one-digit, L2 two+one digit, L3 two+two)
``sub``      "What is 12 - 5?" (non-negative results; same sizes as add)
``mul``      "What is 3 * 4?"  (L1 2..9 x 2..9, L2 11..30 x 2..9, L3 11..99 x 11..30)
``chain``    "What is 3 + 4 + 2?" (L1 three one-digit terms, L2 with a minus, L3 four terms)
``word_add`` "Tom has 3 apples. He gets 4 more apples. How many apples does Tom have now?"
``word_sub`` "Anna has 9 pens. She gives 4 pens to a friend. How many pens does Anna have left?"
``word_mul`` "There are 3 boxes. Each box has 4 cookies. How many cookies are there in all?"
             (L1 2..5 x 2..5, L2 2..9 x 2..9, L3 11..20 x 3..9)
==========  ===========================================================
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..errors import StepprobeError
from .problems import Problem

DEFAULT_N = 300
# The default model cannot subtract (sub, word_sub and chain: 0-6% of samples right in the
# tuning runs), so the default mix leaves them out; they remain available as harder families.
DEFAULT_FAMILIES = ("add", "mul", "word_add", "word_mul")
DEFAULT_LEVELS = (1,)

_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Nora")
_HE_SHE = {"Tom": "He", "Sam": "He", "Ben": "He", "Max": "He", "Leo": "He", "Jack": "He"}
_ITEMS = ("apples", "pens", "marbles", "books", "stickers", "cookies", "cards", "balloons", "shells", "toys")
_CONTAINERS = ("boxes", "bags", "baskets", "jars", "shelves", "plates")
_CONTAINER_ONE = {"boxes": "box", "bags": "bag", "baskets": "basket", "jars": "jar", "shelves": "shelf",
                  "plates": "plate"}


def _size(rng: random.Random, level: int, which: int) -> int:
    """Operand ``which`` (0 or 1) of an add/sub problem at ``level``."""
    if level == 1:
        return rng.randint(1, 9)
    if level == 2:
        return rng.randint(10, 99) if which == 0 else rng.randint(1, 9)
    return rng.randint(10, 99)


def _add(rng: random.Random, level: int) -> tuple[str, int, dict]:
    a, b = _size(rng, level, 0), _size(rng, level, 1)
    return f"What is {a} + {b}?", a + b, {"operands": [a, b]}


def _sub(rng: random.Random, level: int) -> tuple[str, int, dict]:
    a, b = _size(rng, level, 0), _size(rng, level, 1)
    if level == 1:
        a, b = a + b, b  # one-digit subtrahend, result one digit: 12 - 5
    elif b > a:
        a, b = b, a
    return f"What is {a} - {b}?", a - b, {"operands": [a, b]}


def _mul(rng: random.Random, level: int) -> tuple[str, int, dict]:
    if level == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    elif level == 2:
        a, b = rng.randint(11, 30), rng.randint(2, 9)
    else:
        a, b = rng.randint(11, 99), rng.randint(11, 30)
    return f"What is {a} * {b}?", a * b, {"operands": [a, b]}


def _chain(rng: random.Random, level: int) -> tuple[str, int, dict]:
    if level == 1:
        xs = [rng.randint(1, 9) for _ in range(3)]
        return f"What is {xs[0]} + {xs[1]} + {xs[2]}?", sum(xs), {"operands": xs}
    if level == 2:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = rng.randint(1, a + b)
        return f"What is {a} + {b} - {c}?", a + b - c, {"operands": [a, b, c]}
    xs = [rng.randint(1, 20) for _ in range(4)]
    return f"What is {xs[0]} + {xs[1]} + {xs[2]} + {xs[3]}?", sum(xs), {"operands": xs}


def _word_numbers(rng: random.Random, level: int) -> tuple[int, int]:
    if level == 1:
        return rng.randint(2, 9), rng.randint(2, 9)
    if level == 2:
        return rng.randint(10, 30), rng.randint(2, 9)
    return rng.randint(20, 90), rng.randint(11, 40)


def _pron(name: str) -> str:
    return _HE_SHE.get(name, "She")


def _word_add(rng: random.Random, level: int) -> tuple[str, int, dict]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = _word_numbers(rng, level)
    q = (f"{name} has {a} {item}. {_pron(name)} gets {b} more {item}. "
         f"How many {item} does {name} have now?")
    return q, a + b, {"operands": [a, b]}


def _word_sub(rng: random.Random, level: int) -> tuple[str, int, dict]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = _word_numbers(rng, level)
    if level == 1:
        a = a + b
    elif b > a:
        a, b = b, a
    q = (f"{name} has {a} {item}. {_pron(name)} gives {b} {item} to a friend. "
         f"How many {item} does {name} have left?")
    return q, a - b, {"operands": [a, b]}


def _word_mul(rng: random.Random, level: int) -> tuple[str, int, dict]:
    item, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    if level == 1:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
    elif level == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(11, 20), rng.randint(3, 9)
    q = (f"There are {a} {box}. Each {_CONTAINER_ONE[box]} has {b} {item}. "
         f"How many {item} are there in all?")
    return q, a * b, {"operands": [a, b]}


FAMILIES: dict[str, Callable[[random.Random, int], tuple[str, int, dict]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "chain": _chain,
    "word_add": _word_add, "word_sub": _word_sub, "word_mul": _word_mul,
}
LEVELS = (1, 2, 3)


def generate_tasks(n: int = DEFAULT_N, seed: int = 0, *, families: Sequence[str] | None = None,
                   levels: Sequence[int] | None = None) -> list[Problem]:
    """``n`` problems cycling through ``families`` x ``levels``; deterministic in all arguments.

    Questions do not repeat within one call while the family/level has unused questions left.
    """
    families = list(families or DEFAULT_FAMILIES)
    levels = list(levels or DEFAULT_LEVELS)
    if n < 1:
        raise StepprobeError(f"built-in tasks: n must be at least 1, got {n}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise StepprobeError(f"built-in tasks: unknown family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise StepprobeError(f"built-in tasks: levels must be among {LEVELS}, got {bad}")
    combos = [(f, lv) for lv in levels for f in families]
    rng = random.Random(f"stepprobe-builtin-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    for i in range(n):
        family, level = combos[i % len(combos)]
        for _ in range(50):  # avoid repeats; small families may run out, then a repeat is allowed
            question, answer, meta = FAMILIES[family](rng, level)
            if question not in seen:
                break
        seen.add(question)
        out.append(Problem(problem_id=f"builtin-s{seed}-{i:05d}", question=question, gold=str(answer),
                           meta={"family": family, "level": level, **meta}))
    return out
